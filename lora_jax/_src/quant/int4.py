"""Symmetric int4 quantisation with a float32 scale per block: the second packed format.

Per matrix of ``n`` elements (flattened row-major, float32), with ``nb = ceil(n / block)``:

=======  ===============  =======  ====================================================
field    shape            dtype    meaning
=======  ===============  =======  ====================================================
codes    ``(*batch, n)``  int4     ``round(x / scale)`` (half to even), in [-7, 7]
scale    ``(*batch, nb)`` float32  ``max |x| / 7`` per block
=======  ===============  =======  ====================================================

A weight dequantises to ``float32(code * scale)`` cast to the compute dtype; the error
is at most ``scale / 2`` (plus float32 rounding). XLA stores ``int4`` two per byte, so a
weight costs ``4 + 32 / block`` bits (4.5 at block 64).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.quant.nf4 import (
    _TINY,
    check_field,
    check_quantize_args,
    check_static,
    is_arraylike,
    num_blocks,
    to_blocks,
    true_divide,
)

INT4_MAX = 7  # symmetric range [-7, 7]; -8 is never produced


@functools.partial(jax.jit, static_argnames=("block_size",))
def int4_encode(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(*batch, n)`` float32 -> codes ``(*batch, n)`` int4, scale ``(*batch, nb)`` float32."""
    blocks = to_blocks(flat, block_size)
    scale = true_divide(jnp.max(jnp.abs(blocks), axis=-1), jnp.float32(INT4_MAX))
    q = jnp.round(true_divide(blocks, jnp.maximum(scale, _TINY)[..., None]))
    q = jnp.clip(q, -INT4_MAX, INT4_MAX).astype(jnp.int4)
    return q.reshape(*flat.shape[:-1], -1)[..., : flat.shape[-1]], scale


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale"],
    meta_fields=["inner_shape", "dtype", "block_size"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4Array(QuantizedArray):
    """A weight stored as int4 codes with a float32 scale per block (see the module table).

    Invariants (checked on construction from arrays): ``codes`` is int4
    ``(*batch, prod(inner_shape))`` and ``scale`` float32 ``(*batch, nb)``; slicing both on
    axis 0 gives one stacked layer.

    Attributes:
        codes, scale: the arrays of the table above.
        inner_shape: shape of one matrix (static); ``shape`` is ``batch + inner_shape``.
        dtype: the dtype the weight had, and dequantises to by default (static).
        block_size: elements per scale (static).
    """

    codes: Any
    scale: Any = None
    inner_shape: tuple[int, ...] = ()
    dtype: Any = None
    block_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "inner_shape", tuple(self.inner_shape))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if is_arraylike(self.codes) and (self.scale is None or is_arraylike(self.scale)):
            self._validate()

    def _validate(self) -> None:
        cls = "Int4Array"
        check_static(cls, self.inner_shape, self.dtype, self.block_size)
        if len(self.codes.shape) < 1:
            raise ValueError(f"{cls}: codes must have at least 1 dim, got shape ().")
        batch = tuple(self.codes.shape[:-1])
        n = math.prod(self.inner_shape)
        what = f"inner_shape={self.inner_shape}, batch={batch}, block_size={self.block_size}"
        check_field(cls, "codes", self.codes, batch + (n,), jnp.int4, what)
        nb = num_blocks(n, self.block_size)
        check_field(cls, "scale", self.scale, batch + (nb,), jnp.float32, what)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1]) + self.inner_shape

    def quantize_like(self, x: jax.Array) -> Int4Array:
        stack = len(self.shape) - len(self.inner_shape)
        return quantize_int4(x, block_size=self.block_size, stack_axes=stack)

    @property
    def codes_array(self) -> jax.Array:
        return self.codes

    def decode(self, dtype) -> jax.Array:
        """The dense weight ``(*batch, *inner_shape)`` in ``dtype``."""
        n = self.codes.shape[-1]
        values = to_blocks(self.codes.astype(jnp.float32), self.block_size)
        flat = (values * self.scale[..., None]).reshape(*self.codes.shape[:-1], -1)[..., :n]
        return flat.reshape(self.shape).astype(dtype)


def quantize_int4(x: jax.Array, *, block_size: int = 64, stack_axes: int = 0) -> Int4Array:
    """Quantise ``x`` to symmetric int4 with one float32 scale per ``block_size`` elements.

    Args:
        x: float array ``(*stack, *inner)``; cast to float32 first.
        block_size: elements per scale.
        stack_axes: number of leading axes indexing stacked layers, quantised separately.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> q = lj.quantize_int4(w, block_size=32)
        >>> q.codes.dtype, q.scale.shape
        (dtype(int4), (64,))
        >>> bool(jnp.all(jnp.abs(lj.dequantize_int4(q) - w) <= q.scale.max() / 2 + 1e-6))
        True
    """
    inner = check_quantize_args(x, block_size, stack_axes, "quantize_int4")
    batch = tuple(x.shape[:stack_axes])
    flat = jnp.asarray(x).astype(jnp.float32).reshape(*batch, math.prod(inner))
    codes, scale = int4_encode(flat, block_size)
    return Int4Array(
        codes=codes, scale=scale, inner_shape=inner, dtype=x.dtype, block_size=block_size
    )


def dequantize_int4(q: Int4Array, dtype=None) -> jax.Array:
    """The dense weight of ``q`` in ``dtype`` (default: the dtype it was quantised from)."""
    if not isinstance(q, Int4Array):
        raise TypeError(f"dequantize_int4 expects an Int4Array, got {type(q).__name__}.")
    return q.dequantize(dtype)
