"""The pieces of a Llama decoder layer, shared by the full forward and the KV-cache one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ._explicit import reshape_rows

if TYPE_CHECKING:
    from .llama import LlamaConfig


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def rope_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``(*batch, seq, head_dim)`` float32 of integer ``positions (*batch, seq)``."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x (batch, seq, heads, hd)``; cos/sin ``([batch,] seq, hd)``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_qkv(h: jax.Array, p: dict, cos, sin, config: LlamaConfig, batch: int):
    """Pre-norm q, k, v of one layer's ``h (batch*seq, hidden)``, rotary embedded.

    Returns q ``(batch, seq, kv_heads, group, head_dim)``, k and v
    ``(batch, seq, kv_heads, head_dim)``.
    """
    hd, nkv = config.head_dim, config.num_key_value_heads
    group = config.num_attention_heads // nkv
    a = p["attention"]
    x = _rms_norm(h, p["input_layernorm"]["scale"], config.rms_norm_eps)
    q = _rope(reshape_rows(x @ a["q_proj"]["kernel"], batch, -1, nkv * group, hd), cos, sin)
    k = _rope(reshape_rows(x @ a["k_proj"]["kernel"], batch, -1, nkv, hd), cos, sin)
    v = reshape_rows(x @ a["v_proj"]["kernel"], batch, -1, nkv, hd)
    return reshape_rows(q, *k.shape[:2], nkv, group, hd), k, v


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Grouped-query attention: ``(batch*queries, heads*head_dim)`` context.

    Args:
        q: ``(batch, queries, kv_heads, group, head_dim)``.
        k, v: ``(batch, keys, kv_heads, head_dim)``.
        bias: additive float32 mask broadcastable to ``(batch, kv_heads, group, queries, keys)``.
    """
    b, sq = q.shape[:2]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / jnp.asarray(q.shape[-1] ** 0.5, q.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(v.dtype)
    return reshape_rows(jnp.einsum("bkgqs,bskd->bqkgd", probs, v), b * sq, -1)


def layer_output(h: jax.Array, ctx: jax.Array, p: dict, config: LlamaConfig) -> jax.Array:
    """The rest of a layer after attention: output projection, residual, SwiGLU MLP."""
    h = h + ctx @ p["attention"]["o_proj"]["kernel"]
    m = p["mlp"]
    x = _rms_norm(h, p["post_attention_layernorm"]["scale"], config.rms_norm_eps)
    gated = jax.nn.silu(x @ m["gate_proj"]["kernel"]) * (x @ m["up_proj"]["kernel"])
    return h + gated @ m["down_proj"]["kernel"]


def logits_of(params: dict, config: LlamaConfig, h: jax.Array) -> jax.Array:
    """Final norm and output projection of ``h (n, hidden)``: ``(n, vocab)``."""
    h = _rms_norm(h, params["norm"]["scale"], config.rms_norm_eps)
    emb = params["embed_tokens"]["embedding"]
    head = emb.T if config.tie_word_embeddings else params["lm_head"]["kernel"]
    return h @ head
