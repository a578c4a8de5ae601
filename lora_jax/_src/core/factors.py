"""LoraFactors: the trainable low-rank pair that replaces one frozen weight's update.

Conventions (the one place they are written down):

=========  ===========================  ===========================  =========
factor     lora_jax                     PEFT (torch)                 init
=========  ===========================  ===========================  =========
``a``      ``(*stack, *in_axes, r)``    ``lora_A.weight (r, in)``    random
``b``      ``(*stack, r, *out_axes)``   ``lora_B.weight (out, r)``   zeros
=========  ===========================  ===========================  =========

delta W = scale * a @ b, contracted over r, with scale = alpha / r
(alpha / sqrt(r) for rsLoRA). Two optional arrays refine it: ``singular``
``(*stack, r)`` scales the rank directions (AdaLoRA's P diag(lambda) Q:
delta W = scale * a @ (singular * b)), and ``magnitude`` ``(*stack, *out_axes)``
makes it DoRA: W = magnitude * (W0 + delta W) / ||W0 + delta W||, the norm taken
over the input axes for each output column and held constant in the backward pass.
``glora`` makes it GLoRA (``variants/glora.py``): W = W0 + W0 * A + delta W, plus bias terms.
``in_axes`` are the weight's axes that the
function contracts with its input (for a Flax kernel ``(in, out)``: axis 0; for
an embedding table ``(vocab, dim)``: the vocab axis); ``out_axes`` are the
rest. ``stack_axes`` index stacked layers and appear in both factors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from lora_jax._src.variants.glora import GloraParts


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b", "magnitude", "singular", "glora"],
    meta_fields=["alpha", "stack_axes", "in_axes", "out_axes", "rslora", "dropout"],
)
@dataclasses.dataclass(frozen=True)
class LoraFactors:
    """Low-rank factors of one adapted weight.

    Attributes:
        a: ``(*stack, *in_axes, r)`` input-side factor.
        b: ``(*stack, r, *out_axes)`` output-side factor.
        alpha: scale numerator (static).
        stack_axes, in_axes, out_axes: the weight's axes on each side (static);
            together they are a permutation of ``range(weight.ndim)``.
        rslora: scale by alpha / sqrt(r) instead of alpha / r.
        dropout: dropout probability on the adapter branch's input.
        magnitude: DoRA magnitude ``(*stack, *out_axes)`` or None.
        singular: AdaLoRA singular values ``(*stack, r)`` or None.
        glora: GLoRA's other support tensors (:class:`~lora_jax.GloraParts`) or None;
            ``a``, ``b`` are then its low-rank B.
    """

    a: jax.Array
    b: jax.Array
    alpha: float
    stack_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    rslora: bool = False
    dropout: float = 0.0
    magnitude: jax.Array | None = None
    singular: jax.Array | None = None
    glora: GloraParts | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def ndim(self) -> int:
        return len(self.stack_axes) + len(self.in_axes) + len(self.out_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight these factors adapt."""
        ns = len(self.stack_axes)
        sizes = dict(zip(self.stack_axes, self.a.shape[:ns]))
        sizes.update(zip(self.in_axes, self.a.shape[ns:-1]))
        sizes.update(zip(self.out_axes, self.b.shape[ns + 1 :]))
        return tuple(sizes[i] for i in range(self.ndim))

    def with_factors(self, a: jax.Array, b: jax.Array) -> LoraFactors:
        return dataclasses.replace(self, a=a, b=b)

    def effective_b(self) -> jax.Array:
        """``b`` with AdaLoRA's singular values folded in: ``(*stack, r, *out_axes)``."""
        if self.singular is None:
            return self.b
        n_out = len(self.out_axes)
        return self.b * self.singular.reshape(self.singular.shape + (1,) * n_out).astype(
            self.b.dtype
        )


def require_low_rank(t: LoraFactors, path: str, what: str) -> None:
    """Raise unless ``t``'s update is ``scale * a @ effective_b`` alone (not DoRA or GLoRA)."""
    kind = "DoRA" if t.magnitude is not None else "GLoRA" if t.glora is not None else None
    if kind is not None:
        raise ValueError(
            f"'{path}': {what} works on low-rank updates W0 + scale * a @ b, but these are "
            f"{kind} factors (their weight is not of that form); merge them with lj.merge, or "
            f"use LoRA/rsLoRA/AdaLoRA rules."
        )


def factor_specs(factors: LoraFactors) -> tuple[str, str, str]:
    """Einsum letters of ``a``, ``b`` and the weight (rank letter last in the alphabet)."""
    letters = string.ascii_letters
    w = letters[: factors.ndim]
    r = letters[-1]
    stack = "".join(w[i] for i in factors.stack_axes)
    a = stack + "".join(w[i] for i in factors.in_axes) + r
    b = stack + r + "".join(w[i] for i in factors.out_axes)
    return a, b, w


def wide_dtype(*dtypes) -> jnp.dtype:
    """float64 if any of ``dtypes`` is, else float32: where sums of weights are formed."""
    return jnp.dtype(
        jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32
    )


def lora_delta(factors: LoraFactors, dtype=None) -> jax.Array:
    """The dense update ``scale * a @ b`` in the weight's layout.

    Computed in float32 or wider (the factors' dtype if wider), then cast to ``dtype``.
    """
    a_spec, b_spec, w_spec = factor_specs(factors)
    compute = wide_dtype(factors.a.dtype)
    delta = jnp.einsum(
        f"{a_spec},{b_spec}->{w_spec}",
        factors.a.astype(compute),
        factors.effective_b().astype(compute),
        precision=jax.lax.Precision.HIGHEST,
    )
    delta = delta * jnp.asarray(factors.scale, compute)
    return delta if dtype is None else delta.astype(dtype)


def column_norm(w: jax.Array, factors: LoraFactors) -> jax.Array:
    """||W0 + delta W|| over the input axes, per (stack, out) column, without forming W0 + delta W.

    ||w + d||^2 = ||w||^2 + 2 s <a^T w, b> + s^2 b^T (a^T a) b, each term from rank-r products.
    Returns ``(*stack, *out_axes)`` in float32 (float64 for float64 inputs).
    """
    a_spec, b_spec, w_spec = factor_specs(factors)
    compute = wide_dtype(w.dtype, factors.a.dtype)
    a = factors.a.astype(compute)
    b = factors.effective_b().astype(compute)
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


def expand_columns(col: jax.Array, factors: LoraFactors) -> jax.Array:
    """A per-column array ``(*stack, *out_axes)`` with size-1 input axes inserted."""
    for ax in sorted(factors.in_axes):
        col = jnp.expand_dims(col, ax)
    return col
