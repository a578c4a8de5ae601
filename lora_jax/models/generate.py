"""Autoregressive generation for the reference Llama: a preallocated KV cache, adapters applied.

:func:`generate` runs one compiled prefill over the (left-padded) prompts and then one
compiled decode step per new token; both take the frozen base, the adapters and the
cache as arguments, so neither recompiles per token, per adapter (same ranks and
rules) or per slot of an :class:`~lora_jax.AdapterBank`. The model function
:func:`forward_cached` is plain JAX: adapters go through :func:`lora_jax.lora_apply`
(factored, never merged), an NF4 base is dequantised at each use, and a bank gathers
each row's adapter.

Cache layout (batch first, so a bank's per-row ``vmap`` slices it like the tokens):

=========  ==========================================================  ==============
field      shape                                                       dtype
=========  ==========================================================  ==============
``k``      ``(batch, layers, max_len, kv_heads, head_dim)``            compute dtype
``v``      ``(batch, layers, max_len, kv_heads, head_dim)``            compute dtype
=========  ==========================================================  ==============

Slot ``j`` of the cache holds token ``j`` of the padded sequence (prompt, then the new
tokens); ``kv_mask (batch, max_len)`` marks the slots holding real tokens. Rotary
positions count real tokens only, so a left-padded row sees the same positions as
the unpadded prompt would.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.trees import is_node
from lora_jax._src.multi.bank import AdapterBank
from lora_jax._src.ops.apply import lora_apply

from . import _llama_blocks as blocks
from ._explicit import lookup

if TYPE_CHECKING:
    from .llama import LlamaConfig


class KVCache(NamedTuple):
    """Keys and values of every layer, ``(batch, layers, max_len, kv_heads, head_dim)`` each."""

    k: jax.Array
    v: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
    """An all-zero cache for ``batch`` rows of up to ``max_len`` tokens."""
    shape = (
        batch,
        config.num_hidden_layers,
        max_len,
        config.num_key_value_heads,
        config.head_dim,
    )
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def forward_cached(
    params: dict,
    config: LlamaConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    kv_mask: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Logits of new tokens given the cached ones, and the cache with them written in.

    Args:
        params: Llama parameters (dense; under :func:`lora_jax.lora_apply` adapted or NF4).
        config: the model's config.
        input_ids: ``(batch, seq)`` new tokens.
        positions: ``(batch, seq)`` their rotary positions.
        slots: ``(batch, seq)`` the cache slots they are written to.
        kv_mask: ``(batch, max_len)`` bool, the slots holding real tokens (these included).
        cache: the :class:`KVCache`.

    Returns:
        ``(logits (batch, seq, vocab), cache)``. A token at slot ``i`` attends to every
        slot ``j <= i`` with ``kv_mask[j]``.
    """
    b, s = input_ids.shape
    max_len = cache.k.shape[2]
    emb = params["embed_tokens"]["embedding"]
    h = lookup(emb, input_ids).reshape(b * s, -1)
    cos, sin = blocks.rope_tables(config, positions)
    causal = jnp.arange(max_len)[None, None, :] <= slots[:, :, None]
    visible = causal & kv_mask.astype(bool)[:, None, :]
    # Additive mask (batch, 1, 1, seq, max_len) over (kv head, group, query, key).
    bias = jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    rows = jnp.arange(b)[:, None]

    def step(h, xs):
        p, k_cache, v_cache = xs  # caches (batch, max_len, kv_heads, head_dim)
        q, k, v = blocks.attention_qkv(h, p, cos, sin, config, b)
        k_cache = k_cache.at[rows, slots].set(k.astype(k_cache.dtype))
        v_cache = v_cache.at[rows, slots].set(v.astype(v_cache.dtype))
        ctx = blocks.attend(q, k_cache.astype(q.dtype), v_cache.astype(v.dtype), bias)
        return blocks.layer_output(h, ctx, p, config), (k_cache, v_cache)

    layer_first = (jnp.moveaxis(cache.k, 1, 0), jnp.moveaxis(cache.v, 1, 0))
    h, (k, v) = jax.lax.scan(step, h, (params["layers"], *layer_first))
    logits = blocks.logits_of(params, config, h).reshape(b, s, -1)
    return logits, KVCache(jnp.moveaxis(k, 0, 1), jnp.moveaxis(v, 0, 1))


def _has_quantized(params: Any) -> bool:
    return any(isinstance(x, QuantizedArray) for x in jax.tree.leaves(params, is_leaf=is_node))


def _model(params, trainable, adapter_ids, config, *args):
    """``forward_cached`` with the adapters (or bank) applied; a dense base without runs as is."""
    if trainable is None and not _has_quantized(params):
        return forward_cached(params, config, *args)
    if trainable is None:  # an NF4 base alone: the engine dequantises each weight at its use
        trainable = jax.tree.map(lambda _: None, params, is_leaf=is_node)
    kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    return lora_apply(forward_cached)(params, trainable, config, *args, **kw)


def _next_token(logits, key, temperature, top_p, greedy: bool) -> jax.Array:
    """``(batch,)`` int32: argmax, or a top-p (nucleus) sample at ``temperature``."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("cache",))
def _prefill(
    params, trainable, adapter_ids, config, ids, mask, cache, key, temperature, top_p, *, greedy
):
    b, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    slots = jnp.broadcast_to(jnp.arange(p), (b, p))
    kv_mask = jnp.zeros((b, cache.k.shape[2]), bool).at[:, :p].set(mask.astype(bool))
    logits, cache = _model(
        params, trainable, adapter_ids, config, ids, positions, slots, kv_mask, cache
    )
    step_key = None if key is None else jax.random.fold_in(key, p - 1)
    token = _next_token(logits[:, -1], step_key, temperature, top_p, greedy)
    return token, cache, kv_mask, mask.sum(axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "greedy"), donate_argnames=("cache",))
def _decode(
    params,
    trainable,
    adapter_ids,
    config,
    token,
    position,
    slot,
    kv_mask,
    cache,
    key,
    temperature,
    top_p,
    *,
    greedy,
):
    b = token.shape[0]
    kv_mask = kv_mask.at[:, slot].set(True)
    slots = jnp.full((b, 1), slot)
    logits, cache = _model(
        params,
        trainable,
        adapter_ids,
        config,
        token[:, None],
        position[:, None],
        slots,
        kv_mask,
        cache,
    )
    step_key = None if key is None else jax.random.fold_in(key, slot)
    token = _next_token(logits[:, -1], step_key, temperature, top_p, greedy)
    return token, cache, kv_mask, position + 1


def _check_args(
    prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, key, trainable, adapter_ids
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise ValueError(
            f"generate: prompt_ids has shape {ids.shape} and dtype {ids.dtype}; expected "
            f"integer token ids (batch, prompt_len) with prompt_len >= 1 (add a batch axis)."
        )
    mask = np.ones(ids.shape, np.int32) if prompt_mask is None else np.asarray(prompt_mask)
    if mask.shape != ids.shape:
        raise ValueError(
            f"generate: prompt_mask has shape {mask.shape} but prompt_ids has {ids.shape}; "
            f"give one 1 (token) or 0 (padding) per prompt position."
        )
    mask = mask.astype(np.int32)
    if (
        not np.isin(mask, (0, 1)).all()
        or (np.diff(mask, axis=1) < 0).any()
        or (mask[:, -1] == 0).any()
    ):
        raise ValueError(
            "generate: prompt_mask must pad on the left (each row 0...0 1...1, ending in a "
            "token); right-pad nothing, since new tokens follow the last prompt position."
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or (max_new_tokens < 1)
    ):
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int >= 1.")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"generate: temperature={temperature!r} must be >= 0 (0 is greedy decoding)."
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p!r} must be in (0, 1] (1 keeps every token).")
    if temperature > 0 and key is None:
        raise ValueError(
            "generate: sampling (temperature > 0) needs key=jax.random.key(seed); the same "
            "key gives the same tokens."
        )
    if isinstance(trainable, AdapterBank) and adapter_ids is None:
        raise ValueError(
            "generate: trainable is an AdapterBank; pass adapter_ids (one slot per row, or "
            "one scalar slot; slot 0 is the base model)."
        )
    if adapter_ids is not None and not isinstance(trainable, AdapterBank):
        raise ValueError(
            f"generate: adapter_ids needs an AdapterBank as trainable, got "
            f"{type(trainable).__name__}; build one with lj.stack_adapters([trainable, ...])."
        )
    return ids, mask


def generate(
    params: dict,
    config: LlamaConfig,
    prompt_ids: Any,
    *,
    max_new_tokens: int,
    trainable: Any = None,
    adapter_ids: Any = None,
    prompt_mask: Any = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens with a KV cache.

    Args:
        params: the Llama parameters, or the frozen tree of ``lj.split`` (NF4 leaves from
            ``lj.quantize`` or ``llama.load(..., quantize=...)`` allowed), or merged weights.
        config: the model's config.
        prompt_ids: ``(batch, prompt_len)`` int token ids, left-padded.
        max_new_tokens: tokens to add per row (>= 1).
        trainable: None, the trainable tree of ``lj.split`` (applied factored by
            :func:`lora_jax.lora_apply`), or an :class:`~lora_jax.AdapterBank`.
        adapter_ids: with a bank, ``(batch,)`` slots (one adapter per row) or a scalar.
        prompt_mask: ``(batch, prompt_len)`` 1 for tokens, 0 for left padding (default all 1).
        temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: keep the most likely tokens whose mass reaches ``top_p``.
        key: PRNG key for sampling; step ``t`` uses ``fold_in(key, slot)``, so the same key
            gives the same tokens.

    Returns:
        ``(batch, prompt_len + max_new_tokens)`` int32: the prompts (padding included) and
        the new tokens. No stop token: trim after an end-of-text id yourself.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import llama
        >>> from lora_jax.models.generate import generate
        >>> cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                         num_hidden_layers=2, num_attention_heads=4,
        ...                         num_key_value_heads=2)
        >>> params = llama.init(jax.random.key(0), cfg)
        >>> generate(params, cfg, jnp.array([[0, 5, 6], [7, 8, 9]]), max_new_tokens=4,
        ...          prompt_mask=jnp.array([[0, 1, 1], [1, 1, 1]])).shape
        (2, 7)
    """
    ids, mask = _check_args(
        prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, key, trainable, adapter_ids
    )
    b, p = ids.shape
    dtype = params["embed_tokens"]["embedding"].dtype
    cache = init_cache(config, b, p + max_new_tokens, dtype)
    greedy = temperature == 0
    ids = jnp.asarray(ids, jnp.int32)
    if adapter_ids is not None:
        adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    knobs = (
        key,
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(top_p),
    )
    common = (params, trainable, adapter_ids, config)
    token, cache, kv_mask, position = _prefill(
        *common, ids, jnp.asarray(mask), cache, *knobs, greedy=greedy
    )
    tokens = [token]
    for t in range(max_new_tokens - 1):
        slot = jnp.int32(p + t)
        token, cache, kv_mask, position = _decode(
            *common, token, position, slot, kv_mask, cache, *knobs, greedy=greedy
        )
        tokens.append(token)
    return jnp.concatenate([ids, jnp.stack(tokens, axis=1)], axis=1)
