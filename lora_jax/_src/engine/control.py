"""Higher-order primitives re-entered with implicit weights inside.

Each rule gets the equation's typed record (:mod:`~lora_jax._src.engine.jax_compat`), its
inputs (some ``Adapted``), the per-call context and ``run`` (the interpreter), and re-binds
the primitive through its public API (``lax.scan``, ``lax.while_loop``, ``lax.switch``,
``jax.checkpoint``, ``jax.jit``, ``jax.shard_map``) over the factors' arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from lora_jax._src.engine import blocks
from lora_jax._src.engine import jax_compat as jc
from lora_jax._src.engine.implicit import PARTS, Adapted, Deferred, Unfactorable

Run = Callable[..., list]


def pack(vals: Sequence[Any]) -> tuple[list[Any], list[int], Callable[[Sequence[Any]], list]]:
    """Array leaves of ``vals`` (an ``Adapted`` becomes its arrays), the number of leaves of
    each value, and the function that rebuilds the values from new leaves."""
    leaves, specs = [], []
    for v in vals:
        if isinstance(v, Adapted):
            parts = {name: getattr(v, name) for name in PARTS}
            base = v.base.q if isinstance(v.base, Deferred) else v.base
            flat, tree = jax.tree.flatten((base, parts))
            specs.append((v, tree, len(leaves), len(flat)))
            leaves += flat
        else:
            specs.append((None, None, len(leaves), 1))
            leaves.append(v)

    def rebuild(new_leaves: Sequence[Any]) -> list[Any]:
        out = []
        for v, tree, i, n in specs:
            if v is None:
                out.append(new_leaves[i])
                continue
            base, parts = jax.tree.unflatten(tree, new_leaves[i : i + n])
            if isinstance(v.base, Deferred):
                base = v.base.with_q(base)
            out.append(dataclasses.replace(v, base=base, **parts))
        return out

    return leaves, [n for _, _, _, n in specs], rebuild


def _per_leaf(flags: Sequence[Any], counts: Sequence[int]) -> list[Any]:
    """Repeat each value's flag over its leaves."""
    return [f for f, n in zip(flags, counts) for _ in range(n)]


def barrier(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """``optimization_barrier`` over the factors and other operands; the frozen bases pass a
    barrier of their own (in one, autodiff would compute a dead cotangent of each base)."""
    leaves, counts, rebuild = pack(invals)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    base_at = [s for s, v in zip(starts, invals) if isinstance(v, Adapted)]
    rest = [i for i in range(len(leaves)) if i not in base_at]
    out = list(leaves)
    for group in (base_at, rest):
        if group:
            for i, y in zip(group, jc.bind_raw(eqn, [leaves[i] for i in group])):
                out[i] = y
    return rebuild(out)


def call(op: jc.Call, invals: Sequence[Any], ctx: Any, run: Run) -> list[Any]:
    if op.jit is None:
        return run(op.body.jaxpr, op.body.consts, invals, ctx)
    leaves, counts, rebuild = pack(invals)
    s = op.jit

    def body(*leaves):
        return ctx.dense_all(run(op.body.jaxpr, op.body.consts, rebuild(leaves), ctx), "jit")

    body.__name__ = body.__qualname__ = s.name
    is_adapted = [isinstance(v, Adapted) for v in invals]
    sharding = lambda x: x if isinstance(x, jax.sharding.Sharding) else None
    in_sh = []
    for x, n, ad in zip(s.in_shardings, counts, is_adapted):
        in_sh += [None] * n if ad else [sharding(x)]
    donate = [i for i, d in enumerate(_per_leaf(s.donated, counts)) if d]
    donate = [i for i in donate if not _leaf_of_adapted(i, counts, is_adapted)]
    jitted = jax.jit(
        body,
        in_shardings=tuple(in_sh) if any(x is not None for x in in_sh) else None,
        out_shardings=tuple(sharding(x) for x in s.out_shardings)
        if any(sharding(x) is not None for x in s.out_shardings)
        else None,
        donate_argnums=tuple(donate),
        keep_unused=s.keep_unused,
        inline=s.inline,
        compiler_options=dict(s.compiler_options) or None,
    )
    return list(jitted(*leaves))


def _leaf_of_adapted(i: int, counts: Sequence[int], is_adapted: Sequence[bool]) -> bool:
    start = 0
    for n, ad in zip(counts, is_adapted):
        if start <= i < start + n:
            return ad
        start += n
    return False


def remat(op: jc.Remat, invals: Sequence[Any], ctx: Any, run: Run) -> list[Any]:
    jaxpr = op.body.jaxpr
    # Outputs that only forward an input stay what they were (implicit), outside the remat.
    where = {v: i for i, v in enumerate(jaxpr.invars)}
    fwd = [None if isinstance(v, jcore.Literal) else where.get(v) for v in jaxpr.outvars]
    leaves, counts, rebuild = pack(invals)

    def body(*leaves):
        outs = run(jaxpr, op.body.consts, rebuild(leaves), ctx)
        outs = [o for o, f in zip(outs, fwd) if f is None]
        return ctx.dense_all(outs, "remat output")

    prevent = op.prevent_cse
    if not isinstance(prevent, bool):
        prevent = tuple(_per_leaf(prevent, counts))
    computed = iter(jax.checkpoint(body, prevent_cse=prevent, policy=op.policy)(*leaves))
    return [next(computed) if f is None else invals[f] for f in fwd]


def _scan_slice(v: Adapted) -> tuple[list[Any], list[Any], Callable]:
    """Split an Adapted scanned over view axis 0 into per-step xs and loop constants."""
    if isinstance(v.base, Deferred) and v.base.ops and not v.base.per_layer:
        raise Unfactorable("quantised weight viewed (not only cast) before scan")
    xs, consts = [v.base.q if isinstance(v.base, Deferred) else v.base], []
    layout = {}
    for name, arr, m in v.parts():
        if 0 in m:
            xs.append(jnp.moveaxis(arr, m.index(0), 0))
            layout[name] = ("x", tuple(m[: m.index(0)] + m[m.index(0) + 1 :]))
        else:
            consts.append(arr)
            layout[name] = ("c", m)

    def rebuild(x_parts: Sequence[Any], c_parts: Sequence[Any]) -> Adapted:
        x_it, c_it = iter(x_parts), iter(c_parts)
        base = next(x_it)
        if isinstance(v.base, Deferred):  # casts of a quantised stack replay per layer
            base = v.base.with_q(base)
        dec = lambda m: tuple(None if ax is None else ax - 1 for ax in m)
        changes = {}
        for name, (kind, m) in layout.items():
            changes[name] = next(x_it) if kind == "x" else next(c_it)
            changes[name + "_axes"] = dec(m)
        return dataclasses.replace(v, base=base, shape=v.shape[1:], **changes)

    return xs, consts, rebuild


def scan(op: jc.Scan, invals: Sequence[Any], ctx: Any, run: Run) -> list[Any]:
    nc, ncarry = op.num_consts, op.num_carry
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    init = ctx.dense_all(init, "scan carry")
    x_leaves, x_builders = [], []
    for x in xs:
        if isinstance(x, Adapted):
            try:
                parts, cparts, rebuild = _scan_slice(x)
            except Unfactorable as e:
                x = ctx.fallback(x, "scan", str(e))
            else:
                x_builders.append((len(x_leaves), len(parts), cparts, rebuild))
                x_leaves += parts
                continue
        x_builders.append((len(x_leaves), 1, None, None))
        x_leaves.append(x)
    keys = None if ctx.rng is None else jax.random.split(ctx.next_key(), op.length)

    def body(carry, step):
        leaves, key = step
        xs_now = []
        for i, n, cparts, rebuild in x_builders:
            xs_now.append(leaves[i] if rebuild is None else rebuild(leaves[i : i + n], cparts))
        inner = ctx.child(key)
        outs = run(op.body.jaxpr, op.body.consts, list(consts) + list(carry) + xs_now, inner)
        ys = outs[ncarry:]
        # A per-step output that is a per-step input (nnx.scan returns its modules' state)
        # is that input, stacked again: it stays implicit, outside the loop.
        fwd.clear()
        for k, y in enumerate(ys):
            j = next((j for j, xn in enumerate(xs_now) if y is xn), None)
            if isinstance(y, Adapted) and j is not None:
                fwd[k] = j
                ys[k] = jnp.zeros((), jnp.int8)
        return ctx.dense_all(outs[:ncarry], "scan carry"), ctx.dense_all(ys, "scan output")

    fwd: dict[int, int] = {}
    carry, ys = lax.scan(
        body, list(init), (x_leaves, keys), length=op.length, reverse=op.reverse, unroll=op.unroll
    )
    ys = [xs[fwd[k]] if k in fwd else y for k, y in enumerate(ys)]
    return list(carry) + ys


def cond(op: jc.Cond, invals: Sequence[Any], ctx: Any, run: Run) -> list[Any]:
    index, ops = invals[0], invals[1:]

    def branch(body):
        return lambda: ctx.dense_all(run(body.jaxpr, body.consts, ops, ctx), "cond output")

    return list(lax.switch(index, [branch(b) for b in op.branches]))


def while_loop(op: jc.While, invals: Sequence[Any], ctx: Any, run: Run) -> list[Any]:
    cn, bn = op.cond_nconsts, op.body_nconsts
    cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
    init = ctx.dense_all(invals[cn + bn :], "while carry")
    key = None if ctx.rng is None else ctx.next_key()

    def cond_fn(state):
        carry, _ = state
        return run(op.cond.jaxpr, op.cond.consts, list(cconsts) + list(carry), ctx)[0]

    def body_fn(state):
        carry, k = state
        inner = ctx
        if k is not None:  # fresh dropout randomness in every iteration
            k, sub = jax.random.split(k)
            inner = ctx.child(sub)
        outs = run(op.body.jaxpr, op.body.consts, list(bconsts) + list(carry), inner)
        return ctx.dense_all(outs, "while"), k

    carry, _ = lax.while_loop(cond_fn, body_fn, (list(init), key))
    return list(carry)


def shard_map(op: jc.ShardMap, invals: Sequence[Any], ctx: Any, run: Run) -> list[Any]:
    """Enter the body with implicit weights whose factor specs follow the operand specs."""
    leaves, specs, local = [], [], []
    for v, spec in zip(invals, op.in_specs):
        if isinstance(v, Adapted):
            if isinstance(v.base, Deferred):
                raise Unfactorable("a quantised weight as a shard_map operand")
            fspecs = blocks.factor_specs(v, spec)
            leaves.append(v.base)
            specs.append(spec)
            names = [n for n, _, _ in v.parts()]
            for n in names:
                leaves.append(getattr(v, n))
                specs.append(fspecs[n])
            local.append((v, names, _local_shape(v.shape, spec, op.mesh)))
        else:
            leaves.append(v)
            specs.append(spec)
            local.append(None)

    def body(*leaves):
        it = iter(leaves)
        vals = []
        for info in local:
            if info is None:
                vals.append(next(it))
                continue
            w, names, shape = info
            base = next(it)
            parts = {n: next(it) for n in names}
            vals.append(dataclasses.replace(w, base=base, shape=shape, **parts))
        outs = run(op.body.jaxpr, op.body.consts, vals, ctx)
        return tuple(ctx.dense_all(outs, "shard_map output"))

    mapped = jax.shard_map(
        body,
        mesh=op.mesh,
        in_specs=tuple(specs),
        out_specs=op.out_specs,
        check_vma=op.check_vma,
        axis_names=set(op.manual_axes),
    )
    return list(mapped(*leaves))


def _local_shape(shape: Sequence[int], spec: Any, mesh: Any) -> tuple[int, ...]:
    full = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    out = []
    for n, entry in zip(shape, full):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        div = 1
        for name in names:
            div *= mesh.shape[name]
        out.append(n // div)
    return tuple(out)
