"""Any pytree: None leaves, NamedTuples, static leaves, custom nodes; fused kernels in summary."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from library_helpers import with_b

import lora_jax as lj

KEY = jax.random.key(0)


class Layer(NamedTuple):
    w: jax.Array
    b: jax.Array | None
    act: object  # a function: a static leaf


def test_none_leaf_the_issue_case_round_trips():
    params = {"w": jnp.ones((4, 4)), "b": None}
    frozen, trainable = lj.split(params, lj.LoraRule("w", rank=2, in_axes=0), key=KEY)
    assert frozen["b"] is None and trainable["b"] is None
    trainable = with_b(trainable, KEY)
    t = trainable["w"]
    want = 1.0 + t.scale * np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
    merged = lj.merge(frozen, trainable)
    np.testing.assert_allclose(merged["w"], want, atol=1e-6)
    assert merged["b"] is None and lj.combine(frozen, trainable)["b"] is None
    np.testing.assert_allclose(lj.unmerge(merged, trainable)["w"], params["w"], atol=1e-6)
    assert lj.summary(frozen, trainable).frozen_params == 16


def test_namedtuple_with_a_static_leaf_keeps_its_type():
    layer = Layer(jax.random.normal(KEY, (6, 3)), None, jnp.tanh)
    fn = lambda p, x: p.act(x @ p.w) if p.b is None else p.act(x @ p.w + p.b)
    x = jnp.ones((2, 6))
    frozen, trainable = lj.split(layer, lj.LoraRule("w", rank=2), key=KEY, apply_fn=fn, args=(x,))
    assert type(frozen) is Layer and frozen.act is jnp.tanh and trainable.act is None
    trainable = with_b(trainable, KEY)
    out = lj.lora_apply(fn, strict=True)(frozen, trainable, x)  # act is closed over
    t = trainable.w
    w = np.asarray(layer.w, np.float64) + t.scale * np.asarray(t.a, np.float64) @ np.asarray(t.b)
    np.testing.assert_allclose(out, np.tanh(np.asarray(x, np.float64) @ w), atol=1e-5)
    assert type(lj.merge(frozen, trainable)) is Layer


def test_rule_targeting_a_static_leaf_raises():
    layer = Layer(jnp.ones((6, 3)), None, jnp.tanh)
    with pytest.raises(TypeError, match=r"'act' is a .*, not an array, but rule 'act' targets it"):
        lj.split(layer, [lj.LoraRule("w", rank=2), lj.LoraRule("act", rank=1)], key=KEY)


def test_rule_matching_only_none_leaves_raises():
    with pytest.raises(ValueError, match=r"rule pattern\(s\) \['b'\] matched no parameter"):
        lj.split(
            {"w": jnp.ones((4, 4)), "b": None},
            [lj.LoraRule("w", rank=2), lj.LoraRule("b", rank=1)],
            key=KEY,
        )


def test_lora_rng_is_ours_and_rng_reaches_the_model():
    fn = lambda p, x, rng: x @ p["w"] + jax.random.normal(rng, (4,))
    params = {"w": jnp.ones((3, 4))}
    rules = lj.LoraRule("w", rank=2, dropout=0.5, in_axes=0)
    frozen, trainable = lj.split(params, rules, key=KEY)
    trainable = with_b(trainable, KEY)
    apply = lj.lora_apply(fn)
    x, rng = jnp.ones((2, 3)), jax.random.key(7)
    no_dropout = apply(frozen, trainable, x, rng=rng)
    np.testing.assert_allclose(
        no_dropout, lj.lora_apply(fn, materialize=True)(frozen, trainable, x, rng=rng), atol=1e-5
    )
    assert not np.allclose(apply(frozen, trainable, x, rng=rng, lora_rng=KEY), no_dropout)


def test_split_without_apply_fn_warns_once_per_call():
    with pytest.warns(lj.LoraLayoutWarning, match=r"2 2-D weight\(s\) 'a', 'b'") as rec:
        lj.split(
            {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}, lj.LoraRule("a|b", rank=1), key=KEY
        )
    assert len([w for w in rec if w.category is lj.LoraLayoutWarning]) == 1


def test_flax_named_kernels_do_not_warn():
    """Flax's ``kernel`` / ``embedding`` names carry their layout; other 2-D names still warn."""
    import warnings

    params = {"dense": {"kernel": jnp.ones((4, 4))}, "nnx": {"kernel": {"value": jnp.ones((4, 4))}}}
    params["embed"] = {"embedding": jnp.ones((8, 4))}
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.LoraLayoutWarning)
        lj.split(params, lj.LoraRule(".*(kernel|embedding).*", rank=1), key=KEY)
    with pytest.warns(lj.LoraLayoutWarning, match=r"1 2-D weight\(s\) 'dense/weight'"):
        lj.split({"dense": {"weight": jnp.ones((4, 4))}}, lj.LoraRule(".*weight", rank=1), key=KEY)


def test_summary_marks_a_fused_kernel():
    params = {"kv": jnp.ones((2, 3, 16, 8)), "q": jnp.ones((3, 16, 8))}
    x = jnp.ones((1, 5, 16))
    fn = lambda p, x: (
        jnp.einsum("BSD,CKDH->CBSKH", x, p["kv"]).sum()
        + jnp.einsum("BSD,NDH->BSNH", x, p["q"]).sum()
    )
    frozen, trainable = lj.split(
        params, lj.LoraRule("kv|q", rank=2), key=KEY, apply_fn=fn, args=(x,)
    )
    s = lj.summary(frozen, trainable)
    assert [r.fused_axis for r in s.rows] == [0, None]
    assert "'kv' looks fused: axis 0 (size 2)" in str(s) and "stack_axes=(0,)" in str(s)
    frozen, trainable = lj.split(
        params,
        [lj.LoraRule("kv", rank=2, stack_axes=(0,)), lj.LoraRule("q", rank=2)],
        key=KEY,
        apply_fn=fn,
        args=(x,),
    )
    assert trainable["kv"].a.shape == (2, 16, 2)  # one adapter per projection
    assert all(r.fused_axis is None for r in lj.summary(frozen, trainable).rows)
