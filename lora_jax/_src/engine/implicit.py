"""Adapted: an adapted weight kept implicit as ``base + scale * (a ⊗ b)`` while a program runs.

The engine (``interpreter.py``) carries one ``Adapted`` per adapted (or quantised)
weight through a traced program. Views of the weight (transpose, reshape,
slices, gathers, dtype casts) are applied to the base and, axis by axis, to the
factors; uses (``dot_general``, ``conv_general_dilated``) compute the base term
and a low-rank term separately, so ``W0 + scale * a @ b`` is never formed.

Each factor records, for each of its axes, which axis of the current view it
spans (``None`` for the rank axis). A view axis may belong to ``a``, to ``b``
or to both (stacked-layer axes). The view equals
``base * col + scale * einsum(a, b)`` with letters given by those maps
(``col`` scales the base per column: DoRA folds it into ``b`` too, GLoRA's A
does not). ``shift`` (GLoRA's bias terms) is no part of the weight: each use
adds it to its output, per output column.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src.core.qarray import QuantizedArray

AxisMap = tuple[int | None, ...]


class Unfactorable(Exception):
    """Raised internally when a use or view cannot keep the factors apart."""


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A quantised base plus the views to replay after dequantising it at its point of use."""

    q: QuantizedArray
    ops: tuple[Callable[[jax.Array], jax.Array], ...] = ()
    per_layer: bool = True  # every op acts elementwise, so it may be replayed per layer slice

    def with_q(self, q: QuantizedArray) -> Deferred:
        """The same views over another (e.g. traced or sliced) quantised array."""
        return Deferred(q, self.ops, self.per_layer)

    def value(self) -> jax.Array:
        w = self.q.dequantize()
        for op in self.ops:
            w = op(w)
        return w


@dataclasses.dataclass(frozen=True)
class Adapted:
    """An implicit weight view: ``base + scale * einsum(a, b)`` (factors may be absent)."""

    base: jax.Array | Deferred
    a: jax.Array | None
    b: jax.Array | None
    a_axes: AxisMap
    b_axes: AxisMap
    scale: float
    shape: tuple[int, ...]
    dtype: Any
    path: str
    dropout: float = 0.0
    indexed: bool = False  # rows were gathered: materialising is the factored lookup
    col: jax.Array | None = None  # per-column scale of the base (DoRA, GLoRA's A)
    col_axes: AxisMap = ()
    shift: jax.Array | None = None  # per-column term added to each use's output (GLoRA's bias)
    shift_axes: AxisMap = ()

    @property
    def has_factors(self) -> bool:
        return self.a is not None

    def base_value(self) -> jax.Array:
        return self.base.value() if isinstance(self.base, Deferred) else self.base

    def map_base(
        self, op: Callable[[jax.Array], jax.Array], elementwise: bool = False
    ) -> jax.Array | Deferred:
        if isinstance(self.base, Deferred):
            d = self.base
            return Deferred(d.q, d.ops + (op,), d.per_layer and elementwise)
        return op(self.base)

    def owners(self, axis: int) -> list[str]:
        return [n for n, m in (("a", self.a_axes), ("b", self.b_axes)) if axis in m]

    def parts(self):
        """(name, array, axis map) of each factor-like array present: a, b, col and shift."""
        for name in PARTS:
            arr = getattr(self, name)
            if arr is not None:
                yield name, arr, getattr(self, name + "_axes")


PARTS = ("a", "b", "col", "shift")


def _letters(n: int) -> str:
    return string.ascii_letters[:n]


RANK = "Z"  # rank letter; view/operand letters come from the lowercase pool first


def factor_specs(v: Adapted, view: str) -> tuple[str, str]:
    """Einsum specs of ``a`` and ``b`` given the letters of the view's axes."""
    spec = lambda m: "".join(RANK if ax is None else view[ax] for ax in m)
    return spec(v.a_axes), spec(v.b_axes)


def delta(v: Adapted) -> jax.Array:
    """``scale * einsum(a, b)`` in the view's layout and dtype (only when rows were gathered
    or a use cannot be factored: this is the one place the product is formed)."""
    view = _letters(len(v.shape))
    sa, sb = factor_specs(v, view)
    a, b = v.a.astype(v.dtype), v.b.astype(v.dtype)
    d = jnp.einsum(f"{sa},{sb}->{view}", a * jnp.asarray(v.scale, v.dtype), b)
    return jnp.broadcast_to(d, v.shape)


def broadcast_col(col: jax.Array, col_axes: AxisMap, letters: str, target: str) -> jax.Array:
    """``col`` (axes ``col_axes`` of a view lettered ``letters``) laid out along ``target``
    letters, with size-1 axes for letters it does not span."""
    spec = [letters[ax] for ax in col_axes]
    order = sorted(range(len(spec)), key=lambda i: target.index(spec[i]))
    col = jnp.transpose(col, order)
    shape = [col.shape[order.index(spec.index(c))] if c in spec else 1 for c in target]
    return col.reshape(shape)


def materialize(v: Adapted) -> jax.Array:
    base = v.base_value()
    if v.col is not None:
        view = _letters(len(v.shape))
        base = base * broadcast_col(v.col, v.col_axes, view, view).astype(base.dtype)
    return base + delta(v).astype(base.dtype) if v.has_factors else base


# ----------------------------------------------------------------------------- views


def _renumber(v: Adapted, mapping: dict[int, int | None], **changes) -> Adapted:
    """Move view axes by ``mapping`` (old -> new); factor axes of dropped view axes must be
    squeezed by the caller beforehand."""
    ren = lambda m: tuple(None if ax is None else mapping[ax] for ax in m)
    return dataclasses.replace(
        v,
        a_axes=ren(v.a_axes),
        b_axes=ren(v.b_axes),
        col_axes=ren(v.col_axes),
        shift_axes=ren(v.shift_axes),
        **changes,
    )


def _drop_axes(v: Adapted, axes: Sequence[int]) -> Adapted:
    """Remove size-1 view axes from the factors that hold them."""
    axes = set(axes)
    new = {}
    for name, arr, m in v.parts():
        pos = [i for i, ax in enumerate(m) if ax in axes]
        new[name] = jnp.squeeze(arr, axis=tuple(pos)) if pos else arr
        new[name + "_axes"] = tuple(ax for ax in m if ax not in axes)
    keep = [i for i in range(len(v.shape)) if i not in axes]
    shape = tuple(v.shape[i] for i in keep)
    v = dataclasses.replace(v, **new)
    return _renumber(v, {old: i for i, old in enumerate(keep)}, shape=shape)


def transpose(v: Adapted, perm: Sequence[int]) -> Adapted:
    inv = {old: new for new, old in enumerate(perm)}
    base = v.map_base(lambda w: lax.transpose(w, tuple(perm)))
    return _renumber(v, inv, base=base, shape=tuple(v.shape[p] for p in perm))


def convert(v: Adapted, dtype) -> Adapted:
    base = v.map_base(lambda w: w.astype(dtype), elementwise=True)
    return dataclasses.replace(v, base=base, dtype=dtype)


def squeeze(v: Adapted, dims: Sequence[int]) -> Adapted:
    dims = tuple(d % len(v.shape) for d in dims)
    base = v.map_base(lambda w: lax.squeeze(w, dims))
    return dataclasses.replace(_drop_axes(v, dims), base=base)


def _sorted_factors(v: Adapted) -> Adapted:
    """Transpose each factor so its view axes run in view order (rank axis last)."""
    changes: dict[str, Any] = {}
    for name, arr, m in v.parts():
        order = sorted(range(len(m)), key=lambda i: len(m) if m[i] is None else m[i])
        changes[name] = jnp.transpose(arr, order)
        changes[name + "_axes"] = tuple(m[i] for i in order)
    return dataclasses.replace(v, **changes)


def _groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of axes with equal products (both shapes free of size-1 axes)."""
    groups, i, j = [], 0, 0
    while i < len(old):
        gi, gj, po, pn = [i], [j], old[i], new[j]
        while po != pn:
            if po < pn:
                i += 1
                gi.append(i)
                po *= old[i]
            else:
                j += 1
                gj.append(j)
                pn *= new[j]
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    return groups


def reshape(v: Adapted, new_shape: Sequence[int]) -> Adapted:
    """Reshape the view; axes merged or split must all sit in the same factor(s), in order."""
    new_shape = tuple(int(s) for s in new_shape)
    base = v.map_base(lambda w: w.reshape(new_shape))
    ones = [i for i, s in enumerate(v.shape) if s == 1]
    u = _sorted_factors(_drop_axes(v, ones) if ones else v)
    new_big = [i for i, s in enumerate(new_shape) if s != 1]
    groups = _groups(u.shape, [new_shape[i] for i in new_big])
    changes: dict[str, Any] = {}
    for name, arr, m in u.parts():
        shape, axes = [], []
        pos = 0
        while pos < len(m):
            ax = m[pos]
            if ax is None:
                shape.append(arr.shape[pos])
                axes.append(None)
                pos += 1
                continue
            old_g, new_g = next(g for g in groups if ax in g[0])
            run = list(m[pos : pos + len(old_g)])
            if run != old_g:
                raise Unfactorable(f"reshape {v.shape}->{new_shape} mixes factor axes")
            shape += [new_shape[new_big[k]] for k in new_g]
            axes += [new_big[k] for k in new_g]
            pos += len(old_g)
        changes[name] = arr.reshape(shape)
        changes[name + "_axes"] = tuple(axes)
    # Axes of a group must belong to the same factors: check every group is whole in each.
    for old_g, _ in groups:
        owner_sets = {tuple(u.owners(ax)) for ax in old_g}
        if len(owner_sets) != 1:
            raise Unfactorable(f"reshape {v.shape}->{new_shape} merges a- and b-side axes")
    new_ones = [i for i, s in enumerate(new_shape) if s == 1]
    if new_ones and u.a is not None:
        a = changes["a"]
        changes["a"] = a.reshape(a.shape[:-1] + (1,) * len(new_ones) + a.shape[-1:])
        changes["a_axes"] = changes["a_axes"][:-1] + tuple(new_ones) + (None,)
    return dataclasses.replace(u, base=base, shape=new_shape, **changes)


def broadcast_in_dim(v: Adapted, shape: Sequence[int], dims: Sequence[int]) -> Adapted:
    shape = tuple(shape)
    base = v.map_base(lambda w: lax.broadcast_in_dim(w, shape, tuple(dims)))
    u = _renumber(v, dict(enumerate(dims)))
    changes: dict[str, Any] = {}
    new_axes = [i for i in range(len(shape)) if i not in dims]
    for name, arr, m in u.parts():
        target = tuple(arr.shape[i] if ax is None else shape[ax] for i, ax in enumerate(m))
        if name == "a" and new_axes:
            arr = arr.reshape(arr.shape[:-1] + (1,) * len(new_axes) + arr.shape[-1:])
            m = m[:-1] + tuple(new_axes) + (None,)
            target = target[:-1] + tuple(shape[i] for i in new_axes) + target[-1:]
        changes[name] = jnp.broadcast_to(arr, target)
        changes[name + "_axes"] = m
    return dataclasses.replace(u, base=base, shape=shape, **changes)


def _factor_slice(v: Adapted, fn: Callable[[jax.Array, AxisMap], jax.Array]) -> dict[str, Any]:
    return {name: fn(arr, m) for name, arr, m in v.parts()}


def static_slice(v: Adapted, start, limit, strides) -> Adapted:
    strides = strides or (1,) * len(v.shape)
    base = v.map_base(lambda w: lax.slice(w, start, limit, strides))

    def cut(arr, m):
        st = [0 if ax is None else start[ax] for ax in m]
        li = [arr.shape[i] if ax is None else limit[ax] for i, ax in enumerate(m)]
        sd = [1 if ax is None else strides[ax] for ax in m]
        return lax.slice(arr, st, li, sd)

    shape = tuple(len(range(s, e, d)) for s, e, d in zip(start, limit, strides))
    return dataclasses.replace(v, base=base, shape=shape, **_factor_slice(v, cut))


def dynamic_slice(v: Adapted, starts: Sequence[Any], sizes: Sequence[int]) -> Adapted:
    base = v.map_base(lambda w: lax.dynamic_slice(w, starts, sizes))

    def cut(arr, m):
        st = [0 if ax is None else starts[ax] for ax in m]
        sz = [arr.shape[i] if ax is None else sizes[ax] for i, ax in enumerate(m)]
        return lax.dynamic_slice(arr, st, sz)

    return dataclasses.replace(v, base=base, shape=tuple(sizes), **_factor_slice(v, cut))


def drop_whole_axes(shape: Sequence[int], indices: Any, params: dict) -> tuple[Any, dict]:
    """``(indices, params)`` of the same gather without the axes it slices whole.

    ``jax.vmap`` of ``w[i]`` (how ``eqx.nn.Embedding`` is called) gathers with a start
    index on every axis of ``w``, the row's columns taken whole from a start that clamping
    (``CLIP``) or the caller's promise (``PROMISE_IN_BOUNDS``) pins to 0: such an axis is
    not indexed at all.
    """
    dn, sizes = params["dimension_numbers"], params["slice_sizes"]
    modes = (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    whole = [
        i
        for i, ax in enumerate(dn.start_index_map)
        if sizes[ax] == shape[ax] and ax not in dn.collapsed_slice_dims
    ]
    if not whole or len(whole) == len(dn.start_index_map) or params["mode"] not in modes:
        return indices, params
    keep = [i for i in range(len(dn.start_index_map)) if i not in whole]
    dn = dn._replace(start_index_map=tuple(dn.start_index_map[i] for i in keep))
    indices = None if indices is None else indices[..., jnp.asarray(keep)]
    return indices, {**params, "dimension_numbers": dn}


def gather(v: Adapted, indices: jax.Array, params: dict) -> Adapted:
    """Gather rows of the view: the factor(s) holding the indexed axes gather the same rows."""
    indices, params = drop_whole_axes(v.shape, indices, params)
    dn = params["dimension_numbers"]
    if dn.operand_batching_dims:
        raise Unfactorable("gather with operand batching dims")
    sizes = params["slice_sizes"]
    # An index into an axis sliced whole (what jax.vmap makes of a per-example ``w[i]``)
    # can only start at 0 once clipped: that axis is not indexed.
    clip = params["mode"] in (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    pos = [
        k
        for k, ax in enumerate(dn.start_index_map)
        if not (clip and sizes[ax] == v.shape[ax] and ax not in dn.collapsed_slice_dims)
    ]
    start_map = tuple(dn.start_index_map[k] for k in pos)
    f_indices = indices
    if len(pos) != len(dn.start_index_map):
        f_indices = jnp.stack([indices[..., k] for k in pos], axis=-1)
    indexed = set(start_map) | set(dn.collapsed_slice_dims)
    holders = []
    for name, _, m in v.parts():
        held = indexed & set(m)
        if held and held != indexed:
            raise Unfactorable("gather indexes axes held by different factors")
        if held:
            holders.append(name)
    if not {"a", "b"} & set(holders):
        raise Unfactorable("gather indexes no factor axis")

    base = v.map_base(lambda w: lax.gather(w, indices, **params))
    out_rank = len(indices.shape) - 1 + len(v.shape) - len(dn.collapsed_slice_dims)
    batch_pos = [i for i in range(out_rank) if i not in dn.offset_dims]
    kept = [ax for ax in range(len(v.shape)) if ax not in dn.collapsed_slice_dims]
    out_pos = dict(zip(kept, dn.offset_dims))
    changes: dict[str, Any] = {}
    for name, arr, m in v.parts():
        if name in holders:
            fkept = [i for i, ax in enumerate(m) if ax not in dn.collapsed_slice_dims]
            nb = len(indices.shape) - 1
            fdn = lax.GatherDimensionNumbers(
                offset_dims=tuple(range(nb, nb + len(fkept))),
                collapsed_slice_dims=tuple(m.index(ax) for ax in dn.collapsed_slice_dims),
                start_index_map=tuple(m.index(ax) for ax in start_map),
            )
            fsizes = tuple(arr.shape[i] if ax is None else sizes[ax] for i, ax in enumerate(m))
            changes[name] = lax.gather(
                arr,
                f_indices,
                fdn,
                fsizes,
                indices_are_sorted=params["indices_are_sorted"],
                unique_indices=params["unique_indices"],
                mode=params["mode"],
                fill_value=params["fill_value"],
            )
            changes[name + "_axes"] = tuple(batch_pos) + tuple(
                None if m[i] is None else out_pos[m[i]] for i in fkept
            )
        else:
            lim = [arr.shape[i] if ax is None else sizes[ax] for i, ax in enumerate(m)]
            changes[name] = lax.slice(arr, [0] * arr.ndim, lim)
            changes[name + "_axes"] = tuple(None if ax is None else out_pos[ax] for ax in m)
    shape = tuple(jax.eval_shape(lambda w: lax.gather(w, indices, **params), _sds(v)).shape)
    return dataclasses.replace(v, base=base, shape=shape, indexed=True, **changes)


def _sds(v: Adapted) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(v.shape, v.dtype)
