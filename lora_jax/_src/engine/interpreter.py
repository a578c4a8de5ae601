"""The factored engine: re-run a traced program with adapted weights kept implicit.

``run(closed_jaxpr, inputs, ctx)`` evaluates a jaxpr equation by equation,
binding ordinary equations as they are. Equations that receive an
:class:`~lora_jax._src.engine.implicit.Adapted` value are rewritten: views move the
factors along, contractions and convolutions add a low-rank term beside the
base term, control flow (scan, while, cond, jit, remat, custom rules) is
re-entered with the implicit values inside. Only public ``jax.extend.core``
objects are used.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from lora_jax._src.engine import implicit as im
from lora_jax._src.engine import lowrank as lr
from lora_jax._src.engine.implicit import Adapted, Deferred, Unfactorable


class LoraFactoringError(ValueError):
    """A use of an adapted weight cannot be factored and ``strict=True`` was asked for."""


class LoraMaterializeWarning(UserWarning):
    """An adapted weight was materialised (``W0 + scale * a @ b``) at one point of use."""


class LoraCustomRuleWarning(UserWarning):
    """An adapted weight enters a custom_jvp/custom_vjp function: its primal is differentiated."""


@dataclasses.dataclass
class Context:
    """Per-call state: strictness, dropout key and a counter to fold into it."""

    strict: bool = False
    rng: jax.Array | None = None
    uses: int = 0
    warned: set = dataclasses.field(default_factory=set)

    def next_key(self) -> jax.Array | None:
        if self.rng is None:
            return None
        self.uses += 1
        return jax.random.fold_in(self.rng, self.uses)

    def fallback(self, v: Adapted, what: str, why: str = "") -> jax.Array:
        """Materialise ``v`` at this one use (warn once), or raise in strict mode."""
        if v.shift is not None:
            raise LoraFactoringError(
                f"'{v.path}' (view shape {v.shape}) carries GLoRA bias terms (C, D, E), which "
                f"act on the output columns of a matmul or convolution of the weight; its use "
                f"by '{what}'{' (' + why + ')' if why else ''} has no such output. Use "
                f"lj.Glora(c='none', d='none', e='none') for this weight."
            )
        if v.has_factors and not v.indexed:
            msg = (
                f"'{v.path}' (view shape {v.shape}) is used by '{what}'"
                f"{' (' + why + ')' if why else ''}, which lora_jax cannot factor; "
            )
            if self.strict:
                raise LoraFactoringError(
                    msg + "rewrite the use as a matmul/einsum/conv of the weight, exclude the "
                    "weight from the rules, or call lora_apply(..., strict=False)."
                )
            if (v.path, what) not in self.warned:
                self.warned.add((v.path, what))
                warnings.warn(
                    msg + "W0 + scale*a@b is formed at this point only.",
                    LoraMaterializeWarning,
                    stacklevel=4,
                )
        return im.materialize(v)


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # jax < 0.10 returned (subfuns, params)
        subfuns, params = params
    ctx = getattr(eqn, "ctx", None)
    if ctx is not None:
        with ctx.manager:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def run(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
    """Evaluate an open ``jaxpr`` whose inputs may be ``Adapted`` values."""
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if any(isinstance(x, Adapted) for x in invals):
            outs = _rewrite(eqn, invals, ctx)
        else:
            outs = _bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    return [_read(env, v) for v in jaxpr.outvars]


def run_closed(closed: Any, args: Sequence[Any], ctx: Context) -> list[Any]:
    return run(closed.jaxpr, closed.consts, args, ctx)


def _dense(x: Any, ctx: Context, what: str) -> Any:
    return ctx.fallback(x, what) if isinstance(x, Adapted) else x


def _dense_all(xs: Sequence[Any], ctx: Context, what: str) -> list[Any]:
    return [_dense(x, ctx, what) for x in xs]


# ----------------------------------------------------------------------------- rewrite rules


def _view(eqn: Any, v: Adapted, rest: Sequence[Any]) -> Adapted:
    name, p = eqn.primitive.name, eqn.params
    if name == "transpose":
        return im.transpose(v, p["permutation"])
    if name == "convert_element_type":
        return im.convert(v, p["new_dtype"])
    if name == "reshape":
        if p.get("dimensions") is not None:
            raise Unfactorable("reshape with dimensions")
        return im.reshape(v, p["new_sizes"])
    if name == "squeeze":
        return im.squeeze(v, p["dimensions"])
    if name == "broadcast_in_dim":
        return im.broadcast_in_dim(v, p["shape"], p["broadcast_dimensions"])
    if name == "slice":
        return im.static_slice(v, p["start_indices"], p["limit_indices"], p["strides"])
    if name == "dynamic_slice":
        return im.dynamic_slice(v, rest, p["slice_sizes"])
    if name == "gather":
        return im.gather(v, rest[0], dict(p))
    if name in ("copy", "copy_p", "sharding_constraint", "optimization_barrier"):
        return v
    raise Unfactorable(name)


VIEWS = {
    "transpose",
    "convert_element_type",
    "reshape",
    "squeeze",
    "broadcast_in_dim",
    "slice",
    "dynamic_slice",
    "gather",
    "copy",
    "copy_p",
}


def _dot(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    lhs, rhs = invals
    if isinstance(lhs, Adapted) and isinstance(rhs, Adapted):
        # An indexed view (embedding rows) is activations, not a weight: that one is formed.
        if rhs.indexed and not lhs.indexed:
            rhs = ctx.fallback(rhs, "dot_general", "both operands are adapted weights")
        else:
            lhs = ctx.fallback(lhs, "dot_general", "both operands are adapted weights")
    w, x, x_is_lhs = (rhs, lhs, True) if isinstance(rhs, Adapted) else (lhs, rhs, False)
    p = eqn.params

    def base_dot(x, base):
        args = (x, base) if x_is_lhs else (base, x)
        return _bind(eqn, args)[0]

    if isinstance(w.base, Deferred):
        # Dequantise inside a checkpoint: the dense layer is recomputed in the backward pass.
        out = jax.checkpoint(lambda x, q: base_dot(x, Deferred(q, w.base.ops).value()))(x, w.base.q)
    else:
        out = base_dot(x, w.base)
    _, ws, letters = lr.dot_letters(x.ndim, len(w.shape), x_is_lhs, p["dimension_numbers"])
    if w.col is not None:
        if not all(ws[ax] in letters for ax in w.col_axes):  # a contracted column cannot scale
            why = "a per-column scale (DoRA, GLoRA's A) on a contracted axis"
            dense = ctx.fallback(w, "dot_general", why)
            return _bind(eqn, [x, dense] if x_is_lhs else [dense, x])
        out = out * im.broadcast_col(w.col, w.col_axes, ws, letters).astype(out.dtype)
    if w.shift is not None:
        if not all(ws[ax] in letters for ax in w.shift_axes):
            ctx.fallback(w, "dot_general", "an output column of the weight is contracted")
        out = out + im.broadcast_col(w.shift, w.shift_axes, ws, letters).astype(out.dtype)
    if not w.has_factors:
        return [out]
    low = lr.lowrank_dot(
        x,
        w,
        x_is_lhs,
        p["dimension_numbers"],
        p["preferred_element_type"],
        p["precision"],
        ctx.next_key(),
    )
    return [out + low.astype(out.dtype)]


def _conv(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    x, w = invals
    if isinstance(x, Adapted) and x.indexed and isinstance(w, Adapted):
        x = ctx.fallback(x, "conv_general_dilated")  # embedding rows are activations: formed
    if isinstance(x, Adapted) or not isinstance(w, Adapted):
        x = ctx.fallback(x, "conv_general_dilated", "adapted weight as the conv input")
        return _bind(eqn, [x, _dense(w, ctx, "conv_general_dilated")])
    if isinstance(w.base, Deferred):
        out = jax.checkpoint(lambda x, q: _bind(eqn, [x, Deferred(q, w.base.ops).value()])[0])(
            x, w.base.q
        )
    else:
        out = _bind(eqn, [x, w.base])[0]
    if w.col is not None:
        out_feat = eqn.params["dimension_numbers"].rhs_spec[0]
        if tuple(w.col_axes) != (out_feat,):
            return _bind(eqn, [x, ctx.fallback(w, "conv_general_dilated", "DoRA column layout")])
        shape = [1] * out.ndim
        shape[eqn.params["dimension_numbers"].out_spec[1]] = w.col.shape[0]
        out = out * w.col.reshape(shape).astype(out.dtype)
    if w.shift is not None:
        out_feat = eqn.params["dimension_numbers"].rhs_spec[0]
        if tuple(w.shift_axes) != (out_feat,):
            ctx.fallback(w, "conv_general_dilated", "the output features are not the columns")
        shape = [1] * out.ndim
        shape[eqn.params["dimension_numbers"].out_spec[1]] = w.shift.shape[0]
        out = out + w.shift.reshape(shape).astype(out.dtype)
    if not w.has_factors:
        return [out]
    try:
        low = lr.lowrank_conv(x, w, eqn.params, ctx.next_key())
    except Unfactorable as e:
        return _bind(eqn, [x, ctx.fallback(w, "conv_general_dilated", str(e))])
    return [out + low.astype(out.dtype)]


def _pack(vals: Sequence[Any]) -> tuple[list[Any], Any]:
    """Split values into array leaves and a rebuild function (Adapted become their arrays)."""
    leaves, specs = [], []
    for v in vals:
        if isinstance(v, Adapted):
            parts = {name: getattr(v, name) for name in im.PARTS}
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
                base = Deferred(base, v.base.ops)
            out.append(dataclasses.replace(v, base=base, **parts))
        return out

    return leaves, rebuild


def _remat(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    p = eqn.params
    leaves, rebuild = _pack(invals)

    def body(*leaves):
        outs = run(p["jaxpr"], [], rebuild(leaves), ctx)
        return _dense_all(outs, ctx, "remat output")

    return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*leaves))


def _scan_slice(v: Adapted) -> tuple[list[Any], list[Any], Any]:
    """Split an Adapted scanned over view axis 0 into per-step xs and loop constants."""
    if isinstance(v.base, Deferred) and v.base.ops:
        raise Unfactorable("quantised weight viewed before scan")
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
        base = Deferred(base) if isinstance(v.base, Deferred) else base
        dec = lambda m: tuple(None if ax is None else ax - 1 for ax in m)
        changes = {}
        for name, (kind, m) in layout.items():
            changes[name] = next(x_it) if kind == "x" else next(c_it)
            changes[name + "_axes"] = dec(m)
        return dataclasses.replace(v, base=base, shape=v.shape[1:], **changes)

    return xs, consts, rebuild


def _scan(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    init = _dense_all(init, ctx, "scan carry")
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
    keys = None
    if ctx.rng is not None:
        keys = jax.random.split(ctx.next_key(), p["length"])

    def body(carry, step):
        leaves, key = step
        xs_now = []
        for i, n, cparts, rebuild in x_builders:
            xs_now.append(leaves[i] if rebuild is None else rebuild(leaves[i : i + n], cparts))
        inner = Context(ctx.strict, key, 0, ctx.warned)
        outs = run_closed(p["jaxpr"], list(consts) + list(carry) + xs_now, inner)
        outs = _dense_all(outs, ctx, "scan output")
        return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(
        body,
        list(init),
        (x_leaves, keys),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return list(carry) + list(ys)


def _cond(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    index, ops = invals[0], invals[1:]

    def branch(closed):
        return lambda: _dense_all(run_closed(closed, ops, ctx), ctx, "cond output")

    return list(lax.switch(index, [branch(br) for br in eqn.params["branches"]]))


def _while(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:cn], invals[cn : cn + bn]
    init = _dense_all(invals[cn + bn :], ctx, "while carry")

    def cond(carry):
        return run_closed(p["cond_jaxpr"], list(cconsts) + list(carry), ctx)[0]

    def body(carry):
        return _dense_all(
            run_closed(p["body_jaxpr"], list(bconsts) + list(carry), ctx), ctx, "while"
        )

    return list(lax.while_loop(cond, body, list(init)))


def _custom(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    # A custom rule cannot see inside an implicit weight: run its primal, differentiated by
    # autodiff. Same values; the gradient is the true derivative of the primal.
    name = eqn.primitive.name
    for v in invals:
        if isinstance(v, Adapted) and v.has_factors and (v.path, name) not in ctx.warned:
            ctx.warned.add((v.path, name))
            msg = (
                f"'{v.path}' enters a {name} function; its custom derivative rule is replaced "
                f"by autodiff of the primal (same values; the rule cannot see inside an "
                f"implicit weight)"
            )
            if ctx.strict:
                raise LoraFactoringError(msg + ". Use strict=False to allow this.")
            warnings.warn(msg + ".", LoraCustomRuleWarning, stacklevel=4)
    return _dense_all(run_closed(eqn.params["call_jaxpr"], invals, ctx), ctx, name)


def _rewrite(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    name = eqn.primitive.name
    try:
        if name in VIEWS or name in ("sharding_constraint", "optimization_barrier"):
            if isinstance(invals[0], Adapted) and not any(
                isinstance(x, Adapted) for x in invals[1:]
            ):
                return [_view(eqn, invals[0], invals[1:])]
        elif name == "dot_general":
            return _dot(eqn, invals, ctx)
        elif name == "conv_general_dilated":
            return _conv(eqn, invals, ctx)
        elif name in ("jit", "pjit", "closed_call", "core_call"):
            closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            return run_closed(closed, invals, ctx)
        elif name in ("remat2", "checkpoint", "remat"):
            return _remat(eqn, invals, ctx)
        elif name == "scan":
            return _scan(eqn, invals, ctx)
        elif name == "cond":
            return _cond(eqn, invals, ctx)
        elif name == "while":
            return _while(eqn, invals, ctx)
        elif name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
            return _custom(eqn, invals, ctx)
    except Unfactorable as e:
        return _bind(eqn, _fallback_all(invals, ctx, name, str(e)))
    return _bind(eqn, _fallback_all(invals, ctx, name, ""))


def _fallback_all(invals: Sequence[Any], ctx: Context, what: str, why: str) -> list[Any]:
    return [ctx.fallback(x, what, why) if isinstance(x, Adapted) else x for x in invals]
