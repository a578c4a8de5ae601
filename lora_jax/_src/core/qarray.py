"""The contract every quantised frozen weight follows, so the engine can treat them alike.

A quantised array is a registered pytree dataclass whose array fields may carry
leading batch (stacked-layer) axes: slicing every field along axis 0 (what
``lax.scan`` does to its ``xs``) yields the quantised array of one layer. Its
logical ``shape`` is therefore ``batch_shape + inner_shape``, computed from the
fields, never stored as a static number that slicing would make stale.
"""

from __future__ import annotations

import jax

from lora_jax._src.core.explicit import rows_like, typed_like
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

    @property
    def codes_array(self) -> jax.Array:
        """The packed codes ``(*batch, ...)``: the field every shard layout follows."""
        raise NotImplementedError

    def decode(self, dtype) -> jax.Array:
        """The dense weight in ``dtype``, computed from the fields."""
        raise NotImplementedError

    def dequantize(self, dtype=None) -> jax.Array:
        """The dense weight, shape ``self.shape``, in ``dtype`` (default ``self.dtype``).

        On a mesh with Explicit axes it is sharded as the codes: batch axes as theirs, the
        first inner axis as their flat axis (whole rows per shard).
        """
        dtype = self.dtype if dtype is None else dtype
        dense = rows_like(self.codes_array, len(self.shape))
        if dense is None:
            return self.decode(dtype)
        aval = jax.ShapeDtypeStruct(self.shape, dtype, sharding=dense)
        return typed_like(lambda q: q.decode(dtype), aval)(self)

    def quantize_like(self, x: jax.Array) -> QuantizedArray:
        """Quantise a dense ``x`` of this array's shape with the same format and settings."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes as stored: every array field, 4-bit fields two values per byte."""
        return tree_bytes(self)
