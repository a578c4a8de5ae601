"""QLoRA through the engine: NF4 and int4 bases dequantised at their point of use, per layer."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import random_factors

import lora_jax as lj
from lora_jax._src.core.nbytes import tree_bytes
from lora_jax.models import gpt

CFG = gpt.Config(vocab=64, d_model=256, n_heads=4, d_ff=512, n_layers=4, max_len=16)
RULES = [lj.LoraRule(gpt.LORA_TARGETS, rank=4, stack_axes=(0,))]
TOKENS = jax.random.randint(jax.random.key(3), (2, 9), 0, CFG.vocab)


def _pairs(fmt="nf4"):
    params = gpt.init(jax.random.key(0), CFG)
    quantised = lj.quantize(params, RULES, format=fmt)
    frozen_q, trainable = lj.split(quantised, RULES, key=jax.random.key(1))
    frozen_d, _ = lj.split(params, RULES, key=jax.random.key(1))
    trainable = random_factors(trainable, jax.random.key(2))
    # A realistic update size (|dW| ~ 1% of |W0|) keeps the float32 comparison well conditioned.
    small = lambda t: t.with_factors(t.a, 0.01 * t.b) if isinstance(t, lj.LoraFactors) else t
    trainable = jax.tree.map(small, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))
    return frozen_q, frozen_d, trainable


def _step(materialize):
    def step(frozen, trainable):
        loss = lambda t: lj.lora_apply(gpt.loss, materialize=materialize)(frozen, t, CFG, TOKENS)
        return jax.value_and_grad(loss)(trainable)

    return step


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_quantised_base_factored_equals_dequantised_reference(fmt):
    frozen_q, _, trainable = _pairs(fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.LoraMaterializeWarning)
        loss, grads = jax.jit(_step(False))(frozen_q, trainable)
    # Reference: dequantise the whole base up front and run the same step densely.
    dense = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, lj.QuantizedArray) else w,
        frozen_q,
        is_leaf=lambda x: isinstance(x, lj.QuantizedArray),
    )
    ref_loss, ref_grads = jax.jit(_step(True))(dense, trainable)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max() + 1))


def test_qlora_step_memory():
    frozen_q, frozen_d, trainable = _pairs("nf4")
    mem = {}
    for name, frozen, materialize in (
        ("qlora", frozen_q, False),
        ("qlora_materialized", frozen_q, True),
        ("lora_f32", frozen_d, False),
    ):
        mem[name] = jax.jit(_step(materialize)).lower(frozen, trainable).compile().memory_analysis()
    # Arguments are exactly the quantised storage plus the rest: nothing is dequantised up front.
    expected_args = tree_bytes(frozen_q) + tree_bytes(trainable)
    assert mem["qlora"].argument_size_in_bytes == expected_args
    # 4.127 bits per quantised weight (packed codes, 8-bit absmax, absmax2 and offset).
    quantised = [
        w
        for w in jax.tree.leaves(frozen_q, is_leaf=lambda x: isinstance(x, lj.NF4Array))
        if isinstance(w, lj.NF4Array)
    ]
    bits = 8 * sum(w.nbytes for w in quantised) / sum(int(np.prod(w.shape)) for w in quantised)
    assert bits == pytest.approx(4.127, abs=0.002)
    # Temporaries: at most one layer's dequantised weights on top of what the dense-base
    # LoRA step needs; the materialised reference holds the whole dequantised stack.
    d, f = CFG.d_model, CFG.d_ff
    layer_bytes = 4 * (4 * d * d + 2 * d * f)
    all_layers = CFG.n_layers * layer_bytes
    assert mem["qlora"].temp_size_in_bytes <= mem["lora_f32"].temp_size_in_bytes + layer_bytes
    assert mem["qlora"].temp_size_in_bytes < all_layers / 2
    assert mem["qlora_materialized"].temp_size_in_bytes > all_layers


def test_quantised_frozen_leaf_without_adapter():
    params = {
        "w": jax.random.normal(jax.random.key(0), (64, 32)),
        "v": jax.random.normal(jax.random.key(1), (32, 8)),
    }
    q = lj.quantize(params, ["w"])
    frozen, trainable = lj.split(q, [lj.LoraRule("v", rank=2)], key=jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (5, 64))
    fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    out = jax.jit(lj.lora_apply(fn))(frozen, trainable, x)
    ref = fn({"w": q["w"].dequantize(), "v": params["v"]}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_merge_into_quantised_base_returns_dense():
    frozen_q, _, trainable = _pairs("nf4")
    merged = lj.merge(frozen_q, trainable)
    w = merged["layers"]["attn"]["q"]["kernel"]
    assert isinstance(w, jax.Array) and w.dtype == jnp.float32
    t = trainable["layers"]["attn"]["q"]["kernel"]
    expected = frozen_q["layers"]["attn"]["q"]["kernel"].dequantize() + lj.lora_delta(t)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_merge_requantize_reports_error(fmt):
    frozen_q, _, trainable = _pairs(fmt)
    merged, errors = jax.jit(lambda f, t: lj.merge(f, t, requantize=True))(frozen_q, trainable)
    w = merged["layers"]["attn"]["q"]["kernel"]
    assert type(w) is type(frozen_q["layers"]["attn"]["q"]["kernel"])
    dense = lj.merge(frozen_q, trainable)["layers"]["attn"]["q"]["kernel"]
    err = np.linalg.norm(np.asarray(w.dequantize() - dense)) / np.linalg.norm(np.asarray(dense))
    path = "layers/attn/q/kernel"
    np.testing.assert_allclose(errors[path], err, rtol=1e-4)
    assert 0 < float(errors[path]) < 0.2  # 4-bit round-off of a Gaussian matrix: ~10%
    assert set(errors) == {
        f"layers/{m}/kernel" for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/fc1", "mlp/fc2")
    }


def test_merge_dequantises_unadapted_quantised_leaves():
    params = {
        "w": jax.random.normal(jax.random.key(0), (64, 32)),
        "v": jax.random.normal(jax.random.key(1), (32, 8)),
    }
    q = lj.quantize(params, ["w", "v"])
    frozen, trainable = lj.split(q, [lj.LoraRule("v", rank=2)], key=jax.random.key(2))
    merged = lj.merge(frozen, trainable)
    assert isinstance(merged["w"], jax.Array)
    np.testing.assert_array_equal(merged["w"], q["w"].dequantize())
    kept, _ = lj.merge(frozen, trainable, requantize=True)
    assert isinstance(kept["w"], lj.NF4Array) and isinstance(kept["v"], lj.NF4Array)
