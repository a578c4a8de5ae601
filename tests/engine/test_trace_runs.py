"""Runs of equations that read no adapted weight are re-bound as one cached jit call.

Tracing cost (experiments/trace_time.py) rests on two properties checked here: the runs of
identical layers share one traced function whatever the depth, and runs that differ in
anything that changes their meaning (a literal, the operand order, a dtype, a name scope)
never share one. Values and gradients are checked against a float64 dense computation of
``W0 + scale * a @ b`` written in the test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.engine import segments

D, R = 8, 2


def _n(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) / np.sqrt(shape[0])


def _norm(h):
    return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)


def _layers(n):
    return {f"l{i}": {"w": _n(i, (D, D))} for i in range(n)}


def _split(params):
    frozen, trainable = lj.split(
        params, lj.LoraRule(r".*/w", rank=R, in_axes=(0,)), key=jax.random.key(7)
    )
    # non-zero b, so the low-rank term is in the values and gradients
    trainable = jax.tree.map(
        lambda t: t.with_factors(t.a, _n(99, t.b.shape)) if isinstance(t, lj.LoraFactors) else t,
        trainable,
        is_leaf=lambda t: isinstance(t, lj.LoraFactors),
    )
    return frozen, trainable


def _count_replays(monkeypatch):
    made = []
    real = segments._replay

    def counting(*args):
        made.append(args)
        return real(*args)

    monkeypatch.setattr(segments, "_replay", counting)
    return made


def test_identical_layers_share_one_traced_run_at_any_depth(monkeypatch):
    def loss(p, x):
        h = x
        for i in range(len(p)):
            h = h + jnp.tanh(_norm(h) @ p[f"l{i}"]["w"]) * 0.5
        return jnp.sum(_norm(h) ** 2)

    made = {}
    for depth in (2, 6):
        frozen, trainable = _split(_layers(depth))
        replays = _count_replays(monkeypatch)
        grad = jax.jit(jax.grad(lambda t, f, x: lj.lora_apply(loss, strict=True)(f, t, x)))
        grad.lower(trainable, frozen, _n(5, (4, D)))
        made[depth] = len(replays)
    assert made[2] > 0, "no run was bound as one call"
    assert made[6] == made[2], made


def _dense(params, trainable):
    """float64 W0 + scale * a @ b per layer, from the factors' own fields."""
    out = {}
    for name, leaf in params.items():
        t = trainable[name]["w"]
        w = np.asarray(leaf["w"], np.float64)
        out[name] = w + t.scale * np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
    return out


VARIANTS = ("base", "literal", "base", "order", "base", "dtype", "base")


def _variant_layer(h, w, variant):
    """One layer; each variant differs from "base" in one thing only."""
    g = _norm(h)
    g = (h - g) if variant == "order" else (g - h)
    g = g - (0.75 if variant == "literal" else 0.5)
    g = g.astype(jnp.bfloat16).astype(h.dtype) if variant == "dtype" else g
    return h + jnp.tanh(g @ w)


def test_runs_that_differ_in_a_literal_operand_order_or_dtype_stay_apart():
    def loss(p, x):
        h = x
        for i, variant in enumerate(VARIANTS):
            h = _variant_layer(h, p[f"l{i}"]["w"], variant)
        return jnp.sum(h**2)

    params = _layers(len(VARIANTS))
    frozen, trainable = _split(params)
    x = _n(5, (4, D))
    value, grads = jax.jit(
        jax.value_and_grad(lambda t, f, x: lj.lora_apply(loss, strict=True)(f, t, x))
    )(trainable, frozen, x)
    with jax.enable_x64(True):
        ws = {k: jnp.asarray(v) for k, v in _dense(params, trainable).items()}
        want, dw = jax.value_and_grad(loss)({k: {"w": v} for k, v in ws.items()}, x.astype(float))
    np.testing.assert_allclose(value, want, rtol=2e-3)
    for name in params:
        t = trainable[name]["w"]
        a, b, g = (np.asarray(m, np.float64) for m in (t.a, t.b, dw[name]["w"]))
        np.testing.assert_allclose(grads[name]["w"].a, t.scale * g @ b.T, rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(grads[name]["w"].b, t.scale * a.T @ g, rtol=2e-3, atol=1e-5)


def test_each_layer_keeps_its_own_name_scope():
    def loss(p, x):
        h = x
        for i in range(len(p)):
            with jax.named_scope(f"block_{i}"):
                h = _variant_layer(h, p[f"l{i}"]["w"], "base")
        return jnp.sum(h**2)

    frozen, trainable = _split(_layers(4))
    lowered = jax.jit(lambda t, f, x: lj.lora_apply(loss)(f, t, x)).lower(
        trainable, frozen, _n(5, (4, D))
    )
    text = lowered.as_text(debug_info=True)
    for i in range(4):
        assert f"block_{i}/rsqrt" in text, f"block_{i}'s norm lost its name scope"


@pytest.mark.parametrize("where", ["eager", "jit"])
def test_a_mutable_array_threaded_through_the_layers(where):
    """Equations with effects (here a ``jax.new_ref`` and its reads and writes) are bound
    one by one: a run may not create or return a mutable array."""

    def loss(p, x):
        h, acc = x, jax.new_ref(jnp.zeros_like(x))
        for i in range(len(p)):
            h = jnp.tanh(_norm(h) @ p[f"l{i}"]["w"])
            acc[...] += h * 2.0
            h = h + acc[...]
        return jnp.sum(h**2)

    params = _layers(3)
    frozen, trainable = _split(params)
    x = _n(5, (4, D))
    fn = lambda t, f, x: lj.lora_apply(loss, strict=True)(f, t, x)
    fn = jax.jit(fn) if where == "jit" else fn
    dense = {k: {"w": jnp.asarray(v, jnp.float32)} for k, v in _dense(params, trainable).items()}
    np.testing.assert_allclose(fn(trainable, frozen, x), loss(dense, x), rtol=1e-5)
