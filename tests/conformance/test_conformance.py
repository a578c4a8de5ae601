"""The conformance suite: every kind of adapted weight, factored and materialised, eager and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import CASES, oracle, random_factors

import lora_jax as lj

MODES = [("factored", False), ("materialized", True)]
JIT = [("eager", lambda f: f), ("jit", jax.jit)]


def _setup(case, seed=0):
    k = jax.random.key(seed)
    params = case.params(k)
    frozen, trainable = lj.split(params, list(case.rules), key=jax.random.fold_in(k, 7))
    inputs = case.inputs(jax.random.fold_in(k, 9))
    return params, frozen, trainable, inputs


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("wrap", JIT, ids=[j[0] for j in JIT])
def test_zero_init_is_identity(case, mode, wrap):
    params, frozen, trainable, inputs = _setup(case)
    apply = wrap[1](lj.lora_apply(case.fn, materialize=mode[1]))
    base = case.fn(params, *inputs)
    np.testing.assert_array_equal(apply(frozen, trainable, *inputs), base)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("wrap", JIT, ids=[j[0] for j in JIT])
def test_matches_float64_oracle(case, mode, wrap):
    # Tolerance: float32 forward of O(1..10) values against a float64 dense computation.
    _, frozen, trainable, inputs = _setup(case)
    trainable = random_factors(trainable, jax.random.key(3))
    out = wrap[1](lj.lora_apply(case.fn, materialize=mode[1]))(frozen, trainable, *inputs)
    np.testing.assert_allclose(out, oracle(case, frozen, trainable, inputs), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_factored_equals_materialized(case):
    _, frozen, trainable, inputs = _setup(case, seed=1)
    trainable = random_factors(trainable, jax.random.key(5))
    fact = jax.jit(lj.lora_apply(case.fn))(frozen, trainable, *inputs)
    mat = jax.jit(lj.lora_apply(case.fn, materialize=True))(frozen, trainable, *inputs)
    np.testing.assert_allclose(fact, mat, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_split_keeps_values_and_merge_unmerge_round_trip(case):
    params, frozen, trainable, _ = _setup(case)
    for path, w in lj._src.core.trees.leaves_with_paths(frozen):
        if w is not None:
            np.testing.assert_array_equal(
                w, dict(lj._src.core.trees.leaves_with_paths(params))[path]
            )
    trainable = random_factors(trainable, jax.random.key(2))
    for wrap in (lambda f: f, jax.jit):
        merged = wrap(lj.merge)(frozen, trainable)
        back = wrap(lj.unmerge)(merged, trainable)
        # Float32 round trip: |W0 + d - d - W0| <= 2 ulp of (|W0| + |d|).
        for (_, w0), (_, w1) in zip(
            lj._src.core.trees.leaves_with_paths(frozen), lj._src.core.trees.leaves_with_paths(back)
        ):
            if w0 is not None:
                np.testing.assert_allclose(
                    w1, w0, rtol=0, atol=1e-5 * (1 + float(jnp.abs(w0).max()))
                )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
def test_gradients_match_float64_oracle(case, mode):
    _, frozen, trainable, inputs = _setup(case)
    trainable = random_factors(trainable, jax.random.key(4))
    loss = lambda t: jnp.sum(lj.lora_apply(case.fn, materialize=mode[1])(frozen, t, *inputs) ** 2)
    grads = jax.jit(jax.grad(loss))(trainable)
    assert jax.tree.structure(grads, is_leaf=lj._src.core.trees.is_node) == jax.tree.structure(
        trainable, is_leaf=lj._src.core.trees.is_node
    )

    with jax.enable_x64(True):
        t64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), trainable)
        f64 = jax.tree.map(
            lambda x: None if x is None else jnp.asarray(np.asarray(x, np.float64)),
            frozen,
            is_leaf=lambda x: x is None,
        )
        in64 = [
            jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(x.dtype, jnp.floating) else x
            for x in inputs
        ]

        def dense_loss(t):
            params = jax.tree.map(
                lambda w, f: (
                    (w + lj.lora_delta(f))
                    if isinstance(f, lj.LoraFactors)
                    else (f if w is None else w)
                ),
                f64,
                t,
                is_leaf=lj._src.core.trees.is_node,
            )
            return jnp.sum(case.fn(params, *in64) ** 2)

        ref = jax.grad(dense_loss)(t64)
        ref = jax.tree.map(np.asarray, ref)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        scale = float(np.abs(r).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(g) / scale, r / scale, atol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_no_recompilation_on_second_step(case):
    _, frozen, trainable, inputs = _setup(case)
    traces = []

    def fn(p, *a):
        traces.append(1)
        return case.fn(p, *a)

    step = jax.jit(jax.grad(lambda t: jnp.sum(lj.lora_apply(fn)(frozen, t, *inputs) ** 2)))
    g1 = step(trainable)
    trainable2 = jax.tree.map(lambda x, g: x - 0.1 * g, trainable, g1)
    step(trainable2)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("dense", "stacked_scan", "conv", "embedding")],
    ids=lambda c: c.name,
)
def test_bf16_base_with_f32_factors_keeps_dtypes(case):
    params, _, _, inputs = _setup(case)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    inputs = tuple(
        x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in inputs
    )
    frozen, trainable = lj.split(params, list(case.rules), key=jax.random.key(0))
    trainable = random_factors(trainable, jax.random.key(1))
    for path, t in lj._src.core.trees.leaves_with_paths(trainable):
        if isinstance(t, lj.LoraFactors):
            assert t.a.dtype == jnp.float32 and t.b.dtype == jnp.float32, path
    base_out = case.fn(params, *inputs)
    out = jax.jit(lj.lora_apply(case.fn))(frozen, trainable, *inputs)
    assert out.dtype == base_out.dtype == jnp.bfloat16
    mat = lj.lora_apply(case.fn, materialize=True)(frozen, trainable, *inputs)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(mat, np.float32), rtol=0.05, atol=0.1
    )
    merged = lj.merge(frozen, trainable)
    for (_, w), (_, m) in zip(
        lj._src.core.trees.leaves_with_paths(frozen), lj._src.core.trees.leaves_with_paths(merged)
    ):
        if w is not None:
            assert m.dtype == w.dtype == jnp.bfloat16
