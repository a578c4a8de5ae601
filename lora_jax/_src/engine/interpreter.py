"""The factored engine: re-run a traced program with adapted weights kept implicit.

``run(closed_jaxpr, inputs, ctx)`` evaluates a jaxpr equation by equation,
binding ordinary equations as they are. Equations that receive an
:class:`~lora_jax._src.engine.implicit.Adapted` value are rewritten: views move the
factors along, contractions and convolutions add a low-rank term beside the
base term, control flow (scan, while, cond, jit, remat, custom rules) is
re-entered with the implicit values inside (:mod:`control`). Every primitive is read
through :mod:`jax_compat`, the one module that knows JAX's names.
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

from lora_jax._src.core.explicit import typed_like
from lora_jax._src.engine import blocks, control, segments
from lora_jax._src.engine import implicit as im
from lora_jax._src.engine import jax_compat as jc
from lora_jax._src.engine import lowrank as lr
from lora_jax._src.engine.implicit import Adapted, Deferred, Unfactorable


class LoraFactoringError(ValueError):
    """A use of an adapted weight cannot be factored and ``strict=True`` was asked for."""


class LoraMaterializeWarning(UserWarning):
    """An adapted weight was materialised (``W0 + scale * a @ b``) at one point of use."""


class LoraUnusedWarning(UserWarning):
    """An adapted weight is never read by the function (it may be captured as a constant)."""


class LoraCustomRuleWarning(UserWarning):
    """An adapted weight enters a custom_jvp/custom_vjp function: its primal is differentiated."""


@dataclasses.dataclass
class Context:
    """Per-call state: strictness, dropout key and a counter to fold into it."""

    strict: bool = False
    rng: jax.Array | None = None
    uses: int = 0
    warned: set = dataclasses.field(default_factory=set)
    runs: dict = dataclasses.field(default_factory=dict)  # segments.bind_run's jit cache

    def child(self, rng: jax.Array | None) -> Context:
        """The context of a loop body: its own dropout key, shared warnings and runs."""
        return Context(self.strict, rng, 0, self.warned, self.runs)

    def dense_all(self, xs: Sequence[Any], what: str) -> list[Any]:
        return [self.fallback(x, what) if isinstance(x, Adapted) else x for x in xs]

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


_PENDING = object()  # the value of an output of a run not bound yet


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def run(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
    """Evaluate an open ``jaxpr`` whose inputs may be ``Adapted`` values."""
    env: dict = {}
    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    last = segments.last_uses(jaxpr)
    pending: list = []  # a run of equations that read no adapted weight, bound together
    for i, eqn in enumerate(jaxpr.eqns):
        adapted = any(
            isinstance(env.get(v), Adapted) for v in eqn.invars if type(v) is not jcore.Literal
        )
        if not adapted and segments.can_join(eqn):
            pending.append(eqn)
            for var in eqn.outvars:
                env[var] = _PENDING
            continue
        if pending:
            segments.bind_run(pending, i, env, last, ctx.runs)
            pending = []
        invals = [_read(env, v) for v in eqn.invars]
        if adapted:
            with jc.in_context(eqn):
                outs = _rewrite(eqn, invals, ctx)
        else:
            outs = jc.bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = val
    if pending:
        segments.bind_run(pending, len(jaxpr.eqns), env, last, ctx.runs)
    return [_read(env, v) for v in jaxpr.outvars]


def run_closed(closed: Any, args: Sequence[Any], ctx: Context) -> list[Any]:
    """Evaluate the program ``closed`` (from ``jax.make_jaxpr``) on ``args``.

    An adapted weight that the program never reads is reported (warning; strict: error).
    """
    body = jc.closed(closed)
    _check_read(body.jaxpr, args, ctx)
    return run(body.jaxpr, body.consts, args, ctx)


def _check_read(jaxpr: Any, args: Sequence[Any], ctx: Context) -> None:
    read = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jcore.Literal)}
    read |= {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    for var, val in zip(jaxpr.invars, args):
        if isinstance(val, Adapted) and val.has_factors and var not in read:
            msg = (
                f"'{val.path}' (shape {val.shape}) is adapted but the function never reads "
                f"it: its factors get no gradient. The function may use the weight captured "
                f"as a constant (a closure or a global) instead of the parameter passed in; "
                f"read it from the params argument"
            )
            if ctx.strict:
                raise LoraFactoringError(msg + ", or exclude it from the rules.")
            warnings.warn(msg + ".", LoraUnusedWarning, stacklevel=4)


# ----------------------------------------------------------------------------- rewrite rules


def _view(op: Any, v: Adapted, rest: Sequence[Any]) -> Adapted:
    if isinstance(op, jc.Transpose):
        return im.transpose(v, op.perm)
    if isinstance(op, jc.Convert):
        return im.convert(v, op.dtype)
    if isinstance(op, jc.Reshape):
        if op.dimensions is not None:
            raise Unfactorable("reshape with dimensions")
        return im.reshape(v, op.new_sizes)
    if isinstance(op, jc.Squeeze):
        return im.squeeze(v, op.dims)
    if isinstance(op, jc.Broadcast):
        return im.broadcast_in_dim(v, op.shape, op.dims)
    if isinstance(op, jc.Slice):
        return im.static_slice(v, op.start, op.limit, op.strides)
    if isinstance(op, jc.DynamicSlice):
        return im.dynamic_slice(v, rest, op.sizes)
    if isinstance(op, jc.Gather):
        return im.gather(v, rest[0], op.params)
    if isinstance(op, jc.StopGradient):
        return blocks.stop_gradient(v)
    return v  # Identity


VIEWS = (
    jc.Transpose,
    jc.Convert,
    jc.Reshape,
    jc.Squeeze,
    jc.Broadcast,
    jc.Slice,
    jc.DynamicSlice,
    jc.Gather,
    jc.Identity,
    jc.StopGradient,
)


def _dot(eqn: Any, p: jc.Dot, invals: Sequence[Any], ctx: Context) -> list[Any]:
    lhs, rhs = invals
    if isinstance(lhs, Adapted) and isinstance(rhs, Adapted):
        # An indexed view (embedding rows) is activations, not a weight: that one is formed.
        if rhs.indexed and not lhs.indexed:
            rhs = ctx.fallback(rhs, "dot_general", "both operands are adapted weights")
        else:
            lhs = ctx.fallback(lhs, "dot_general", "both operands are adapted weights")
    w, x, x_is_lhs = (rhs, lhs, True) if isinstance(rhs, Adapted) else (lhs, rhs, False)

    def base_dot(x, base):
        args = (x, base) if x_is_lhs else (base, x)
        return jc.bind_raw(eqn, args)[0]

    if isinstance(w.base, Deferred):
        # Dequantise inside a checkpoint: the dense layer is recomputed in the backward pass.
        out = jax.checkpoint(lambda x, q: base_dot(x, w.base.with_q(q).value()))(x, w.base.q)
    else:
        out = base_dot(x, w.base)
    _, ws, letters = lr.dot_letters(x.ndim, len(w.shape), x_is_lhs, p.dimension_numbers)
    if w.col is not None:
        if not all(ws[ax] in letters for ax in w.col_axes):  # a contracted column cannot scale
            why = "a per-column scale (DoRA, GLoRA's A) on a contracted axis"
            dense = ctx.fallback(w, "dot_general", why)
            return jc.bind_raw(eqn, [x, dense] if x_is_lhs else [dense, x])
        out = out * im.broadcast_col(w.col, w.col_axes, ws, letters).astype(out.dtype)
    if w.shift is not None:
        if not all(ws[ax] in letters for ax in w.shift_axes):
            ctx.fallback(w, "dot_general", "an output column of the weight is contracted")
        out = out + im.broadcast_col(w.shift, w.shift_axes, ws, letters).astype(out.dtype)
    if not w.has_factors:
        return [out]
    key = ctx.next_key()
    summed = typed_like(
        lambda x, a, b, out: lr.lowrank_dot(
            x,
            dataclasses.replace(w, a=a, b=b),
            x_is_lhs,
            p.dimension_numbers,
            p.preferred_element_type,
            p.precision,
            key,
            add_to=out,
        ),
        eqn.outvars[0].aval,
    )(x, w.a, w.b, out)
    return [summed]


def _conv(eqn: Any, op: jc.Conv, invals: Sequence[Any], ctx: Context) -> list[Any]:
    x, w = invals
    if isinstance(x, Adapted) and x.indexed and isinstance(w, Adapted):
        x = ctx.fallback(x, "conv_general_dilated")  # embedding rows are activations: formed
    if isinstance(x, Adapted) or not isinstance(w, Adapted):
        x = ctx.fallback(x, "conv_general_dilated", "adapted weight as the conv input")
        return jc.bind_raw(eqn, [x, *ctx.dense_all([w], "conv_general_dilated")])
    if isinstance(w.base, Deferred):
        out = jax.checkpoint(lambda x, q: jc.bind_raw(eqn, [x, w.base.with_q(q).value()])[0])(
            x, w.base.q
        )
    else:
        out = jc.bind_raw(eqn, [x, w.base])[0]
    if w.col is not None:
        out_feat = op.params["dimension_numbers"].rhs_spec[0]
        if tuple(w.col_axes) != (out_feat,):
            return jc.bind_raw(
                eqn, [x, ctx.fallback(w, "conv_general_dilated", "DoRA column layout")]
            )
        shape = [1] * out.ndim
        shape[op.params["dimension_numbers"].out_spec[1]] = w.col.shape[0]
        out = out * w.col.reshape(shape).astype(out.dtype)
    if w.shift is not None:
        out_feat = op.params["dimension_numbers"].rhs_spec[0]
        if tuple(w.shift_axes) != (out_feat,):
            ctx.fallback(w, "conv_general_dilated", "the output features are not the columns")
        shape = [1] * out.ndim
        shape[op.params["dimension_numbers"].out_spec[1]] = w.shift.shape[0]
        out = out + w.shift.reshape(shape).astype(out.dtype)
    if not w.has_factors:
        return [out]
    try:
        low = lr.lowrank_conv(x, w, op.params, ctx.next_key())
    except Unfactorable as e:
        return jc.bind_raw(eqn, [x, ctx.fallback(w, "conv_general_dilated", str(e))])
    return [out + low.astype(out.dtype)]


def _ragged(eqn: Any, op: jc.RaggedDot, invals: Sequence[Any], ctx: Context) -> list[Any]:
    """``ragged_dot(x, W, groups)`` over stacked experts ``W: (E, K, N)``: the base and two
    rank-r grouped products ``ragged_dot(ragged_dot(x, a), b)`` (a: (E, K, r), b: (E, r, N))."""
    x, w, groups = invals[0], invals[1], invals[2:]
    if (
        isinstance(x, Adapted)
        or not isinstance(w, Adapted)
        or groups
        and isinstance(groups[0], Adapted)
    ):
        raise Unfactorable("the adapted weight is not the grouped (rhs) operand")
    dn = op.dimension_numbers
    standard = (
        tuple(dn.lhs_ragged_dimensions) == (x.ndim - 2,)
        and tuple(dn.rhs_group_dimensions) == (0,)
        and tuple(map(tuple, dn.dot_dimension_numbers[0])) == ((x.ndim - 1,), (1,))
        and not any(dn.dot_dimension_numbers[1])
        and x.ndim == 2
        and len(w.shape) == 3
    )
    if not standard:
        raise Unfactorable("ragged_dot_general other than (m, k) x (groups, k, n)")
    if w.col is not None or w.shift is not None:
        raise Unfactorable("per-column terms on grouped experts")
    v = im._sorted_factors(w)  # view axes in order, rank last: a (E, K, r), b (E, N, r)
    if v.has_factors and (v.a_axes != (0, 1, None) or v.b_axes != (0, 2, None)):
        raise Unfactorable("expert factors are not (E, K, r) and (E, r, N)")
    kw = dict(precision=op.precision, preferred_element_type=op.preferred_element_type)
    if op.group_offset is not None:
        kw["group_offset"] = op.group_offset
    if isinstance(v.base, Deferred):
        out = jax.checkpoint(
            lambda x, q: jc.bind_raw(eqn, [x, v.base.with_q(q).value(), *groups])[0]
        )(x, v.base.q)
    else:
        out = jc.bind_raw(eqn, [x, v.base, *groups])[0]
    if not v.has_factors:
        return [out]
    xd, key = x, ctx.next_key()
    if key is not None and v.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - v.dropout, x.shape)
        xd = jnp.where(keep, x / jnp.asarray(1.0 - v.dropout, x.dtype), jnp.zeros((), x.dtype))
    t = lax.ragged_dot(xd, v.a.astype(x.dtype), groups[0], **kw)
    t = t * jnp.asarray(v.scale, t.dtype)
    low = lax.ragged_dot(t, jnp.swapaxes(v.b, 1, 2).astype(t.dtype), groups[0], **kw)
    return [out + low.astype(out.dtype)]


def _mul(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    x, y = invals
    if isinstance(x, Adapted) == isinstance(y, Adapted):
        raise Unfactorable("a product of two adapted weights")
    v, s = (x, y) if isinstance(x, Adapted) else (y, x)
    return [blocks.scale(v, s)]


def _rewrite(eqn: Any, invals: Sequence[Any], ctx: Context) -> list[Any]:
    op = jc.read(eqn)
    try:
        if isinstance(op, VIEWS):
            if isinstance(invals[0], Adapted) and not any(
                isinstance(x, Adapted) for x in invals[1:]
            ):
                return [_view(op, invals[0], invals[1:])]
        elif isinstance(op, jc.Dot):
            return _dot(eqn, op, invals, ctx)
        elif isinstance(op, jc.Conv):
            return _conv(eqn, op, invals, ctx)
        elif isinstance(op, jc.RaggedDot):
            return _ragged(eqn, op, invals, ctx)
        elif isinstance(op, jc.Mul):
            return _mul(eqn, invals)
        elif isinstance(op, jc.ShardingConstraint) and isinstance(invals[0], Adapted):
            base_op = lambda w: jc.bind_raw(eqn, [w])[0]
            return [blocks.constrain(invals[0], op.sharding, base_op)]
        elif isinstance(op, jc.Reshard) and isinstance(invals[0], Adapted):
            base_op = lambda w: jc.bind_raw(eqn, [w])[0]
            return [blocks.constrain(invals[0], op.sharding, base_op, jax.sharding.reshard)]
        elif isinstance(op, jc.Barrier):
            return control.barrier(eqn, invals)
        elif isinstance(op, jc.Concatenate):
            return [blocks.concatenate(invals, op.axis, eqn.outvars[0].aval.shape)]
        elif isinstance(op, jc.Stack):
            return [blocks.stack(invals, op.axis, eqn.outvars[0].aval.shape)]
        elif isinstance(op, jc.Split) and isinstance(invals[0], Adapted):
            return blocks.split(invals[0], op.sizes, op.axis)
        elif isinstance(op, jc.Call):
            return control.call(op, invals, ctx, run)
        elif isinstance(op, jc.Remat):
            return control.remat(op, invals, ctx, run)
        elif isinstance(op, jc.Scan):
            return control.scan(op, invals, ctx, run)
        elif isinstance(op, jc.Cond):
            return control.cond(op, invals, ctx, run)
        elif isinstance(op, jc.While):
            return control.while_loop(op, invals, ctx, run)
        elif isinstance(op, jc.Custom):
            return _custom(op, invals, ctx)
        elif isinstance(op, jc.ShardMap):
            return control.shard_map(op, invals, ctx, run)
    except Unfactorable as e:
        return jc.bind_raw(eqn, _fallback_all(invals, ctx, jc.name(eqn), str(e)))
    return jc.bind_raw(eqn, _fallback_all(invals, ctx, jc.name(eqn), ""))


def _custom(op: jc.Custom, invals: Sequence[Any], ctx: Context) -> list[Any]:
    # A custom rule cannot see inside an implicit weight: run its primal, differentiated by
    # autodiff. Same values; the gradient is the true derivative of the primal.
    for v in invals:
        if isinstance(v, Adapted) and v.has_factors and (v.path, op.kind) not in ctx.warned:
            ctx.warned.add((v.path, op.kind))
            msg = (
                f"'{v.path}' enters a {op.kind} function; its custom derivative rule is "
                f"replaced by autodiff of the primal (same values; the rule cannot see inside "
                f"an implicit weight)"
            )
            if ctx.strict:
                raise LoraFactoringError(msg + ". Use strict=False to allow this.")
            warnings.warn(msg + ".", LoraCustomRuleWarning, stacklevel=4)
    outs = run(op.body.jaxpr, op.body.consts, invals, ctx)
    return ctx.dense_all(outs, op.kind)


def _fallback_all(invals: Sequence[Any], ctx: Context, what: str, why: str) -> list[Any]:
    return [ctx.fallback(x, what, why) if isinstance(x, Adapted) else x for x in invals]
