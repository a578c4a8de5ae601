"""The one module that knows what each JAX version calls a primitive and its parameters.

The engine reads every equation through :func:`read`, which turns the primitive and its
``eqn.params`` into a small typed record (a NamedTuple below), or ``None`` for a primitive
the engine treats as opaque. No other engine module indexes ``eqn.params`` or compares
primitive names; re-binding an equation unchanged (:func:`bind`) passes every parameter
through, known or not, under the equation's own name stack and source info.

Where the names differ (read in the jax source, github.com/jax-ml/jax):

* ``scan``: ``num_consts`` / ``num_carry`` up to 0.10.x; from 0.11.0 ``ft_in`` / ``ft_out``
  (``FlatTree`` packs of (consts, carry, xs) and (carry, ys); PR 39005 "scan-flattree",
  ``jax/_src/lax/control_flow/loops.py``).
* ``closed_call`` / ``core_call``: removed after 0.11.0 for ``eval_jaxpr`` (commit 99a9f6e
  "remove call_p and closed_call_p, just use eval_jaxpr_p", ``jax/_src/core.py``); ``pjit``
  was renamed ``jit`` earlier. All are calls of a closed jaxpr (``jaxpr`` or ``call_jaxpr``).
* ``Jaxpr`` / ``ClosedJaxpr``: merged in 0.11 (``ClosedJaxpr = Jaxpr``, ``.jaxpr`` a legacy
  accessor returning itself, ``jax/_src/core.py``); :func:`closed` reads either.
* ``checkpoint``: ``remat2`` with ``jaxpr, prevent_cse, differentiated, policy``; with
  ``jax_remat3`` (0.10+) a ``call_hi_primitive`` whose ``_prim`` is a ``RematTraced`` with
  ``params = {jaxpr, policy, prevent_cse}`` (``jax/_src/ad_checkpoint.py``).
* ``custom_vjp``: ``custom_vjp_call`` (``call_jaxpr``); older ``custom_vjp_call_jaxpr``
  (``fun_jaxpr``); with ``jax_custom_vjp3`` a ``call_hi_primitive`` whose ``_prim`` is a
  ``CustomVJPTraced`` (``jax/_src/hijax.py``); any other hi primitive is read through its
  ``expand`` method (its primal meaning).
* the trace stack (:func:`staging`): ``jax._src.core.trace_ctx`` and
  ``partial_eval.DynamicJaxprTrace``, the one read of JAX internals (no public reader).
* ``shard_map``: ``mesh, in_specs, out_specs, jaxpr, check_vma, newly_manual_axes`` in 0.10.2
  and at head (``jax/_src/shard_map.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import source_info_util as siu

try:  # the trace stack has no public reader; see staging()
    from jax._src.core import trace_ctx as _trace_ctx
    from jax._src.interpreters.partial_eval import DynamicJaxprTrace as _Staging
except ImportError:  # pragma: no cover - a JAX that moved them: equations bound one by one
    _trace_ctx = _Staging = None


class Closed(NamedTuple):
    """A jaxpr and the values of its constant inputs (``consts`` may be empty)."""

    jaxpr: Any
    consts: list


def closed(j: Any) -> Closed:
    """Read a ``ClosedJaxpr`` (<= 0.10) or a (merged, 0.11+) ``Jaxpr`` with attached consts."""
    return Closed(getattr(j, "jaxpr", j), list(getattr(j, "consts", ())))


# ----------------------------------------------------------------------------- first-order


class Transpose(NamedTuple):
    perm: tuple[int, ...]


class Convert(NamedTuple):
    dtype: Any


class Reshape(NamedTuple):
    new_sizes: tuple[int, ...]
    dimensions: Any


class Squeeze(NamedTuple):
    dims: tuple[int, ...]


class Broadcast(NamedTuple):
    shape: tuple[int, ...]
    dims: tuple[int, ...]


class Slice(NamedTuple):
    start: tuple[int, ...]
    limit: tuple[int, ...]
    strides: Any


class DynamicSlice(NamedTuple):
    sizes: tuple[int, ...]


class Gather(NamedTuple):
    params: dict  # the keyword arguments of lax.gather


class Identity(NamedTuple):
    """copy: the value passes unchanged."""


class ShardingConstraint(NamedTuple):
    sharding: Any
    unconstrained_dims: frozenset


class Reshard(NamedTuple):
    """reshard (``jax.sharding.reshard``; Explicit-axis meshes): params ``dst_sharding``,
    ``concrete_mesh`` in 0.10.2 and at head (jax/_src/pjit.py, ``reshard_p``)."""

    sharding: Any


class Barrier(NamedTuple):
    """optimization_barrier over all operands."""


class StopGradient(NamedTuple):
    """stop_gradient."""


class Concatenate(NamedTuple):
    axis: int


class Stack(NamedTuple):
    axis: int


class Split(NamedTuple):
    sizes: tuple[int, ...]
    axis: int


class Mul(NamedTuple):
    """Elementwise product (a scalar or broadcast vector may scale an adapted weight)."""


class Dot(NamedTuple):
    dimension_numbers: Any
    precision: Any
    preferred_element_type: Any


class RaggedDot(NamedTuple):
    dimension_numbers: Any  # lax.RaggedDotDimensionNumbers
    precision: Any
    preferred_element_type: Any
    group_offset: Any


class Conv(NamedTuple):
    params: dict


# ----------------------------------------------------------------------------- higher-order


class JitSettings(NamedTuple):
    """The settings of an inner ``jax.jit`` that re-binding must keep."""

    name: str
    in_shardings: tuple
    out_shardings: tuple
    donated: tuple[bool, ...]
    keep_unused: bool
    inline: bool
    compiler_options: Any


class Call(NamedTuple):
    body: Closed
    jit: JitSettings | None  # None for closed_call / core_call / eval_jaxpr


class Remat(NamedTuple):
    body: Closed
    prevent_cse: bool | tuple[bool, ...]  # one flag per input of body.jaxpr when a tuple
    policy: Any


class Scan(NamedTuple):
    body: Closed
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: Any


class While(NamedTuple):
    cond: Closed
    body: Closed
    cond_nconsts: int
    body_nconsts: int


class Cond(NamedTuple):
    branches: tuple[Closed, ...]


class Custom(NamedTuple):
    """A custom_jvp/custom_vjp function (or another hi primitive): its primal program."""

    kind: str
    body: Closed


class ShardMap(NamedTuple):
    body: Closed
    mesh: Any
    in_specs: tuple
    out_specs: tuple
    check_vma: bool
    manual_axes: frozenset


# ----------------------------------------------------------------------------- readers


def _scan(p: dict) -> Scan:
    if "ft_in" in p:  # jax >= 0.11.0 (PR 39005): FlatTree packs of (consts, carry, xs)
        consts, carry, _ = p["ft_in"].unpack()
        n_consts, n_carry = len(consts), len(carry)
    else:
        n_consts, n_carry = p["num_consts"], p["num_carry"]
    return Scan(closed(p["jaxpr"]), n_consts, n_carry, p["length"], p["reverse"], p["unroll"])


def _call(p: dict) -> Call:
    return Call(closed(p["call_jaxpr"] if "call_jaxpr" in p else p["jaxpr"]), None)


def _jit(p: dict) -> Call:
    settings = JitSettings(
        name=p.get("name", "jit"),
        in_shardings=tuple(p.get("in_shardings", ())),
        out_shardings=tuple(p.get("out_shardings", ())),
        donated=tuple(p.get("donated_invars", ())),
        keep_unused=bool(p.get("keep_unused", False)),
        inline=bool(p.get("inline", False)),
        compiler_options=p.get("compiler_options_kvs", ()),
    )
    return Call(closed(p["jaxpr"]), settings)


def _remat(p: dict) -> Remat:
    return Remat(closed(p["jaxpr"]), p["prevent_cse"], p["policy"])


def _custom(kind: str) -> Callable[[dict], Custom]:
    def read(p: dict) -> Custom:
        body = p.get("call_jaxpr", p.get("fun_jaxpr"))
        return Custom(kind, closed(body))

    return read


def _hi(p: dict) -> Remat | Custom:
    """``call_hi_primitive`` (jax_remat3 / jax_custom_vjp3 / other hi primitives)."""
    prim = p["_prim"]
    kind = type(prim).__name__
    params = getattr(prim, "params", {})
    if kind == "RematTraced":
        # ad_checkpoint.RematTraced: params {jaxpr, policy} in 0.10.2 (no CSE prevention);
        # {jaxpr, policy, prevent_cse} at head (jax/_src/ad_checkpoint.py, class RematTraced).
        prevent = params.get("prevent_cse", False)
        return Remat(closed(params["jaxpr"]), prevent, params["policy"])
    # CustomVJPTraced and others: trace the primal meaning (``expand``) of the flat inputs.
    in_tree = prim.in_tree
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in prim.in_avals_flat]

    def expand(*flat):
        return jax.tree.leaves(prim.expand(*jax.tree.unflatten(in_tree, flat)))

    return Custom(kind, closed(jax.make_jaxpr(expand)(*avals)))


def _shard_map(p: dict) -> ShardMap:
    return ShardMap(
        closed(p["jaxpr"]),
        p["mesh"],
        tuple(p["in_specs"]),
        tuple(p["out_specs"]),
        bool(p.get("check_vma", p.get("check_rep", True))),
        frozenset(p.get("newly_manual_axes", p.get("manual_axes", ()))),
    )


_READERS: dict[str, Callable[[dict], Any]] = {
    "transpose": lambda p: Transpose(tuple(p["permutation"])),
    "convert_element_type": lambda p: Convert(p["new_dtype"]),
    "reshape": lambda p: Reshape(tuple(p["new_sizes"]), p.get("dimensions")),
    "squeeze": lambda p: Squeeze(tuple(p["dimensions"])),
    "broadcast_in_dim": lambda p: Broadcast(tuple(p["shape"]), tuple(p["broadcast_dimensions"])),
    "slice": lambda p: Slice(tuple(p["start_indices"]), tuple(p["limit_indices"]), p["strides"]),
    "dynamic_slice": lambda p: DynamicSlice(tuple(p["slice_sizes"])),
    "gather": lambda p: Gather(dict(p)),
    "copy": lambda p: Identity(),
    "copy_p": lambda p: Identity(),
    "sharding_constraint": lambda p: ShardingConstraint(
        p["sharding"], frozenset(p.get("unconstrained_dims", ()))
    ),
    "reshard": lambda p: Reshard(p["dst_sharding"]),
    "optimization_barrier": lambda p: Barrier(),
    "stop_gradient": lambda p: StopGradient(),
    "concatenate": lambda p: Concatenate(int(p["dimension"])),
    "stack": lambda p: Stack(int(p["axis"])),
    "split": lambda p: Split(tuple(int(s) for s in p["sizes"]), int(p["axis"])),
    "mul": lambda p: Mul(),
    "dot_general": lambda p: Dot(
        p["dimension_numbers"], p["precision"], p["preferred_element_type"]
    ),
    "ragged_dot_general": lambda p: RaggedDot(
        p["ragged_dot_dimension_numbers"],
        p["precision"],
        p["preferred_element_type"],
        p.get("group_offset"),
    ),
    "conv_general_dilated": lambda p: Conv(dict(p)),
    "jit": _jit,
    "pjit": _jit,
    "closed_call": _call,
    "core_call": _call,
    "eval_jaxpr": _call,
    "remat2": _remat,
    "checkpoint": _remat,
    "remat": _remat,
    "scan": _scan,
    "while": lambda p: While(
        closed(p["cond_jaxpr"]), closed(p["body_jaxpr"]), p["cond_nconsts"], p["body_nconsts"]
    ),
    "cond": lambda p: Cond(tuple(closed(b) for b in p["branches"])),
    "custom_jvp_call": _custom("custom_jvp_call"),
    "custom_vjp_call": _custom("custom_vjp_call"),
    "custom_vjp_call_jaxpr": _custom("custom_vjp_call"),
    "call_hi_primitive": _hi,
    "shard_map": _shard_map,
}


def read(eqn: Any) -> Any:
    """The typed record of ``eqn`` (one of the NamedTuples above), or None when unknown."""
    reader = _READERS.get(eqn.primitive.name)
    return None if reader is None else reader(eqn.params)


def name(eqn: Any) -> str:
    """The primitive's name, for messages."""
    return eqn.primitive.name


def in_context(eqn: Any):
    """A context manager that re-creates ``eqn``'s name stack, source info and context."""
    stack = siu.current_name_stack() + eqn.source_info.name_stack
    return _Both(siu.user_context(eqn.source_info.traceback, name_stack=stack), eqn.ctx.manager)


class _Both:
    __slots__ = ("first", "second")

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        self.second.__enter__()

    def __exit__(self, *exc):
        self.second.__exit__(*exc)
        self.first.__exit__(*exc)


def staging() -> bool:
    """Whether the current trace stack stages out a program (``jit``, ``make_jaxpr``).

    Walks ``parent_trace`` from ``trace_ctx.trace`` looking for a ``DynamicJaxprTrace``, as
    ``unsafe_am_i_under_a_jit`` does (``jax/_src/core.py``, 0.10.2 and at head, commit
    cec06d1), without printing the stack. False where those names are gone.
    """
    trace = None if _trace_ctx is None else _trace_ctx.trace
    while trace is not None:
        if isinstance(trace, _Staging):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def bind_raw(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Re-bind ``eqn`` on ``invals`` with all its params, in the current context."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):  # jax < 0.10 returned (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Re-bind ``eqn`` on ``invals`` with all its params, under its own name stack."""
    with in_context(eqn):
        return bind_raw(eqn, invals)
