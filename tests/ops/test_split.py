"""LoraRule, split, merge/unmerge, summary: values, structure, errors, abstract 7B trees."""

import re
import time

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import random_factors
from hypothesis import given, settings

import lora_jax as lj


def _params():
    k = jax.random.key(0)
    return {
        "params": {
            "encoder": {
                "layer_0": {
                    "query": {"kernel": jax.random.normal(k, (16, 12)), "bias": jnp.zeros(12)},
                    "value": {"kernel": jax.random.normal(k, (16, 12)), "bias": jnp.zeros(12)},
                },
            },
            "classifier": {"kernel": jnp.ones((12, 2)), "bias": jnp.zeros(2)},
            "step": jnp.zeros((), jnp.int32),
        }
    }


RULES = [
    lj.LoraRule(r".*/(query|value)/kernel", rank=4, alpha=8.0),
    lj.LoraRule(r".*/classifier/.*", full=True),
]


def test_split_structure_and_init():
    params = _params()
    frozen, trainable = lj.split(params, RULES, key=jax.random.key(1))
    q = trainable["params"]["encoder"]["layer_0"]["query"]["kernel"]
    assert isinstance(q, lj.LoraFactors)
    assert q.a.shape == (16, 4) and q.b.shape == (4, 12) and q.scale == 2.0
    np.testing.assert_array_equal(q.b, 0.0)
    assert float(jnp.std(q.a)) > 0
    v = trainable["params"]["encoder"]["layer_0"]["value"]["kernel"]
    assert not np.allclose(q.a, v.a), "each leaf must get its own key"
    assert frozen["params"]["classifier"]["kernel"] is None
    np.testing.assert_array_equal(trainable["params"]["classifier"]["kernel"], 1.0)
    assert trainable["params"]["encoder"]["layer_0"]["query"]["bias"] is None
    assert frozen["params"]["step"].dtype == jnp.int32


def test_split_is_deterministic_and_keyed():
    params = _params()
    _, t1 = lj.split(params, RULES, key=jax.random.key(1))
    _, t2 = lj.split(params, RULES, key=jax.random.key(1))
    _, t3 = lj.split(params, RULES, key=jax.random.key(2))
    a = lambda t: t["params"]["encoder"]["layer_0"]["query"]["kernel"].a
    np.testing.assert_array_equal(a(t1), a(t2))
    assert not np.allclose(a(t1), a(t3))


def test_stacked_layers_get_their_own_factors():
    params = {"layers": {"w": jnp.ones((3, 8, 6))}}
    _, t = lj.split(
        params, [lj.LoraRule("layers/w", rank=2, stack_axes=(0,))], key=jax.random.key(0)
    )
    f = t["layers"]["w"]
    assert f.a.shape == (3, 8, 2) and f.b.shape == (3, 2, 6)
    assert not np.allclose(f.a[0], f.a[1])


def test_alpha_defaults_rslora_and_kaiming():
    assert lj.LoraRule("x", rank=8).scale == 2.0
    assert lj.LoraRule("x", rank=16, alpha=8.0, rslora=True).scale == pytest.approx(2.0)
    params = {"w": jnp.ones((100, 10))}
    _, t = lj.split(params, [lj.LoraRule("w", rank=4, init="kaiming")], key=jax.random.key(0))
    assert float(jnp.abs(t["w"].a).max()) <= 1 / np.sqrt(100)


def test_merge_and_unmerge_with_full_leaves():
    params = _params()
    frozen, trainable = lj.split(params, RULES, key=jax.random.key(1))
    trainable = random_factors(trainable, jax.random.key(2))
    merged = jax.jit(lj.merge)(frozen, trainable)
    q = trainable["params"]["encoder"]["layer_0"]["query"]["kernel"]
    expected = np.asarray(params["params"]["encoder"]["layer_0"]["query"]["kernel"], np.float64)
    expected = expected + q.scale * np.asarray(q.a, np.float64) @ np.asarray(q.b, np.float64)
    np.testing.assert_allclose(
        merged["params"]["encoder"]["layer_0"]["query"]["kernel"], expected, rtol=1e-6, atol=1e-5
    )
    np.testing.assert_array_equal(merged["params"]["classifier"]["kernel"], 1.0)
    back = lj.unmerge(merged, trainable)
    assert back["params"]["classifier"]["kernel"] is None
    np.testing.assert_allclose(
        back["params"]["encoder"]["layer_0"]["query"]["kernel"],
        params["params"]["encoder"]["layer_0"]["query"]["kernel"],
        atol=1e-5,
    )


def test_summary_counts():
    frozen, trainable = lj.split(_params(), RULES, key=jax.random.key(1))
    s = lj.summary(frozen, trainable)
    assert s.trainable_params == 2 * 4 * (16 + 12) + 12 * 2 + 2
    assert s.total_params == 2 * 16 * 12 + 2 * 12 + 12 * 2 + 2 + 1
    text = str(s)
    assert "params/encoder/layer_0/query/kernel" in text and "lora" in text and "full" in text
    assert lj.count_params(trainable) == s.trainable_params


def _llama7b_shapes():
    d, f, n, v = 4096, 11008, 32, 32000
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    layer = lambda: {
        "attn": {k: {"kernel": sds(d, d)} for k in ("q", "k", "v", "o")},
        "mlp": {
            "gate": {"kernel": sds(d, f)},
            "up": {"kernel": sds(d, f)},
            "down": {"kernel": sds(f, d)},
        },
        "norm": {"scale": sds(d)},
    }
    return {"embed": sds(v, d), "layers": [layer() for _ in range(n)], "head": sds(d, v)}


def test_abstract_7b_split_and_summary():
    params = _llama7b_shapes()
    rules = [lj.LoraRule(r"layers/\d+/attn/(q|v)/kernel", rank=8)]
    t0 = time.perf_counter()
    frozen, trainable = jax.eval_shape(lambda p: lj.split(p, rules, key=jax.random.key(0)), params)
    elapsed = time.perf_counter() - t0
    s = lj.summary(frozen, trainable)
    rows = [r for r in s.rows if r.kind == "lora"]
    assert len(rows) == 64
    assert all(r.trainable == 65_536 and r.base / r.trainable == 256.0 for r in rows)
    assert s.trainable_params == 64 * 65_536
    assert 6.5e9 < s.total_params < 7.0e9
    assert elapsed < 60, "abstract split must not allocate or compute"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "rank=0 must be positive"),
        (dict(rank=-2), ValueError, "rank=-2 must be positive"),
        (dict(rank=2.5), TypeError, "rank must be a positive int"),
        (dict(), TypeError, "rank must be a positive int"),
        (dict(rank=4, alpha=0.0), ValueError, "alpha=0.0 must be a finite number > 0"),
        (dict(rank=4, alpha=float("nan")), ValueError, "alpha=nan must be a finite number"),
        (dict(rank=4, alpha=-1), ValueError, "alpha=-1 must be"),
        (dict(rank=4, dropout=1.0), ValueError, r"dropout=1.0 must be in \[0, 1\)"),
        (dict(rank=4, init="xavier"), ValueError, "init='xavier' is not one of"),
        (dict(rank=4, param_dtype=jnp.int32), ValueError, "param_dtype=.* must be a float dtype"),
        (dict(full=True, rank=4), ValueError, "full=True trains the leaf fully"),
        (dict(rank=4, in_axes=("a",)), TypeError, "in_axes must be a tuple of ints"),
    ],
    ids=lambda x: str(x)[:30],
)
def test_rule_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        lj.LoraRule("x", **kwargs)


def test_rule_regex_and_type_errors():
    with pytest.raises(ValueError, match="invalid regex"):
        lj.LoraRule("(unclosed", rank=2)
    with pytest.raises(TypeError, match="pattern must be a str"):
        lj.LoraRule(3, rank=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dora_typo'"):
        lj.LoraRule("x", rank=2, dora_typo=True)


def test_split_errors_name_path_shape_and_fix():
    params = _params()
    key = jax.random.key(0)
    with pytest.raises(
        ValueError,
        match=r"rank=20 is larger than min\(in, out\)=min\(16, 12\) "
        r"for 'params/encoder/layer_0/query/kernel' with shape \(16, 12\)",
    ):
        lj.split(params, [lj.LoraRule(".*query/kernel", rank=20)], key=key)
    with pytest.raises(ValueError, match=r"\['nothing/matches'\] matched no parameter"):
        lj.split(params, [RULES[0], lj.LoraRule("nothing/matches", rank=2)], key=key)
    with pytest.raises(ValueError, match="every leaf would be frozen"):
        lj.split(params, [], key=key)
    with pytest.raises(TypeError, match=r"'params/step' has dtype int32 .* only floating-point"):
        lj.split(params, [lj.LoraRule("params/step", rank=1)], key=key)
    with pytest.raises(ValueError, match=r"'params/encoder/layer_0/query/bias' has shape \(12,\)"):
        lj.split(params, [lj.LoraRule(".*query/bias", rank=1)], key=key)
    with pytest.raises(ValueError, match="params is an empty tree"):
        lj.split({}, RULES, key=key)
    with pytest.raises(TypeError, match="rules must be LoraRule instances"):
        lj.split(params, ["query"], key=key)


def test_split_axis_errors():
    key = jax.random.key(0)
    p3 = {"w": jnp.ones((4, 3, 5))}
    with pytest.raises(
        ValueError, match=r"'w' has shape \(4, 3, 5\) .* is ambiguous. Set LoraRule\(in_axes"
    ):
        lj.split(p3, [lj.LoraRule("w", rank=1)], key=key)
    with pytest.raises(ValueError, match=r"stack_axes=\(1,\) must be the leading axes"):
        lj.split(p3, [lj.LoraRule("w", rank=1, stack_axes=(1,))], key=key)
    with pytest.raises(ValueError, match=r"in_axes=\(0, 1, 2\) leave no output axis"):
        lj.split(p3, [lj.LoraRule("w", rank=1, in_axes=(0, 1, 2))], key=key)
    with pytest.raises(ValueError, match=r"has axis 5 out of range for 3 dims"):
        lj.split(p3, [lj.LoraRule("w", rank=1, in_axes=(5,))], key=key)
    with pytest.raises(ValueError, match=r"in_axes=\(0,\) overlap stack_axes=\(0,\)"):
        lj.split(p3, [lj.LoraRule("w", rank=1, in_axes=(0,), stack_axes=(0,))], key=key)
    with pytest.raises(ValueError, match=r"could not infer the input axes of \['w'\]"):
        lj.split(
            p3,
            [lj.LoraRule("w", rank=1)],
            key=key,
            apply_fn=lambda p, x: x * 2.0,
            args=(jnp.ones(3),),
        )


def test_pair_errors():
    frozen, trainable = lj.split(_params(), RULES, key=jax.random.key(1))
    q = trainable["params"]["encoder"]["layer_0"]["query"]["kernel"]
    wide = jax.tree.map(lambda x: x, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))
    with jax.enable_x64(True):
        wide["params"]["encoder"]["layer_0"]["query"]["kernel"] = q.with_factors(
            q.a.astype(jnp.float64), q.b.astype(jnp.float64)
        )
        with pytest.raises(
            ValueError,
            match="are float64 but the base is float32; applying them would upcast the base",
        ):
            lj.merge(frozen, wide)
    both = dict(trainable)
    with pytest.raises(ValueError, match="fully trained array but frozen also holds one"):
        lj.merge(jax.tree.map(lambda x: x, lj.combine(frozen, trainable)), both)
    with pytest.raises(ValueError, match="merged tree has .* leaves but trainable has"):
        lj.unmerge({"w": jnp.ones((2, 2))}, trainable)
    bad = {"w": q}
    with pytest.raises(ValueError, match=r"merged weight of shape \(3, 3\) does not match factors"):
        lj.unmerge({"w": jnp.ones((3, 3))}, bad)
    with pytest.raises(ValueError, match="trainable has factors but frozen has no weight"):
        lj.merge({"w": None}, bad)


def test_inferred_axes_for_einsum_kernels():
    params = {"qkv": jnp.ones((8, 2, 3)), "out": jnp.ones((2, 3, 8)), "stack": jnp.ones((4, 8, 8))}

    def fn(p, x):
        h = jnp.einsum("bd,dhk->bhk", x, p["qkv"])
        y = jnp.einsum("bhk,hkd->bd", h, p["out"])
        y, _ = jax.lax.scan(lambda c, w: (c @ w, None), y, p["stack"])
        return y

    x = jax.ShapeDtypeStruct((5, 8), jnp.float32)
    rules = [lj.LoraRule(".*", rank=2)]
    _, t = lj.split(params, rules, key=jax.random.key(0), apply_fn=fn, args=(x,))
    assert (t["qkv"].stack_axes, t["qkv"].in_axes, t["qkv"].out_axes) == ((), (0,), (1, 2))
    assert (t["out"].stack_axes, t["out"].in_axes, t["out"].out_axes) == ((), (0, 1), (2,))
    assert (t["stack"].stack_axes, t["stack"].in_axes, t["stack"].out_axes) == ((0,), (1,), (2,))


# ----------------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)  # each example compiles a scan: ~4 s on CI
@given(
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    layers=st.integers(0, 3),
    rank=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_round_trips_property(d_in, d_out, layers, rank, seed):
    rank = min(rank, d_in, d_out)
    shape = ((layers,) if layers else ()) + (d_in, d_out)
    w = jax.random.normal(jax.random.key(seed), shape)
    rule = lj.LoraRule("w", rank=rank, stack_axes=(0,) if layers else None)
    frozen, trainable = lj.split({"w": w}, [rule], key=jax.random.key(seed + 1))
    np.testing.assert_array_equal(frozen["w"], w)
    trainable = random_factors(trainable, jax.random.key(seed + 2))
    back = lj.unmerge(lj.merge(frozen, trainable), trainable)
    np.testing.assert_allclose(back["w"], w, atol=1e-5 * (1 + float(jnp.abs(w).max()) + rank))

    def fn(p, x):
        if layers:
            return jax.lax.scan(lambda c, wi: (c, c @ wi), x, p["w"])[1]
        return x @ p["w"]

    x = jax.random.normal(jax.random.key(seed + 3), (3, d_in))
    fact = lj.lora_apply(fn)(frozen, trainable, x)
    mat = lj.lora_apply(fn, materialize=True)(frozen, trainable, x)
    np.testing.assert_allclose(fact, mat, rtol=1e-5, atol=1e-4 * (1 + rank))


def test_readme_paths_are_slash_joined():
    frozen, _ = lj.split(_params(), RULES, key=jax.random.key(1))
    paths = [p for p, _ in lj._src.core.trees.leaves_with_paths(frozen)]
    assert "params/encoder/layer_0/query/kernel" in paths
    assert all(re.fullmatch(r"[\w/]+", p) for p in paths)


@pytest.mark.parametrize(
    "variant", [{}, {"dora": True}, {"adalora": True}], ids=["lora", "dora", "adalora"]
)
def test_split_on_sharded_params_creates_sharded_factors(variant):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(AxisType.Auto,) * 2)
    w = jax.device_put(
        jax.random.normal(jax.random.key(0), (16, 8)), NamedSharding(mesh, P("fsdp", "model"))
    )
    params = {"w": w, "unplaced": jnp.ones((4, 4))}
    frozen, trainable = lj.split(
        params, [lj.LoraRule("w|unplaced", rank=2, **variant)], key=jax.random.key(1)
    )
    assert frozen["w"] is w
    assert trainable["w"].a.sharding.spec == P("fsdp", None)
    assert trainable["w"].b.sharding.spec == P(None, "model")
    if variant.get("dora"):
        assert trainable["w"].magnitude.sharding.spec == P("model")
    _, ref = lj.split(
        jax.tree.map(np.asarray, params),
        [lj.LoraRule("w|unplaced", rank=2, **variant)],
        key=jax.random.key(1),
    )
    # Same random values as an unsharded split (jit may fuse the init scale: 1 ulp).
    np.testing.assert_allclose(trainable["w"].a, ref["w"].a, rtol=1e-6)
    np.testing.assert_allclose(trainable["unplaced"].a, ref["unplaced"].a, rtol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_split_on_sharded_params_keeps_the_residual_base(init):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(AxisType.Auto,) * 2)
    w = jax.device_put(
        jax.random.normal(jax.random.key(0), (16, 8)), NamedSharding(mesh, P("fsdp", "model"))
    )
    frozen, trainable = lj.split(
        {"w": w}, lj.LoraRule("w", rank=2, init=init), key=jax.random.key(1)
    )
    assert frozen["w"].sharding.spec == P("fsdp", "model")
    np.testing.assert_allclose(lj.merge(frozen, trainable)["w"], w, atol=1e-5)


@pytest.mark.parametrize(
    "variant, extra",
    [({}, 0), ({"dora": True}, 8), ({"adalora": True}, 2)],
    ids=["lora", "dora-magnitude", "adalora-singular"],
)
def test_counts_include_every_factor_array(variant, extra):
    params = {"w": jnp.ones((16, 8))}
    frozen, trainable = lj.split(params, lj.LoraRule("w", rank=2, **variant), key=jax.random.key(0))
    expected = 16 * 2 + 2 * 8 + extra
    assert lj.count_params(trainable) == lj.summary(frozen, trainable).trainable_params == expected
