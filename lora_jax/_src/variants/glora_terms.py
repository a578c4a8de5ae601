"""GLoRA's weight and bias terms (see :mod:`lora_jax._src.variants.glora` for the math):
the dense forms merge needs, their inverses, and the implicit terms the engine applies."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core.factors import expand_columns, factor_specs, lora_delta, wide_dtype


def _columns(x: jax.Array, t: Any) -> jax.Array:
    """A vector ``(*stack, *out)`` or scalar ``(*stack,)`` part as ``(*stack, *out)``."""
    ns = len(t.stack_axes)
    if x.ndim == ns:
        col = t.shape
        x = jnp.broadcast_to(
            x.reshape(x.shape + (1,) * len(t.out_axes)),
            x.shape + tuple(col[i] for i in t.out_axes),
        )
    return x


def weight_scale(t: Any, compute: Any) -> jax.Array:
    """``A`` in the weight's layout (a low-rank A), or ``(*stack, *out)`` (vector/scalar A)."""
    g = t.glora
    if g.scale is not None:
        return _columns(g.scale.astype(compute), t)
    sub = dataclasses.replace(
        t, a=g.scale_in, b=g.scale_out, magnitude=None, singular=None, glora=None, variant=None
    )
    return lora_delta(sub, compute)


def _prompt(t: Any, compute: Any) -> jax.Array | None:
    """C as ``(*stack, *in)``, or None."""
    g = t.glora
    if g.prompt is not None:
        return g.prompt.astype(compute)
    if g.prompt_in is None:
        return None
    c = jnp.einsum(
        "...r,...r->...",
        g.prompt_in.astype(compute),
        g.prompt_out.astype(compute).reshape(
            g.prompt_out.shape[:-1] + (1,) * len(t.in_axes) + g.prompt_out.shape[-1:]
        ),
    )
    return c * jnp.asarray(t.scale, compute)


def bias_delta(w: jax.Array, t: Any, bias: jax.Array | None) -> jax.Array | None:
    """``b0 ⊙ D + E + C · W0`` as ``(*stack, *out)`` in float32 or wider, or None."""
    g = t.glora
    compute = wide_dtype(w.dtype, t.a.dtype)
    terms = []
    if g.bias_scale is not None:
        terms.append(bias.astype(compute) * _columns(g.bias_scale.astype(compute), t))
    if g.bias_shift is not None:
        terms.append(_columns(g.bias_shift.astype(compute), t))
    c = _prompt(t, compute)
    if c is not None:
        a_spec, b_spec, w_spec = factor_specs(t)
        stack = "".join(w_spec[i] for i in t.stack_axes)
        ins = "".join(w_spec[i] for i in t.in_axes)
        outs = "".join(w_spec[i] for i in t.out_axes)
        terms.append(
            jnp.einsum(
                f"{stack}{ins},{w_spec}->{stack}{outs}",
                c,
                w.astype(compute),
                precision=jax.lax.Precision.HIGHEST,
            )
        )
    return sum(terms[1:], terms[0]) if terms else None


def implicit_terms(
    w: Any, t: Any, bias: jax.Array | None
) -> tuple[Any, jax.Array | None, jax.Array | None]:
    """``(base, col, shift)`` for the engine: ``W = base * col + B`` and ``shift`` per column.

    ``w`` is the frozen weight (quantised or dense); the base stays ``w`` unless A is
    low-rank, when it is the dense ``W0 ⊙ (1 + A)`` in ``w``'s dtype.
    """
    g = t.glora
    needs_dense = g.forms[0] == "lowrank" or g.forms[1] != "none"
    dense = w.dequantize() if needs_dense and hasattr(w, "dequantize") else w
    compute = wide_dtype(w.dtype, t.a.dtype)
    base, col = w, None
    if g.forms[0] == "lowrank":
        base = (dense.astype(compute) * (1 + weight_scale(t, compute))).astype(w.dtype)
    elif g.forms[0] != "none":
        col = 1 + weight_scale(t, compute)
    return base, col, bias_delta(dense, t, bias) if g.has_bias_terms else None


def merged_weight(w: jax.Array, t: Any) -> jax.Array:
    """Dense ``W0 + W0 ⊙ A + B`` in ``w``'s dtype (summed in float32 or wider)."""
    compute = wide_dtype(w.dtype, t.a.dtype)
    w0 = w.astype(compute)
    if t.glora.forms[0] != "none":
        scale = weight_scale(t, compute)
        w0 = w0 * (1 + (scale if t.glora.forms[0] == "lowrank" else expand_columns(scale, t)))
    return (w0 + lora_delta(t, compute)).astype(w.dtype)


def unmerged_weight(merged: jax.Array, t: Any) -> jax.Array:
    """Inverse of :func:`merged_weight`: ``(W - B) / (1 + A)``."""
    compute = wide_dtype(merged.dtype, t.a.dtype)
    w0 = merged.astype(compute) - lora_delta(t, compute)
    if t.glora.forms[0] != "none":
        scale = weight_scale(t, compute)
        w0 = w0 / (1 + (scale if t.glora.forms[0] == "lowrank" else expand_columns(scale, t)))
    return w0.astype(merged.dtype)


def merged_bias(bias: jax.Array, w: jax.Array, t: Any) -> jax.Array:
    """``b0 + b0 ⊙ D + E + C · W0`` in the bias's dtype (``w`` is the original W0)."""
    delta = bias_delta(w, t, bias)
    return (bias.astype(delta.dtype) + delta).astype(bias.dtype)


def unmerged_bias(merged: jax.Array, w: jax.Array, t: Any) -> jax.Array:
    """Inverse of :func:`merged_bias`: ``(b - E - C · W0) / (1 + D)``."""
    g = t.glora
    compute = wide_dtype(merged.dtype, w.dtype, t.a.dtype)
    rest = dataclasses.replace(t, glora=dataclasses.replace(g, bias_scale=None))
    shift = bias_delta(w, rest, None)
    b = merged.astype(compute) - (0.0 if shift is None else shift)
    if g.bias_scale is not None:
        b = b / (1 + _columns(g.bias_scale.astype(compute), t))
    return b.astype(merged.dtype)
