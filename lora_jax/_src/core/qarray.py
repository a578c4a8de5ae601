"""The contract every quantised frozen weight follows, so the engine can treat them alike.

A quantised array is a registered pytree dataclass whose array fields may carry
leading batch (stacked-layer) axes: slicing every field along axis 0 (what
``lax.scan`` does to its ``xs``) yields the quantised array of one layer. Its
logical ``shape`` is therefore ``batch_shape + inner_shape``, computed from the
fields, never stored as a static number that slicing would make stale.
"""

from __future__ import annotations

import jax

from lora_jax._src.core.nbytes import tree_bytes


class QuantizedArray:
    """Base class of packed low-bit weights (NF4, int4). Subclasses implement these."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dtype(self):
        """The dtype the weight had before quantisation (and dequantises to by default)."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense weight, shape ``self.shape``, in ``dtype`` (default ``self.dtype``)."""
        raise NotImplementedError

    def quantize_like(self, x: jax.Array) -> QuantizedArray:
        """Quantise a dense ``x`` of this array's shape with the same format and settings."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes as stored: every array field, 4-bit fields two values per byte."""
        return tree_bytes(self)
