"""AdapterBank, AdapterSet, combine_adapters: mixed batches, slots, recompiles, combinations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import lora_jax as lj
from lora_jax.models import gpt

CFG = gpt.Config(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=16)
is_factors = lambda x: isinstance(x, lj.LoraFactors)


def randomize(trainable, key, std=0.3):
    """Non-zero ``b`` (and perturbed trained leaves) so every adapter changes the output."""
    leaves, tree = jax.tree.flatten(trainable, is_leaf=is_factors)
    out = []
    for i, x in enumerate(leaves):
        k = jax.random.fold_in(key, i)
        if is_factors(x):
            out.append(x.with_factors(x.a, std * jax.random.normal(k, x.b.shape, x.b.dtype)))
        else:
            out.append(x + std * jax.random.normal(k, x.shape, x.dtype))
    return jax.tree.unflatten(tree, out)


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"]["kernel"] + p["w1"]["bias"])
    return h @ p["w2"]["kernel"]


def mlp_params(key=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return {
        "w1": {
            "kernel": jax.random.normal(k1, (12, 16), dtype),
            "bias": jax.random.normal(k2, (16,), dtype),
        },
        "w2": {"kernel": jax.random.normal(k3, (16, 6), dtype)},
    }


def mlp_adapter(params, rank, alpha, seed, rslora=False, full_bias=False):
    rules = [lj.LoraRule(".*kernel", rank=rank, alpha=alpha, rslora=rslora)]
    if full_bias:
        rules.insert(0, lj.LoraRule("w1/bias", full=True))
    frozen, t = lj.split(params, rules, key=jax.random.key(seed))
    return frozen, t, randomize(t, jax.random.key(100 + seed))


def numpy_mlp(params, trainable, x):
    """Dense float64 reference: W0 + scale * a @ b per kernel, trained leaves filled in."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    if trainable is not None:
        for name in ("w1", "w2"):
            f = trainable[name]["kernel"]
            a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
            p[name]["kernel"] = p[name]["kernel"] + f.scale * a @ b
        if trainable["w1"]["bias"] is not None:
            p["w1"]["bias"] = np.asarray(trainable["w1"]["bias"], np.float64)
    h = np.tanh(np.asarray(x, np.float64) @ p["w1"]["kernel"] + p["w1"]["bias"])
    return h @ p["w2"]["kernel"]


SPECS = [(2, 4.0, False), (4, 1.0, False), (6, 16.0, True), (3, 3.0, False)]


@pytest.fixture(scope="module")
def mlp_bank():
    params = mlp_params()
    made = [mlp_adapter(params, r, al, i, rs) for i, (r, al, rs) in enumerate(SPECS)]
    frozen, adapters = made[0][0], [t for _, _, t in made]
    return params, frozen, adapters, lj.stack_adapters(adapters, slots=6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mixed_batch_equals_dense_float64_per_example(mlp_bank, jit):
    params, frozen, adapters, bank = mlp_bank
    ids = jnp.array([0, 1, 2, 3, 4, 2, 5, 4], jnp.int32)
    x = jax.random.normal(jax.random.key(7), (8, 12))
    run = lambda bank, ids, x: lj.lora_apply(mlp)(frozen, bank, x, adapter_ids=ids)
    out = (jax.jit(run) if jit else run)(bank, ids, x)
    assert out.shape == (8, 6)
    for k, slot in enumerate(np.asarray(ids)):
        t = adapters[slot - 1] if 1 <= slot <= len(adapters) else None
        ref = numpy_mlp(params, t, x[k : k + 1])[0]
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-5)  # float32 vs float64


@pytest.mark.slow
def test_gpt_mixed_batch_equals_separate_runs():
    params = gpt.init(jax.random.key(0), CFG)
    adapters = []
    for i, (r, al, rs) in enumerate(SPECS):
        rule = lj.LoraRule(gpt.LORA_TARGETS, rank=r, alpha=al, rslora=rs, stack_axes=(0,))
        frozen, t = lj.split(params, rule, key=jax.random.key(i))
        adapters.append(randomize(t, jax.random.key(10 + i), std=0.1))
    bank = lj.stack_adapters(adapters)
    tokens = jax.random.randint(jax.random.key(5), (6, 8), 0, CFG.vocab)
    ids = jnp.array([0, 1, 2, 3, 4, 2], jnp.int32)
    run = lambda bank, ids, tok: lj.lora_apply(gpt.forward)(frozen, bank, CFG, tok, adapter_ids=ids)
    out = jax.jit(run)(bank, ids, tokens)  # eager runs are covered by the MLP test
    forward = jax.jit(gpt.forward, static_argnums=1)
    for k, slot in enumerate(np.asarray(ids)):
        dense = lj.merge(frozen, adapters[slot - 1]) if slot else params  # W0 + scale * a @ b
        ref = forward(dense, CFG, tokens[k : k + 1])
        np.testing.assert_allclose(out[k], ref[0], rtol=1e-5, atol=1e-5)


def test_base_matmul_runs_once_for_the_batch(mlp_bank):
    _, frozen, _, bank = mlp_bank
    x, ids = jnp.ones((8, 12)), jnp.zeros((8,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda b, i, x: lj.lora_apply(mlp)(frozen, b, x, adapter_ids=i))(
        bank, ids, x
    )
    (cond,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    per_example, one_slot = (branch.jaxpr for branch in cond.params["branches"])

    def dots(jaxpr):
        found = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        shapes = [tuple(tuple(v.aval.shape) for v in e.invars) for e in found]
        return shapes, [e.params["dimension_numbers"][1] != ((), ()) for e in found]

    # Mixed ids: one unbatched base matmul per kernel over all 8 examples; low-rank ones
    # batched (BGMV).
    shapes, batched = dots(per_example)
    assert ((8, 1, 12), (12, 16)) in shapes and ((8, 1, 16), (16, 6)) in shapes
    assert batched.count(False) == 2 and batched.count(True) == len(batched) - 2
    # One slot for the whole batch: the plain factored program, nothing batched per example.
    shapes, batched = dots(one_slot)
    assert ((8, 12), (12, 16)) in shapes and ((8, 16), (16, 6)) in shapes
    assert not any(batched)


def test_one_slot_for_every_example_runs_the_batch_as_one_call(mlp_bank):
    """Identical ids take the one-call path (under jit too); others stay per example. A
    function that centres its batch shows which ran: a batch of 1 centres to zero."""
    params, frozen, adapters, bank = mlp_bank
    x = jax.random.normal(jax.random.key(4), (4, 12))
    centred = lambda p, x: mlp(p, x - x.mean(0))
    run = lambda bank, ids, x: lj.lora_apply(centred)(frozen, bank, x, adapter_ids=ids)
    for go in (run, jax.jit(run)):
        same = go(bank, jnp.full((4,), 2, jnp.int32), x)
        ref = numpy_mlp(params, adapters[1], x - x.mean(0))
        np.testing.assert_allclose(same, ref, rtol=1e-5, atol=1e-5)
        mixed = go(bank, jnp.array([2, 2, 2, 1], jnp.int32), x)
        for k, slot in enumerate((2, 2, 2, 1)):
            ref = numpy_mlp(params, adapters[slot - 1], np.zeros((1, 12)))[0]
            np.testing.assert_allclose(mixed[k], ref, rtol=1e-5, atol=1e-5)
    # An output without the batch axis exists per example only: that path runs.
    total = lambda p, x: jnp.sum(mlp(p, x))
    sums = jax.jit(lambda b, i, x: lj.lora_apply(total)(frozen, b, x, adapter_ids=i))
    got = sums(bank, jnp.full((4,), 2, jnp.int32), x)
    want = [numpy_mlp(params, adapters[1], x[k : k + 1]).sum() for k in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_slot_zero_is_the_base_exactly(mlp_bank):
    params, frozen, _, bank = mlp_bank
    x = jax.random.normal(jax.random.key(3), (5, 12))
    out = lj.lora_apply(mlp)(frozen, bank, x, adapter_ids=jnp.zeros((5,), jnp.int32))
    np.testing.assert_array_equal(out, mlp(params, x))
    scalar = jax.jit(lambda b, x: lj.lora_apply(mlp)(frozen, b, x, adapter_ids=0))(bank, x)
    np.testing.assert_array_equal(scalar, mlp(params, x))


def test_rank_padding_is_inert(mlp_bank):
    _, _, adapters, bank = mlp_bank
    assert bank.max_rank == 6
    for slot, t in enumerate(adapters, 1):
        got = bank.select(slot)["w1"]["kernel"]
        assert got.rank == 6
        np.testing.assert_array_equal(got.a[:, t["w1"]["kernel"].rank :], 0.0)
        np.testing.assert_allclose(
            lj.lora_delta(got), lj.lora_delta(t["w1"]["kernel"]), rtol=1e-6, atol=1e-6
        )


def test_scalar_id_uses_one_slot_for_the_batch(mlp_bank):
    params, frozen, adapters, bank = mlp_bank
    x = jax.random.normal(jax.random.key(4), (3, 12))
    out = lj.lora_apply(mlp)(frozen, bank, x, adapter_ids=jnp.int32(3))
    np.testing.assert_allclose(out, numpy_mlp(params, adapters[2], x), rtol=1e-5, atol=1e-5)


def test_swapping_100_adapters_compiles_once():
    params = mlp_params()
    frozen, first, _ = mlp_adapter(params, 1, 1.0, 0)
    bank = lj.stack_adapters([first], slots=4, max_rank=6)
    traces = []

    @jax.jit
    def step(bank, ids, x):
        traces.append(1)
        return lj.lora_apply(mlp)(frozen, bank, x, adapter_ids=ids)

    rng = np.random.default_rng(0)
    x = jax.random.normal(jax.random.key(1), (4, 12))
    ids = jnp.array([1, 2, 3, 0], jnp.int32)
    for i in range(100):
        rank, alpha = int(rng.integers(1, 7)), float(rng.uniform(0.5, 20.0))
        _, _, t = mlp_adapter(params, rank, alpha, i, rslora=bool(i % 2))
        slot = 1 + i % 3
        bank = bank.set(slot, t)
        out = step(bank, ids, x)
        row = int(np.flatnonzero(np.asarray(ids) == slot)[0])
        ref = numpy_mlp(params, t, x[row : row + 1])[0]
        np.testing.assert_allclose(out[row], ref, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    bank = bank.clear(2)
    np.testing.assert_allclose(step(bank, ids, x)[1], mlp(params, x)[1], rtol=1e-6, atol=1e-6)
    assert len(traces) == 1


def test_fully_trained_leaves_are_stacked_and_slot_zero_takes_base():
    params = mlp_params()
    frozen, init, t1 = mlp_adapter(params, 2, 2.0, 1, full_bias=True)
    _, _, t2 = mlp_adapter(params, 3, 5.0, 2, full_bias=True)
    bank = lj.stack_adapters([t1, t2], base=init)
    assert bank.tree["w1"]["bias"].shape == (3, 16)
    x = jax.random.normal(jax.random.key(2), (3, 12))
    out = lj.lora_apply(mlp)(frozen, bank, x, adapter_ids=jnp.array([0, 1, 2], jnp.int32))
    np.testing.assert_allclose(out[0], numpy_mlp(params, None, x[:1])[0], rtol=1e-5, atol=1e-5)
    for k, t in ((1, t1), (2, t2)):
        ref = numpy_mlp(params, t, x[k : k + 1])[0]
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_a_selected_slot(mlp_bank):
    params, frozen, adapters, bank = mlp_bank
    x = jax.random.normal(jax.random.key(6), (4, 12))
    merged = lj.merge(frozen, bank.select(3))
    ref = numpy_mlp(params, adapters[2], x)
    np.testing.assert_allclose(mlp(merged, x), ref, rtol=1e-5, atol=1e-5)
    back = lj.unmerge(merged, bank.select(3))
    np.testing.assert_allclose(back["w1"]["kernel"], params["w1"]["kernel"], atol=1e-5)


def test_sharded_batch_on_eight_devices(mlp_bank):
    _, frozen, _, bank = mlp_bank
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    x = jax.random.normal(jax.random.key(8), (16, 12))
    ids = jnp.array([0, 1, 2, 3, 4, 5, 1, 2] * 2, jnp.int32)
    run = jax.jit(lambda b, i, x: lj.lora_apply(mlp)(frozen, b, x, adapter_ids=i))
    want = run(bank, ids, x)
    got = run(bank, jax.device_put(ids, shard), jax.device_put(x, shard))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_adapter_set_names_switching_and_disabled():
    params = mlp_params()
    frozen, _, t1 = mlp_adapter(params, 2, 4.0, 1)
    _, _, t2 = mlp_adapter(params, 4, 8.0, 2)
    calls = []

    def counted(p, x):
        calls.append(1)
        return mlp(p, x)

    adapters = lj.AdapterSet(frozen, slots=3, max_rank=4)
    adapters.add("a", t1)
    adapters.add("b", t2)
    assert adapters.names() == ["a", "b"] and adapters.active == "a"
    f = adapters.apply(counted)
    x = jax.random.normal(jax.random.key(9), (3, 12))
    close = lambda got, t: np.testing.assert_allclose(
        got, numpy_mlp(params, t, x), rtol=1e-5, atol=1e-5
    )
    close(f(x), t1)
    adapters.set_active("b")
    close(f(x), t2)
    with adapters.disabled():
        close(f(x), None)
    close(f(x), t2)
    mixed = f(x, adapter=["a", None, "b"])
    for k, t in enumerate((t1, None, t2)):
        np.testing.assert_allclose(mixed[k], numpy_mlp(params, t, x[k : k + 1])[0], atol=1e-5)
    adapters.delete("a")
    adapters.add("c", t1)
    assert adapters.names() == ["c", "b"]
    close(f(x, adapter="c"), t1)
    close(mlp(lj.merge(frozen, adapters.trainable("c")), x), t1)
    # One trace for a scalar slot; per-example slots trace the one-slot and per-example paths.
    assert len(calls) == 3


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("stacked", [False, True], ids=["matrix", "stacked"])
def test_cat_combination_is_the_exact_weighted_sum(jit, stacked):
    with jax.enable_x64(True):
        shape = (3, 7, 5) if stacked else (7, 5)
        params = {"w": jnp.zeros(shape, jnp.float64)}
        ts = []
        for i, (r, al, rs) in enumerate([(2, 3.0, False), (3, 1.5, True)]):
            rule = lj.LoraRule(
                "w",
                rank=r,
                alpha=al,
                rslora=rs,
                param_dtype=jnp.float64,
                stack_axes=(0,) if stacked else None,
            )
            ts.append(
                randomize(lj.split(params, rule, key=jax.random.key(i))[1], jax.random.key(i))
            )
        weights = [0.7, -1.3]
        comb = lambda ts: lj.combine_adapters(ts, weights)
        got = (jax.jit(comb) if jit else comb)(ts)["w"]
        assert got.rank == 5 and got.a.dtype == jnp.float64
        want = sum(
            w * t["w"].scale * np.einsum("...ir,...ro->...io", np.asarray(t["w"].a), t["w"].b)
            for w, t in zip(weights, ts)
        )
        np.testing.assert_allclose(lj.lora_delta(got), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("stacked", [False, True], ids=["matrix", "stacked"])
def test_svd_combination_is_the_best_rank_k_approximation(jit, stacked):
    with jax.enable_x64(True):
        shape = (2, 40, 24) if stacked else (40, 24)
        params = {"w": jnp.zeros(shape, jnp.float64)}
        ts = []
        for i, r in enumerate([3, 4]):
            rule = lj.LoraRule(
                "w",
                rank=r,
                alpha=2.0 * r,
                param_dtype=jnp.float64,
                stack_axes=(0,) if stacked else None,
            )
            ts.append(
                randomize(lj.split(params, rule, key=jax.random.key(i))[1], jax.random.key(i))
            )
        weights, k = [1.0, 0.5], 4
        comb = lambda ts: lj.combine_adapters(ts, weights, method="svd", rank=k)
        got = (jax.jit(comb) if jit else comb)(ts)["w"]
        assert got.rank == k
        total = sum(w * np.asarray(lj.lora_delta(t["w"])) for w, t in zip(weights, ts))
        u, s, vt = np.linalg.svd(total, full_matrices=False)
        best = (u[..., :k] * s[..., None, :k]) @ vt[..., :k, :]
        np.testing.assert_allclose(lj.lora_delta(got), best, rtol=1e-10, atol=1e-10)
        # Never forms a (40, 24) matrix: only (40, r), (24, r) and (r, r) pieces.
        jaxpr = jax.make_jaxpr(comb)(ts)
        shapes = [v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars]
        assert not any(40 in s and 24 in s for s in shapes)


def _err_case(name):
    params = mlp_params()
    frozen, init, t = mlp_adapter(params, 2, 2.0, 0)
    _, _, t6 = mlp_adapter(params, 6, 2.0, 1)
    _, initb, tb = mlp_adapter(params, 2, 2.0, 2, full_bias=True)
    bank = lj.stack_adapters([t], slots=3)
    other = mlp_adapter(mlp_params() | {"w2": {"kernel": jnp.ones((16, 7))}}, 2, 2.0, 3)[2]
    x = jnp.ones((2, 12))
    apply = lj.lora_apply(mlp)
    t16 = jax.tree.map(
        lambda f: f.with_factors(f.a.astype(jnp.bfloat16), f.b.astype(jnp.bfloat16)),
        t,
        is_leaf=is_factors,
    )
    t_in0 = mlp_adapter(params, 2, 2.0, 4)[2]
    t_in0["w2"]["kernel"] = lj.LoraFactors(
        jnp.zeros((6, 2)), jnp.zeros((2, 16)), 2.0, (), (1,), (0,)
    )
    cases = {
        "empty": lambda: lj.stack_adapters([]),
        "slots": lambda: lj.stack_adapters([t, t], slots=2),
        "base": lambda: lj.stack_adapters([tb]),
        "paths": lambda: lj.stack_adapters([t, {"w1": t["w1"]}]),
        "kinds": lambda: lj.stack_adapters([tb, t], base=initb),
        "rank": lambda: lj.stack_adapters([t, t6], max_rank=4),
        "axes": lambda: lj.stack_adapters([t, t_in0]),
        "dtype": lambda: lj.stack_adapters([t, t16]),
        "slot0": lambda: bank.set(0, t),
        "fit": lambda: bank.set(1, other),
        "trained_shape": lambda: lj.stack_adapters(
            [tb, {**tb, "w1": {**tb["w1"], "bias": jnp.zeros(3)}}], base=initb
        ),
        "not_bank": lambda: apply(frozen, t, x, adapter_ids=jnp.zeros(2, jnp.int32)),
        "no_ids": lambda: apply(frozen, bank, x),
        "rng": lambda: apply(frozen, bank, x, adapter_ids=0, lora_rng=jax.random.key(0)),
        "ids_dtype": lambda: apply(frozen, bank, x, adapter_ids=jnp.zeros(2)),
        "ids_range": lambda: apply(frozen, bank, x, adapter_ids=jnp.array([0, 3])),
        "in_axes": lambda: apply(
            frozen, bank, x, adapter_ids=jnp.zeros(2, int), adapter_in_axes=(0, 0)
        ),
        "batch": lambda: apply(frozen, bank, x, adapter_ids=jnp.zeros(3, int)),
        "frozen": lambda: apply({**frozen, "extra": x}, bank, x, adapter_ids=0),
        "w_count": lambda: lj.combine_adapters([t, t], [1.0]),
        "method": lambda: lj.combine_adapters([t], [1.0], method="svd"),
        "c_paths": lambda: lj.combine_adapters([t, {"w1": t["w1"]}], [1.0, 1.0]),
        "c_kinds": lambda: lj.combine_adapters([tb, t], [1.0, 1.0]),
        "svd_rank": lambda: lj.combine_adapters([t], [1.0], method="svd", rank=3),
    }
    return cases[name]


ERRORS = [
    ("empty", ValueError, "at least one trainable"),
    ("slots", ValueError, r"slots=2 cannot hold 2 adapters"),
    ("base", ValueError, r"'w1/bias' fully.*pass base="),
    ("paths", ValueError, r"adapter 1 has leaf None where 'w2/kernel' was expected"),
    ("kinds", ValueError, r"'w1/bias': adapters disagree on this leaf"),
    ("rank", ValueError, r"'w1/kernel': rank 6 is larger than the bank's rank 4.*max_rank=6"),
    ("axes", ValueError, r"'w2/kernel'.*must adapt each weight the same way"),
    ("dtype", ValueError, r"'w1/kernel': factors are bfloat16/bfloat16 but others are float32"),
    ("slot0", ValueError, r"slot=0 is outside 1\.\.2; slot 0 is the base"),
    ("fit", ValueError, r"'w2/kernel': factors .* do not fit the bank's"),
    ("trained_shape", ValueError, r"'w1/bias': trained leaf shape \(3,\) != \(16,\)"),
    ("not_bank", TypeError, "adapter_ids= needs an AdapterBank"),
    ("no_ids", ValueError, "pass adapter_ids="),
    ("rng", ValueError, "without LoRA dropout"),
    ("ids_dtype", ValueError, r"adapter_ids must be integer slots.*float32"),
    ("ids_range", ValueError, r"adapter_ids has slot 3 but the bank has slots 0\.\.\.2"),
    ("in_axes", ValueError, r"adapter_in_axes=\(0, 0\) has 2 entries but fn got 1"),
    ("batch", ValueError, r"adapter_ids has shape \(3,\) but the batched arguments"),
    ("frozen", ValueError, "trainable tree does not match frozen tree"),
    ("w_count", ValueError, "got 2 adapters and 1 weights"),
    ("method", ValueError, r"method='svd' with rank=None"),
    ("c_paths", ValueError, r"adapter 1 has leaves"),
    ("c_kinds", ValueError, r"'w1/bias': the adapters hold different things"),
    ("svd_rank", ValueError, r"'w1/kernel': rank=3 must be in 1\.\.min\(summed rank 2"),
]


@pytest.mark.parametrize("name,error,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, error, match):
    with pytest.raises(error, match=match):
        _err_case(name)()


def test_adapter_set_errors():
    params = mlp_params()
    frozen, _, t = mlp_adapter(params, 2, 2.0, 0)
    adapters = lj.AdapterSet(frozen, slots=2)
    with pytest.raises(ValueError, match="holds no adapters yet"):
        adapters.trainable()
    adapters.add("a", t)
    with pytest.raises(ValueError, match="an adapter named 'a' exists"):
        adapters.add("a", t)
    with pytest.raises(ValueError, match=r"all 1 adapter slots are used"):
        adapters.add("b", t)
    with pytest.raises(KeyError, match=r"no adapter named 'z'; have \['a'\]"):
        adapters.set_active("z")


def test_adalora_singular_values_survive_banks_and_combinations():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
    f = lambda p, x: x @ p["w"]  # noqa: E731
    adapters = []
    for i in range(2):
        frozen, t = lj.split(params, lj.LoraRule("w", rank=3, adalora=True), key=jax.random.key(i))
        w = t["w"]
        singular = jax.random.normal(jax.random.key(10 + i), w.singular.shape)
        adapters.append({"w": dataclasses.replace(w, singular=singular)})
    x = jax.random.normal(jax.random.key(5), (2, 8))
    want = [f(lj.merge(frozen, t), x) for t in adapters]  # W0 + scale * a diag(s) b
    bank = lj.stack_adapters(adapters)
    got = lj.lora_apply(f)(frozen, bank, x, adapter_ids=jnp.array([1, 2]))
    np.testing.assert_allclose(got, jnp.stack([want[0][0], want[1][1]]), rtol=1e-5, atol=1e-5)
    comb = lj.combine_adapters(adapters, [1.0, 1.0])
    np.testing.assert_allclose(
        f(lj.merge(frozen, comb), x), want[0] + want[1] - f(params, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bad", [6, 9, -1], ids=["one-past", "far", "negative"])
def test_out_of_range_ids_raise_eagerly_and_give_nan_under_jit(mlp_bank, bad):
    params, frozen, adapters, bank = mlp_bank  # slots 0..5
    x = jax.random.normal(jax.random.key(8), (3, 12))
    run = lambda bank, ids, x: lj.lora_apply(mlp)(frozen, bank, x, adapter_ids=ids)
    ids = jnp.array([0, bad, 1], jnp.int32)
    with pytest.raises(ValueError, match=rf"adapter_ids has slot {bad} but the bank has slots 0"):
        run(bank, ids, x)
    out = np.asarray(jax.jit(run)(bank, ids, x))
    assert np.isnan(out[1]).all()  # never the last slot's (or slot -1's) adapter
    for k, t in ((0, None), (2, adapters[0])):  # the valid examples are unaffected
        np.testing.assert_allclose(
            out[k], numpy_mlp(params, t, x[k : k + 1])[0], rtol=1e-5, atol=1e-5
        )
    scalar = jax.jit(lambda b, x, i: lj.lora_apply(mlp)(frozen, b, x, adapter_ids=i))
    assert np.isnan(np.asarray(scalar(bank, x, jnp.int32(bad)))).all()


def test_mixed_batch_through_fused_and_convolved_weights():
    """A fused projection (two adapted kernels concatenated) and a convolution, served from one
    mixed batch without materialising anything, against float64 per example."""
    k = jax.random.split(jax.random.key(11), 3)
    params = {
        "q": jax.random.normal(k[0], (8, 4)),
        "k": jax.random.normal(k[1], (8, 4)),
        "conv": jax.random.normal(k[2], (3, 8, 5)),  # (width, in, out)
    }

    def model(p, x):  # x (batch, length, 8)
        fused = jnp.concatenate([p["q"], p["k"]], axis=1)
        dn = ("NWC", "WIO", "NWC")
        y = jax.lax.conv_general_dilated(x, p["conv"], (1,), "SAME", dimension_numbers=dn)
        return jnp.concatenate([x @ fused, y], axis=-1)

    rules = [
        lj.LoraRule("q|k", rank=2, alpha=3.0, in_axes=(0,)),
        lj.LoraRule("conv", rank=3, alpha=6.0, in_axes=(0, 1)),
    ]
    adapters = []
    for i in range(3):
        frozen, t = lj.split(params, rules, key=jax.random.key(20 + i))
        adapters.append(randomize(t, jax.random.key(30 + i)))
    bank = lj.stack_adapters(adapters)
    x = jax.random.normal(jax.random.key(12), (4, 6, 8))
    ids = jnp.array([2, 0, 3, 1], jnp.int32)
    run = lambda b, i, x: lj.lora_apply(model, strict=True)(frozen, b, x, adapter_ids=i)
    out = jax.jit(run)(bank, ids, x)  # strict: a materialised weight would raise

    def reference(t, x):
        p = {n: np.asarray(w, np.float64) for n, w in params.items()}
        if t is not None:
            for n in p:
                a, b = np.asarray(t[n].a, np.float64), np.asarray(t[n].b, np.float64)
                p[n] = p[n] + t[n].scale * np.einsum("...r,ro->...o", a, b)
        x = np.asarray(x, np.float64)
        fused = np.concatenate([p["q"], p["k"]], axis=1)
        padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
        y = sum(padded[:, j : j + x.shape[1]] @ p["conv"][j] for j in range(3))
        return np.concatenate([x @ fused, y], axis=-1)

    for row, slot in enumerate(np.asarray(ids)):
        t = adapters[slot - 1] if slot else None
        ref = reference(t, x[row : row + 1])[0]
        np.testing.assert_allclose(out[row], ref, rtol=2e-5, atol=2e-5)


def test_materialized_mixed_batch_equals_dense_float64(mlp_bank):
    """lora_apply(materialize=True) with a bank merges each example's slot factors."""
    params, frozen, adapters, bank = mlp_bank
    ids = jnp.array([3, 0, 1, 4], jnp.int32)
    x = jax.random.normal(jax.random.key(9), (4, 12))
    run = lambda b, i, x: lj.lora_apply(mlp, materialize=True)(frozen, b, x, adapter_ids=i)
    out = jax.jit(run)(bank, ids, x)
    for row, slot in enumerate(np.asarray(ids)):
        t = adapters[slot - 1] if slot else None
        np.testing.assert_allclose(
            out[row], numpy_mlp(params, t, x[row : row + 1])[0], rtol=1e-5, atol=1e-5
        )
