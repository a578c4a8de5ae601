"""Weight kinds shared by the conformance suite: a params tree, a function using it, rules, inputs.

Each case's function is written the way model code uses that kind of weight, so the
engine sees the same primitives it meets in real models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

import lora_jax as lj


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    params: Callable[[jax.Array], dict]
    fn: Callable[..., jax.Array]
    rules: tuple[lj.LoraRule, ...]
    inputs: Callable[[jax.Array], tuple]


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


def _dense(p, x):
    return jnp.tanh(x @ p["w"]) @ p["head"]


def _embedding(p, ids):
    return jnp.take(p["table"], ids, axis=0) * 2.0 + p["table"][ids + 1]


def _tied(p, ids):
    h = p["table"][ids]
    return jnp.einsum("btd,vd->btv", h, p["table"])


def _conv(p, img):
    y = lax.conv_general_dilated(
        img, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(y)


def _dense_general(p, x):
    h = jnp.einsum("btd,dhk->bthk", x, p["qkv"])
    return jnp.einsum("bthk,hkd->btd", jnp.tanh(h), p["out"])


def _stacked(p, x):
    def layer(h, w):
        return jnp.tanh(h @ w["w"]) + h, None

    h, _ = lax.scan(layer, x, p["layers"])
    return h


def _batched_heads(p, x):
    return jnp.einsum("bhd,hdk->bhk", x, p["heads"])


def _reshaped(p, x):
    w = p["w"].reshape(8, 2, 3).transpose(0, 2, 1).reshape(8, 6)
    return x @ w.astype(x.dtype)


CASES = [
    Case(
        "dense",
        lambda k: {"w": _normal(k, (8, 6)), "head": _normal(jax.random.fold_in(k, 1), (6, 3))},
        _dense,
        (lj.LoraRule("w", rank=3), lj.LoraRule("head", full=True)),
        lambda k: (_normal(k, (2, 4, 8)),),
    ),
    Case(
        "embedding",
        lambda k: {"table": _normal(k, (20, 6))},
        _embedding,
        (lj.LoraRule("table", rank=2),),
        lambda k: (jax.random.randint(k, (2, 5), 0, 19),),
    ),
    Case(
        "tied_embedding",
        lambda k: {"table": _normal(k, (20, 6))},
        _tied,
        (lj.LoraRule("table", rank=2),),
        lambda k: (jax.random.randint(k, (2, 5), 0, 20),),
    ),
    Case(
        "conv",
        lambda k: {"kernel": _normal(k, (3, 3, 4, 5))},
        _conv,
        (lj.LoraRule("kernel", rank=2, in_axes=(0, 1, 2)),),
        # Scaled so the adapted layer is not saturated: |tanh| > 0.999 for 0% of outputs
        # (63% before), 88% below 0.9.
        lambda k: (0.1 * _normal(k, (2, 6, 6, 4)),),
    ),
    Case(
        "dense_general",
        lambda k: {
            "qkv": _normal(k, (8, 2, 3)),
            "out": _normal(jax.random.fold_in(k, 1), (2, 3, 8)),
        },
        _dense_general,
        (lj.LoraRule("qkv", rank=2, in_axes=(0,)), lj.LoraRule("out", rank=2, in_axes=(0, 1))),
        lambda k: (_normal(k, (2, 4, 8)),),
    ),
    Case(
        "stacked_scan",
        lambda k: {"layers": {"w": _normal(k, (3, 8, 8)) / 3}},
        _stacked,
        (lj.LoraRule("layers/w", rank=2, stack_axes=(0,)),),
        lambda k: (_normal(k, (2, 4, 8)),),
    ),
    Case(
        "batched_heads",
        lambda k: {"heads": _normal(k, (3, 8, 5))},
        _batched_heads,
        (lj.LoraRule("heads", rank=2, stack_axes=(0,)),),
        lambda k: (_normal(k, (2, 3, 8)),),
    ),
    Case(
        "reshaped_view",
        lambda k: {"w": _normal(k, (8, 6))},
        _reshaped,
        (lj.LoraRule("w", rank=2),),
        lambda k: (_normal(k, (2, 8)),),
    ),
]


def random_factors(trainable: Any, key: jax.Array) -> Any:
    """Replace every b (zero at init) by random values so the adapter is exercised."""

    def leaf(t):
        if isinstance(t, lj.LoraFactors):
            return t.with_factors(t.a, jax.random.normal(key, t.b.shape, t.b.dtype))
        return t

    return jax.tree.map(leaf, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))


def oracle(case: Case, frozen: Any, trainable: Any, inputs: tuple) -> Any:
    """``fn(W0 + scale * a @ b)`` computed densely in float64 (independent of lora_apply)."""
    import numpy as np

    with jax.enable_x64(True):
        to64 = lambda x: (
            jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(x.dtype, jnp.floating) else x
        )

        def eff(w, t):
            if isinstance(t, lj.LoraFactors):
                a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
                a_spec, b_spec, w_spec = lj._src.core.factors.factor_specs(t)
                delta = np.einsum(f"{a_spec},{b_spec}->{w_spec}", a, b) * t.scale
                return jnp.asarray(np.asarray(w, np.float64) + delta)
            return to64(t if w is None else w)

        params = jax.tree.map(eff, frozen, trainable, is_leaf=lj._src.core.trees.is_node)
        out = case.fn(params, *[to64(x) for x in inputs])
        return np.asarray(out)


def all_shapes(jaxpr):
    """Shapes of every value computed by an equation, sub-jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for sub in jcore.jaxprs_in_params(eqn.params):
            shapes += all_shapes(sub)
    return shapes
