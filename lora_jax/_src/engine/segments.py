"""Runs of ordinary equations re-bound as one cached ``jax.jit`` call, for trace time.

Tracing ``fn`` to a jaxpr inlines every ``jit(inline=True)`` helper of ``jax.numpy``
(norms, softmax, casts). Re-binding those bare equations one by one under ``jax.grad``
linearises each of them in every layer, where the plain trace linearises a helper once
and reuses it. The interpreter instead collects each run of equations that touch no
adapted weight and binds it as one ``jax.jit(..., inline=True)`` call of a replay of those
equations. Runs with the same structure (the layers of a model) share one jitted function,
so JAX's caches (``linearize_jaxpr``, batching, partial eval) do the work once per
structure. ``inline=True`` keeps the equations in the staged program as if bound one by
one, each under its own name stack.

Only used while a program is being staged out (``jit``, ``make_jaxpr``): in eager use a
jit call would compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from lora_jax._src.engine import jax_compat as jc


def last_uses(jaxpr: Any) -> dict:
    """``{var: index of the last equation reading it}``; ``len(eqns)`` for outputs."""
    last: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                last[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            last[v] = len(jaxpr.eqns)
    return last


def can_join(eqn: Any) -> bool:
    """An equation may join a run: it has no effects (prints, state, ordered IO)."""
    return not eqn.effects


def bind_run(eqns: Sequence[Any], end: int, env: dict, last: dict, cache: dict) -> None:
    """Bind the run ``eqns`` (ending before equation ``end``), writing its live outputs."""
    key = None
    if len(eqns) > 1 and jc.staging():
        inputs, outputs, key = _structure(eqns, end, last)
    if key is None:  # eager, a single equation, or params that cannot be compared
        for eqn in eqns:
            _write(env, eqn.outvars, jc.bind(eqn, [_read(env, v) for v in eqn.invars]))
        return
    fn = cache.get(key)
    if fn is None:
        fn = cache[key] = jax.jit(_replay(eqns, inputs, outputs), inline=True)
    _write(env, outputs, fn(*[env[v] for v in inputs]))


def _replay(eqns: Sequence[Any], inputs: Sequence[Any], outputs: Sequence[Any]):
    def replay(*args):
        env = dict(zip(inputs, args))
        for eqn in eqns:
            _write(env, eqn.outvars, jc.bind(eqn, [_read(env, v) for v in eqn.invars]))
        return [env[v] for v in outputs]

    replay.__name__ = "lora_jax_run"
    return replay


def _structure(eqns: Sequence[Any], end: int, last: dict) -> tuple[list, list, tuple | None]:
    """The run's inputs, live outputs and a structural key (None when unhashable).

    The key names every equation's primitive, params, name stack and context, the wiring
    (which input or earlier output each operand is), literal bytes and input types: two
    runs with equal keys compute the same function of their inputs.
    """
    where: dict = {}  # var -> ("in", k) or ("out", equation, position)
    inputs: list = []
    parts: list = []
    for i, eqn in enumerate(eqns):
        refs = []
        for v in eqn.invars:
            if isinstance(v, jcore.Literal):
                val = np.asarray(v.val)
                refs.append(("lit", val.dtype.str, val.shape, val.tobytes(), v.aval))
                continue
            if v not in where:
                where[v] = ("in", len(inputs))
                inputs.append(v)
            refs.append(where[v])
        for j, v in enumerate(eqn.outvars):
            where[v] = ("out", i, j)
        params = tuple((k, type(p), p) for k, p in sorted(eqn.params.items()))
        parts.append((eqn.primitive, params, tuple(refs), eqn.source_info.name_stack, eqn.ctx))
    outputs = [
        v
        for eqn in eqns
        for v in eqn.outvars
        if not isinstance(v, jcore.DropVar) and last.get(v, -1) >= end
    ]
    key = (
        tuple(parts),
        tuple(v.aval for v in inputs),
        tuple(where[v] for v in outputs),
    )
    try:
        hash(key)
    except TypeError:
        return inputs, outputs, None
    return inputs, outputs, key


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _write(env: dict, outvars: Sequence[Any], outs: Sequence[Any]) -> None:
    for var, val in zip(outvars, outs):
        if not isinstance(var, jcore.DropVar):
            env[var] = val
