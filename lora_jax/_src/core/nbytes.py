"""The one byte counter: bytes of arrays as stored, 4-bit dtypes two per byte.

``lj.summary``, ``lj.memory_report`` and ``QuantizedArray.nbytes`` all count with it, so they
agree for every quantised type. Works on abstract ``jax.ShapeDtypeStruct`` trees too.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def array_bytes(x: Any) -> int:
    """Bytes of one array (or ShapeDtypeStruct) as stored; 4-bit dtypes pack two per byte.

    Example:
        >>> import jax.numpy as jnp
        >>> array_bytes(jnp.zeros((3, 5), jnp.int4)), array_bytes(jnp.zeros(3, jnp.bfloat16))
        (8, 6)
    """
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        bits = jnp.iinfo(dtype).bits
    elif jnp.issubdtype(dtype, jnp.floating):
        bits = jnp.finfo(dtype).bits
    else:
        bits = 8 * dtype.itemsize
    return math.ceil(math.prod(x.shape) * bits / 8)


def tree_bytes(tree: Any) -> int:
    """Bytes held by every array leaf of ``tree`` (quantised arrays by their packed fields)."""
    return sum(array_bytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
