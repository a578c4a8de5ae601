"""Other adapted uses of one activation, found ahead in the jaxpr: q, k, v of one ``x``.

When several adapted weights contract the same activation with the same layout (q, k
and v projections; gate and up), their first low-rank products ``x . a`` are one
contraction against the concatenated ``a`` factors (:func:`lowrank.first_products`), and
autodiff makes the backward products one contraction each as well. The first use
computes all of them; the later uses (``Ahead.first``) only add their ``t . b``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from jax.extend import core as jcore

from lora_jax._src.core.explicit import explicit_axes
from lora_jax._src.engine import jax_compat as jc
from lora_jax._src.engine import lowrank as lr
from lora_jax._src.engine.implicit import Adapted


class Ahead:
    """One jaxpr being run: its equations, the values so far and the shared products."""

    def __init__(self, jaxpr: Any, env: dict):
        self.jaxpr, self.env = jaxpr, env
        self.at = 0  # index of the equation being run
        self.first: dict[int, Any] = {}  # id(later equation) -> its share of x . [a | a' ...]
        self._readers: dict | None = None

    def readers(self, var: Any) -> list[int]:
        """Indices of the equations reading ``var``."""
        if self._readers is None:
            self._readers = defaultdict(list)
            for i, eqn in enumerate(self.jaxpr.eqns):
                for v in eqn.invars:
                    if not isinstance(v, jcore.Literal):
                        self._readers[v].append(i)
        return self._readers.get(var, [])


def shareable(w: Adapted, dropout_on: bool) -> bool:
    """A use whose low-rank term is exactly ``scale * (x . a) . b`` on an undropped ``x``."""
    return (
        w.has_factors
        and not w.indexed
        and w.col is None
        and w.shift is None
        and not (dropout_on and w.dropout > 0)
    )


def later_uses(
    eqn: Any, op: jc.Dot, x: Any, x_is_lhs: bool, p: lr.Plan, ahead: Ahead, dropout_on: bool
):
    """The later equations ``dot_general(x, W')`` (same layout, ``W'`` adapted now) whose
    first product can be computed together with this one's: ``[(eqn, plan), ...]``."""
    x_var = eqn.invars[0 if x_is_lhs else 1]
    if isinstance(x_var, jcore.Literal) or explicit_axes(eqn.outvars[0].aval):
        return []
    found = []
    for j in ahead.readers(x_var):
        later = ahead.jaxpr.eqns[j]
        if j <= ahead.at or later.invars[0 if x_is_lhs else 1] is not x_var:
            continue
        if jc.read(later) != op or explicit_axes(later.outvars[0].aval):
            continue
        w_var = later.invars[1 if x_is_lhs else 0]
        w = None if isinstance(w_var, jcore.Literal) else ahead.env.get(w_var)
        if not isinstance(w, Adapted) or not shareable(w, dropout_on):
            continue
        q = lr.plan(x.shape, w, x_is_lhs, op.dimension_numbers)
        if lr.same_first(p, q):
            found.append((later, q))
    return found


def shared_first(eqn, op: jc.Dot, x, w: Adapted, x_is_lhs: bool, key, ahead: Ahead):
    """This use's ``(x . a, plan)`` when computed together with later uses of ``x`` (now or
    by an earlier use), else None."""
    t = ahead.first.pop(id(eqn), None)
    if t is not None:
        return t, lr.plan(x.shape, w, x_is_lhs, op.dimension_numbers)
    if not shareable(w, key is not None):
        return None
    plan = lr.plan(x.shape, w, x_is_lhs, op.dimension_numbers)
    later = later_uses(eqn, op, x, x_is_lhs, plan, ahead, key is not None)
    if not later:
        return None
    plans = [plan, *(q for _, q in later)]
    ts = lr.first_products(x, plans, op.preferred_element_type, op.precision)
    for (e, _), t in zip(later, ts[1:]):
        ahead.first[id(e)] = t
    return ts[0], plan
