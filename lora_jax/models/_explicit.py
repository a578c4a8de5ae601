"""Model code that also runs on meshes with Explicit axes (``jax.make_mesh``'s default).

On such a mesh a gather, and a reshape that splits or merges a sharded axis, have no
default output sharding. The reference models shard activations by batch rows only
(data parallelism; weights may be sharded in any way the base's own ops allow), so both
helpers keep the sharding of the leading axis and replicate the rest. Off an
Explicit-axis mesh they are ``jnp.take`` and ``reshape``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lora_jax._src.core.explicit import explicit_spec


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``table[ids]``: ``(vocab, d)`` and ``(*batch)`` ints -> ``(*batch, d)``, sharded
    as ``ids``."""
    spec = explicit_spec(ids)
    if spec is None:
        return jnp.take(table, ids, axis=0)
    return table.at[ids].get(mode="fill", out_sharding=PartitionSpec(*spec, None))


def reshape_rows(x: jax.Array, *shape: int) -> jax.Array:
    """``x.reshape(shape)`` where only the leading axis is split or merged; it keeps its
    sharding (``(batch * seq, d)`` <-> ``(batch, seq, ...)``)."""
    spec = explicit_spec(x)
    if spec is None:
        return x.reshape(shape)
    out = PartitionSpec(spec[0], *(None,) * (len(shape) - 1))
    return jnp.reshape(x, shape, out_sharding=out)
