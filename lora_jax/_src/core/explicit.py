"""Our own arithmetic on meshes with Explicit axes (``jax.make_mesh``'s default).

On an Explicit-axis mesh every operation's output sharding is part of its type, and a
contraction over a sharded axis (or a table lookup) has no default: the user's ``fn``
names one with ``out_sharding=``. The terms the library adds (``x @ a``, then ``@ b``; a
dequantised base) carry no such annotation, so they run with those axes treated as Auto
(``jax.sharding.auto_axes``) and come out with the sharding of the value they stand for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def explicit_axes(aval: Any) -> tuple[str, ...]:
    """The Explicit mesh axes in the type of ``aval`` (an array, tracer or ShapedArray)."""
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return ()
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def explicit_spec(x: Any) -> tuple | None:
    """One PartitionSpec entry per axis of ``x``'s type, or None off an Explicit-axis mesh."""
    aval = jax.typeof(x)
    if not explicit_axes(aval):
        return None
    spec = tuple(aval.sharding.spec)
    return spec + (None,) * (aval.ndim - len(spec))


def typed_like(f: Callable[..., jax.Array], aval: Any) -> Callable[..., jax.Array]:
    """``f`` with its result sharded as ``aval``; inside, the Explicit axes are Auto."""
    axes = explicit_axes(aval)
    if not axes:
        return f
    return jax.sharding.auto_axes(f, axes=axes, out_sharding=aval.sharding)


def rows_like(codes: Any, ndim: int) -> Any:
    """The sharding of a dense ``ndim``-D weight whose flat ``(*batch, n)`` codes are ``codes``.

    Batch axes keep their entries and the flat axis's entry goes to the first inner axis
    (a shard of whole rows; see ``nf4_shardings``). None off an Explicit-axis mesh.
    """
    spec = explicit_spec(codes)
    if spec is None:
        return None
    dense = spec + (None,) * (ndim - len(spec))
    return NamedSharding(jax.typeof(codes).sharding.mesh, PartitionSpec(*dense))
