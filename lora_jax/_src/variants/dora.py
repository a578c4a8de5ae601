"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

A DoRA leaf (``LoraRule(dora=True)``) adds a trainable magnitude per output column,
``magnitude (*stack, *out_axes)``::

    W = magnitude * (W0 + delta W) / ||W0 + delta W||

the norm taken over the input axes for each output column and held constant in the
backward pass (PEFT's ``use_dora``, as the paper's section 4.3 suggests). The magnitude
starts at ``||W0||`` so that W starts at W0. For the engine the weight is
``W0 * col + scale * a @ (b * col)`` with ``col = magnitude / ||W0 + delta W||``: the norm
comes from rank-r products (:func:`column_norm`), so nothing weight-shaped is formed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import (
    LoraFactors,
    expand_columns,
    factor_specs,
    lora_delta,
    wide_dtype,
)
from lora_jax._src.core.qarray import QuantizedArray


def _dense(w: Any) -> Any:
    return w.dequantize() if isinstance(w, QuantizedArray) else w


def column_norm(w: jax.Array, factors: LoraFactors, a: Any = None, b: Any = None) -> jax.Array:
    """||W0 + delta W|| over the input axes, per (stack, out) column, without forming W0 + delta W.

    ||w + d||^2 = ||w||^2 + 2 s <a^T w, b> + s^2 b^T (a^T a) b, each term from rank-r products.
    ``a``, ``b`` default to ``factors.low_rank()``. Returns ``(*stack, *out_axes)`` in float32
    (float64 for float64 inputs).
    """
    a_spec, b_spec, w_spec = factor_specs(factors)
    if a is None:
        a, b = factors.low_rank()
    compute = wide_dtype(w.dtype, factors.a.dtype)
    a = a.astype(compute)
    b = b.astype(compute)
    w = w.astype(compute)
    s = jnp.asarray(factors.scale, compute)
    r = a_spec[-1]
    stack = "".join(w_spec[i] for i in factors.stack_axes)
    out = stack + "".join(w_spec[i] for i in factors.out_axes)
    hi = jax.lax.Precision.HIGHEST
    w2 = jnp.einsum(f"{w_spec},{w_spec}->{out}", w, w, precision=hi)
    aw = jnp.einsum(f"{a_spec},{w_spec}->{b_spec}", a, w, precision=hi)
    cross = jnp.einsum(f"{b_spec},{b_spec}->{out}", aw, b, precision=hi)
    r2 = "Y"
    gram = jnp.einsum(f"{a_spec},{a_spec.replace(r, r2)}->{stack}{r}{r2}", a, a, precision=hi)
    quad = jnp.einsum(
        f"{b_spec},{stack}{r}{r2},{b_spec.replace(r, r2)}->{out}", b, gram, b, precision=hi
    )
    return jnp.sqrt(jnp.maximum(w2 + 2 * s * cross + s * s * quad, 0.0))


def dora_weight(w: jax.Array, factors: LoraFactors) -> jax.Array:
    """Dense DoRA weight ``magnitude * (W0 + dW) / ||W0 + dW||`` in ``w``'s dtype (for merge)."""
    compute = wide_dtype(w.dtype, factors.a.dtype)
    full = w.astype(compute) + lora_delta(factors, compute)
    norm = jax.lax.stop_gradient(
        jnp.sqrt(jnp.sum(full * full, axis=factors.in_axes, keepdims=True))
    )
    return (full * (expand_columns(factors.magnitude.astype(compute), factors) / norm)).astype(
        w.dtype
    )


class Dora(_variant.Variant):
    name = "dora"
    title = "DoRA"
    plain_low_rank = False
    peft = "lora"  # PEFT: use_dora=True, <module>.lora_magnitude_vector (out,)
    peft_setting = "use_dora"
    peft_embedding = False
    peft_zero_fill = False  # a zero magnitude is not "no update"

    def wants(self, rule: Any) -> bool:
        return bool(rule.dora)

    def init(self, factors, base, ctx):  # magnitude = ||W0|| per column: W starts at W0
        magnitude = column_norm(_dense(base), factors).astype(ctx.rule.param_dtype)
        return dataclasses.replace(factors, magnitude=magnitude), base

    def present(self, t) -> bool:
        return t.magnitude is not None

    def arrays(self, t):
        return {"magnitude": t.magnitude}

    def replace(self, t, values):
        return dataclasses.replace(t, magnitude=values["magnitude"])

    def layout(self, t):
        return {"magnitude": (("stack", "out"), _variant.FAST)}

    def owns(self, name: str) -> bool:
        return name == "magnitude"

    def restore(self, t, arrays, meta):  # PEFT's magnitude is flat over the out axes
        ns = len(t.stack_axes)
        shape = t.b.shape[:ns] + t.b.shape[ns + 1 :]
        m = arrays["magnitude"]
        return dataclasses.replace(t, magnitude=m if m.shape == shape else m.reshape(shape))

    def peft_tensors(self, t, layer):
        m = np.asarray(t.magnitude)
        m = m.reshape(*m.shape[: len(t.stack_axes)], -1)
        return {"lora_magnitude_vector": m if layer is None else m[layer]}

    def peft_config(self, config, leaves):
        return {}, {**config, "use_dora": True}

    def peft_check_config(self, config, path):
        if not isinstance(config.get("use_dora", False), bool):
            raise ValueError(
                f"{path}: use_dora={config['use_dora']!r} must be true or false; fix the config "
                f"or re-save the adapter."
            )

    def peft_uses(self, config):
        return config.get("use_dora", False) is True

    def peft_refine(self, m, tensors, consumed, config):
        key, d_out = m.key_prefix + "lora_magnitude_vector", m.b.shape[0]
        if key not in tensors or tensors[key].shape != (d_out,):
            got = tensors[key].shape if key in tensors else "is missing"
            raise ValueError(
                f"adapter_config.json has use_dora=True but '{key}' {got}; expected shape "
                f"({d_out},). The file is incomplete."
            )
        consumed.add(key)
        return dataclasses.replace(m, arrays={**m.arrays, "magnitude": tensors[key]})

    def terms(self, t, terms, frozen_at):
        # The norm is a constant in the backward pass; col scales the base and folds into b.
        norm = jax.lax.stop_gradient(column_norm(_dense(terms.base), t, terms.a, terms.b))
        col = t.magnitude.astype(norm.dtype) / norm
        ns = len(t.stack_axes)
        b = terms.b * col.reshape(col.shape[:ns] + (1,) + col.shape[ns:]).astype(terms.b.dtype)
        return dataclasses.replace(terms, b=b, col=col)

    def merged(self, w, t):
        return dora_weight(w, t)

    def unmerge_state(self, w, t):
        return column_norm(w, t)

    def unmerged(self, merged, t, state, path):
        if state is None:
            raise ValueError(
                f"'{path}' is a DoRA leaf: unmerging needs the column norms that merging "
                f"divided out; pass dora_norms=lj.dora_norms(frozen, trainable)."
            )
        wide = wide_dtype(merged.dtype, t.a.dtype)
        full = merged.astype(wide) * expand_columns(
            state.astype(wide) / t.magnitude.astype(wide), t
        )
        return (full - lora_delta(t, wide)).astype(merged.dtype)


DORA = _variant.register(Dora())
