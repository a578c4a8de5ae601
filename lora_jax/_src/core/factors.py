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
``variant`` holds the arrays of any other registered variant (``core/variant.py``).
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
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core import variant as _variant


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b", "magnitude", "singular", "glora", "variant"],
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
        variant: the parts (a registered pytree) of a plug-in variant, or None.
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
    glora: Any = None
    variant: Any = None

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

    def low_rank(self) -> tuple[jax.Array, jax.Array]:
        """``(a, b)`` with every variant's refinement folded in (e.g. AdaLoRA's singular
        values into ``b``): ``delta W = scale * a @ b`` of these."""
        return _variant.low_rank(self)

    def effective_b(self) -> jax.Array:
        """``b`` with the variants' refinements folded in: ``(*stack, r, *out_axes)``."""
        return self.low_rank()[1]


def bare(t: LoraFactors, a: jax.Array, b: jax.Array) -> LoraFactors:
    """Plain factors with ``t``'s static fields and the pair ``(a, b)``, no variant arrays."""
    return dataclasses.replace(t, a=a, b=b, magnitude=None, singular=None, glora=None, variant=None)


def require_low_rank(t: LoraFactors, path: str, what: str) -> None:
    """Raise unless ``t``'s update is ``scale * a @ b`` of trainable arrays on W0 alone."""
    kinds = [v.title for v in _variant.present(t) if not v.plain_low_rank]
    if kinds:
        raise ValueError(
            f"'{path}': {what} works on low-rank updates W0 + scale * a @ b, but these are "
            f"{kinds[0]} factors (their weight is not of that form); merge them with lj.merge, "
            f"or use LoRA/rsLoRA/AdaLoRA rules."
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
    a, b = factors.low_rank()
    delta = jnp.einsum(
        f"{a_spec},{b_spec}->{w_spec}",
        a.astype(compute),
        b.astype(compute),
        precision=jax.lax.Precision.HIGHEST,
    )
    delta = delta * jnp.asarray(factors.scale, compute)
    return delta if dtype is None else delta.astype(dtype)


def expand_columns(col: jax.Array, factors: LoraFactors) -> jax.Array:
    """A per-column array ``(*stack, *out_axes)`` with size-1 input axes inserted."""
    for ax in sorted(factors.in_axes):
        col = jnp.expand_dims(col, ax)
    return col
