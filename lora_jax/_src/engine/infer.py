"""Infer which axes of a weight are stacked layers, inputs and outputs from how a function uses it.

The function is traced abstractly (``jax.make_jaxpr``: no FLOPs, no memory) and
each weight's axes are followed through views to its first contraction:
axes contracted with the input are the ``in_axes``, axes batched in the
contraction or sliced per step by ``lax.scan`` are ``stack_axes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from lora_jax._src.core.trees import is_node, is_weight, leaves_with_paths
from lora_jax._src.engine import jax_compat as jc
from lora_jax._src.engine.implicit import _groups, drop_whole_axes

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class _Probe:
    path: str
    origins: tuple[frozenset, ...]  # original axes behind each current axis
    stack: frozenset = frozenset()  # original axes already sliced away per layer


def _decide(p: _Probe, contracted: set, batched: set, found: dict[str, Axes], ndim: int) -> None:
    if p.path in found:
        return
    orig = lambda axes: set().union(*(p.origins[i] for i in axes)) if axes else set()
    ins = orig(contracted)
    stack = set(p.stack) | orig(batched)
    outs = set(range(ndim)) - ins - stack
    found[p.path] = (tuple(sorted(stack)), tuple(sorted(ins)), tuple(sorted(outs)))


def _reshape(p: _Probe, old: Sequence[int], new: Sequence[int]) -> _Probe:
    big_old = [i for i, s in enumerate(old) if s != 1]
    big_new = [i for i, s in enumerate(new) if s != 1]
    origins = [frozenset()] * len(new)
    for g_old, g_new in _groups([old[i] for i in big_old], [new[i] for i in big_new]):
        merged = frozenset().union(*(p.origins[big_old[i]] for i in g_old))
        for j in g_new:
            origins[big_new[j]] = merged
    return dataclasses.replace(p, origins=tuple(origins))


def _step(eqn: Any, ins: list[Any], found: dict, ndims: dict) -> list[Any]:
    op = jc.read(eqn)
    p = ins[0] if isinstance(ins[0], _Probe) else None
    n_out = len(eqn.outvars)
    passes = jc.Convert | jc.Identity | jc.ShardingConstraint | jc.Reshard | jc.StopGradient
    if isinstance(op, passes) and p:
        return [p]
    if isinstance(op, jc.Transpose) and p:
        return [dataclasses.replace(p, origins=tuple(p.origins[i] for i in op.perm))]
    if isinstance(op, jc.Reshape) and p:
        return [_reshape(p, eqn.invars[0].aval.shape, op.new_sizes)]
    if isinstance(op, jc.Squeeze) and p:
        keep = [i for i in range(len(p.origins)) if i not in op.dims]
        return [dataclasses.replace(p, origins=tuple(p.origins[i] for i in keep))]
    if isinstance(op, jc.Broadcast) and p:
        origins = [frozenset()] * len(op.shape)
        for i, d in enumerate(op.dims):
            origins[d] = p.origins[i]
        return [dataclasses.replace(p, origins=tuple(origins))]
    if isinstance(op, jc.Slice | jc.DynamicSlice) and p:
        return [p]
    if isinstance(op, jc.Split) and p:
        return [p] * n_out
    if isinstance(op, jc.Barrier):
        return list(ins)
    if isinstance(op, jc.Gather) and p:
        dn = op.params["dimension_numbers"]
        n_batch = len(eqn.invars[1].aval.shape) - 1
        if n_batch == 0:  # one layer picked out of a stack
            gone = set(dn.collapsed_slice_dims)
            stack = p.stack | frozenset().union(*(p.origins[i] for i in gone))
            kept = tuple(o for i, o in enumerate(p.origins) if i not in gone)
            return [dataclasses.replace(p, origins=kept, stack=stack)]
        _, prm = drop_whole_axes(eqn.invars[0].aval.shape, None, op.params)
        dn = prm["dimension_numbers"]
        _decide(p, set(dn.start_index_map), set(), found, ndims[p.path])
        return [None]
    if isinstance(op, jc.Dot):
        (lc, rc), (lb, rb) = op.dimension_numbers
        for q, c, b in ((ins[0], lc, lb), (ins[1], rc, rb)):
            if isinstance(q, _Probe):
                _decide(q, set(c), set(b), found, ndims[q.path])
        return [None]
    if isinstance(op, jc.RaggedDot) and isinstance(ins[1], _Probe):
        (_, rc), _ = op.dimension_numbers.dot_dimension_numbers
        groups = set(op.dimension_numbers.rhs_group_dimensions)
        _decide(ins[1], set(rc), groups, found, ndims[ins[1].path])
        return [None]
    if isinstance(op, jc.Conv) and isinstance(ins[1], _Probe):
        rhs = op.params["dimension_numbers"].rhs_spec
        _decide(ins[1], {rhs[1], *rhs[2:]}, set(), found, ndims[ins[1].path])
        return [None]
    if isinstance(op, jc.Call | jc.Custom | jc.Remat | jc.ShardMap):
        return _walk(op.body.jaxpr, ins, found, ndims)
    if isinstance(op, jc.Scan):
        start = op.num_consts + op.num_carry
        body_ins = list(ins[:start])
        for q in ins[start:]:
            if isinstance(q, _Probe):
                q = dataclasses.replace(q, origins=q.origins[1:], stack=q.stack | q.origins[0])
            body_ins.append(q)
        _walk(op.body.jaxpr, body_ins, found, ndims)
        return [None] * n_out
    if isinstance(op, jc.Cond):
        for branch in op.branches:
            _walk(branch.jaxpr, ins[1:], found, ndims)
        return [None] * n_out
    if isinstance(op, jc.While):
        _walk(op.body.jaxpr, ins[op.cond_nconsts :], found, ndims)
        return [None] * n_out
    return [None] * n_out


def _walk(jaxpr: Any, inputs: Sequence[Any], found: dict, ndims: dict) -> list[Any]:
    env: dict = dict(zip(jaxpr.invars, inputs))
    read = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if any(isinstance(x, _Probe) for x in ins):
            outs = _step(eqn, ins, found, ndims)
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def infer_axes(
    fn: Callable,
    params: Any,
    paths: Sequence[str],
    args: Sequence[Any],
    kwargs: dict,
    argnum: int,
    optional: Sequence[str] = (),
) -> dict[str, Axes]:
    """(stack_axes, in_axes, out_axes) of each weight in ``paths`` from its first use in ``fn``.

    Leaves of ``params`` that are not arrays (an Equinox module's functions) are closed over.

    Raises:
        ValueError: a weight in ``paths`` but not in ``optional`` is never contracted with
            anything inside ``fn``.
    """
    items = leaves_with_paths(params)
    treedef = jax.tree.structure(params, is_leaf=is_node)
    arrays = [i for i, (_, w) in enumerate(items) if is_weight(w)]

    def call(vals, a, k):
        leaves = [w for _, w in items]
        for i, v in zip(arrays, vals):
            leaves[i] = v
        return fn(*a[:argnum], jax.tree.unflatten(treedef, leaves), *a[argnum:], **k)

    abstract = [jax.ShapeDtypeStruct(items[i][1].shape, items[i][1].dtype) for i in arrays]
    closed = jax.make_jaxpr(call)(abstract, tuple(args), kwargs)
    wanted = set(paths)
    probes = [
        _Probe(p, tuple(frozenset([j]) for j in range(len(w.shape)))) if p in wanted else None
        for p, w in (items[i] for i in arrays)
    ]
    n_rest = len(jc.closed(closed).jaxpr.invars) - len(probes)
    found: dict[str, Axes] = {}
    ndims = {p: len(w.shape) for p, w in items if p in wanted}
    _walk(jc.closed(closed).jaxpr, probes + [None] * n_rest, found, ndims)
    missing = [p for p in paths if p not in found and p not in set(optional)]
    if missing:
        raise ValueError(
            f"could not infer the input axes of {missing}: the function never contracts them "
            f"(dot_general, conv or lookup); set LoraRule(in_axes=..., stack_axes=...)."
        )
    return found
