"""Structural uses of implicit weights: concatenation, stacking, splitting, scaling, stop_gradient
and sharding constraints, all kept factored.

Concatenating ``W_i = base_i + s_i * a_i @ b_i`` along an axis held by one factor builds
block-structured factors whose ranks add up: the factor holding the axis is laid out block
by block (zeros off its own rank block), the other factor's blocks are concatenated along
the rank axis, and each ``s_i`` is folded into its block. Along an axis held by both
factors (stacked layers) the factors are concatenated as they are (ranks padded to the
largest). A plain array in the operands contributes a block of rank 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src.engine import implicit as im
from lora_jax._src.engine.implicit import Adapted, Deferred, Unfactorable


def _plain_parts(v: Adapted) -> None:
    if v.col is not None or v.shift is not None:
        raise Unfactorable("per-column terms (DoRA, GLoRA) in a concatenation")
    if isinstance(v.base, Deferred):
        raise Unfactorable("a quantised weight in a concatenation")


def _with_axis(v: Adapted, axis: int) -> Adapted:
    """``v`` with a new size-1 view axis at ``axis``, held by both factors."""
    shape = v.shape[:axis] + (1,) + v.shape[axis:]
    up = lambda m: tuple(None if ax is None else ax + (ax >= axis) for ax in m)
    a_axes, b_axes = up(v.a_axes) + (axis,), up(v.b_axes) + (axis,)
    return dataclasses.replace(
        v,
        base=v.base[(slice(None),) * axis + (None,)],
        a=v.a[..., None],
        b=v.b[..., None],
        a_axes=a_axes,
        b_axes=b_axes,
        shape=shape,
    )


def _canonical(v: Adapted) -> Adapted:
    """Factors with view axes in view order and the rank axis last."""
    return im._sorted_factors(v)


def _rank(v: Adapted) -> int:
    return v.a.shape[-1]


def concatenate(vals: Sequence[Any], axis: int, out_shape: Sequence[int]) -> Adapted:
    """The view ``concatenate(vals, axis)`` where at least one value is an ``Adapted``."""
    vals = [_canonical(v) if isinstance(v, Adapted) else v for v in vals]
    adapted = [v for v in vals if isinstance(v, Adapted)]
    for v in adapted:
        _plain_parts(v)
    first = adapted[0]
    if not first.has_factors or any(
        v.a_axes != first.a_axes or v.b_axes != first.b_axes for v in adapted
    ):
        raise Unfactorable("concatenated weights have different factor layouts")
    if len({v.dropout for v in adapted}) != 1:
        raise Unfactorable("concatenated weights have different dropout rates")
    in_a, in_b = axis in first.a_axes, axis in first.b_axes
    if not (in_a or in_b):
        raise Unfactorable("concatenation along an axis no factor holds")
    dtype = first.a.dtype
    bases = [v.base if isinstance(v, Adapted) else v for v in vals]
    base = lax.concatenate([jnp.asarray(b).astype(first.dtype) for b in bases], axis)
    parts = [v if isinstance(v, Adapted) else None for v in vals]
    fa, fb = first.a_axes.index(axis) if in_a else None, first.b_axes.index(axis) if in_b else None
    if in_a and in_b:  # a stacked axis: concatenate both factors; pad ranks to the largest
        r = max(_rank(v) for v in adapted)

        def piece(v, x, name, at):
            if v is not None:
                f = getattr(v, name).astype(dtype)
                f = f * jnp.asarray(v.scale, dtype) if name == "b" else f
                return jnp.pad(f, [(0, 0)] * (f.ndim - 1) + [(0, r - _rank(v))])
            ref = getattr(first, name)
            shape = list(ref.shape)
            shape[at] = x.shape[axis]
            shape[-1] = r
            return jnp.zeros(shape, dtype)

        a = lax.concatenate([piece(v, x, "a", fa) for v, x in zip(parts, vals)], fa)
        b = lax.concatenate([piece(v, x, "b", fb) for v, x in zip(parts, vals)], fb)
    else:  # block structure: the holder is block-diagonal in (axis, rank), the other stacks
        hold, other = ("a", "b") if in_a else ("b", "a")
        at = fa if in_a else fb
        ranks = [0 if v is None else _rank(v) for v in parts]
        total = sum(ranks)
        blocks, others, start = [], [], 0
        for v, x, rk in zip(parts, vals, ranks):
            ref = getattr(first, hold)
            shape = list(ref.shape)
            shape[at] = x.shape[axis]
            shape[-1] = total
            block = jnp.zeros(shape, dtype)
            if v is not None:
                f = getattr(v, hold).astype(dtype)
                if hold == "b":
                    f = f * jnp.asarray(v.scale, dtype)
                block = lax.dynamic_update_slice_in_dim(block, f, start, axis=block.ndim - 1)
                g = getattr(v, other).astype(dtype)
                others.append(g * jnp.asarray(v.scale, dtype) if other == "b" else g)
            blocks.append(block)
            start += rk
        held = lax.concatenate(blocks, at)
        rest = lax.concatenate(others, others[0].ndim - 1)
        a, b = (held, rest) if hold == "a" else (rest, held)
    return dataclasses.replace(first, base=base, a=a, b=b, scale=1.0, shape=tuple(out_shape))


def stack(vals: Sequence[Any], axis: int, out_shape: Sequence[int]) -> Adapted:
    """``stack(vals, axis)``: each value gains a size-1 axis held by both factors."""
    lifted = []
    for v in vals:
        if isinstance(v, Adapted):
            _plain_parts(v)
            if not v.has_factors:
                raise Unfactorable("stack of weights without factors")
            lifted.append(_with_axis(_canonical(v), axis))
        else:
            lifted.append(jnp.expand_dims(v, axis))
    return concatenate(lifted, axis, out_shape)


def split(v: Adapted, sizes: Sequence[int], axis: int) -> list[Adapted]:
    """``split(v, sizes, axis)``: each piece slices the factor(s) holding ``axis``."""
    outs, start = [], 0
    for n in sizes:
        lo = [0] * len(v.shape)
        hi = list(v.shape)
        lo[axis], hi[axis] = start, start + n
        outs.append(im.static_slice(v, lo, hi, None))
        start += n
    return outs


def scale(v: Adapted, s: jax.Array) -> Adapted:
    """``v * s`` for ``s`` a scalar or an array broadcast along some axes of the view."""
    if v.shift is not None:
        raise Unfactorable("GLoRA bias terms scaled")
    s = jnp.asarray(s)
    axes = tuple(i for i in range(s.ndim) if s.shape[i] != 1) if s.ndim else ()
    if s.ndim not in (0, len(v.shape)):
        raise Unfactorable("a product with an operand of another rank")
    base = v.map_base(lambda w: w * s.astype(w.dtype), elementwise=not axes)
    if not v.has_factors:
        return dataclasses.replace(v, base=base)
    holder = next((n for n, m in (("b", v.b_axes), ("a", v.a_axes)) if set(axes) <= set(m)), None)
    if holder is None:
        raise Unfactorable("a product with an array spanning both factors' axes")
    f, m = getattr(v, holder), getattr(v, holder + "_axes")
    if axes:
        view = im._letters(len(v.shape))
        target = "".join(im.RANK if ax is None else view[ax] for ax in m)
        vec = s.reshape([s.shape[i] for i in axes])
        f = f * im.broadcast_col(vec, axes, view, target).astype(f.dtype)
    else:
        f = f * s.astype(f.dtype)
    return dataclasses.replace(v, base=base, **{holder: f})


def stop_gradient(v: Adapted) -> Adapted:
    changes = {name: lax.stop_gradient(arr) for name, arr, _ in v.parts()}
    base = v.map_base(lax.stop_gradient, elementwise=True)
    return dataclasses.replace(v, base=base, **changes)


def constrain(v: Adapted, sharding: Any, bind_base, on_factor=lax.with_sharding_constraint):
    """A sharding constraint (or a reshard, ``on_factor=jax.sharding.reshard``): the base
    keeps it, each factor gets the matching spec."""
    base = v.map_base(bind_base)
    changes = {}
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(v.shape) - len(sharding.spec))
        for name, arr, m in v.parts():
            fspec = jax.sharding.PartitionSpec(*(None if ax is None else spec[ax] for ax in m))
            fs = jax.sharding.NamedSharding(sharding.mesh, fspec)
            changes[name] = on_factor(arr, fs)
    return dataclasses.replace(v, base=base, **changes)


def factor_specs(v: Adapted, spec: Any) -> dict[str, Any]:
    """PartitionSpecs of ``v``'s factor-like arrays for a view sharded as ``spec``."""
    full = tuple(spec) + (None,) * (len(v.shape) - len(tuple(spec)))
    P = jax.sharding.PartitionSpec
    return {name: P(*(None if ax is None else full[ax] for ax in m)) for name, _, m in v.parts()}
