"""LoraFactors: the trainable low-rank pair that replaces one frozen weight's update.

Conventions (the one place they are written down):

=========  ===========================  ===========================  =========
factor     lora_jax                     PEFT (torch)                 init
=========  ===========================  ===========================  =========
``a``      ``(*stack, *in_axes, r)``    ``lora_A.weight (r, in)``    random
``b``      ``(*stack, r, *out_axes)``   ``lora_B.weight (out, r)``   zeros
=========  ===========================  ===========================  =========

delta W = scale * a @ b, contracted over r, with scale = alpha / r
(alpha / sqrt(r) for rsLoRA). ``in_axes`` are the weight's axes that the
function contracts with its input (for a Flax kernel ``(in, out)``: axis 0; for
an embedding table ``(vocab, dim)``: the vocab axis); ``out_axes`` are the
rest. ``stack_axes`` index stacked layers and appear in both factors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

import jax
import jax.numpy as jnp


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b"],
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
    """

    a: jax.Array
    b: jax.Array
    alpha: float
    stack_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    rslora: bool = False
    dropout: float = 0.0

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
    return jnp.dtype(jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32)


def lora_delta(factors: LoraFactors, dtype=None) -> jax.Array:
    """The dense update ``scale * a @ b`` in the weight's layout.

    Computed in float32 or wider (the factors' dtype if wider), then cast to ``dtype``.
    """
    a_spec, b_spec, w_spec = factor_specs(factors)
    compute = wide_dtype(factors.a.dtype)
    delta = jnp.einsum(
        f"{a_spec},{b_spec}->{w_spec}",
        factors.a.astype(compute),
        factors.b.astype(compute),
        precision=jax.lax.Precision.HIGHEST,
    )
    delta = delta * jnp.asarray(factors.scale, compute)
    return delta if dtype is None else delta.astype(dtype)
