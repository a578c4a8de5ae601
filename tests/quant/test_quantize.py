"""Int4 storage, tree-level lj.quantize, lj.memory_report and the QLoRA memory experiment."""

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

ROOT = pathlib.Path(__file__).resolve().parents[2]


def int4_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy float32: scale = absmax / 7 per block, code = round-half-even(x / scale)."""
    flat = x.astype(np.float32).reshape(-1)
    n = flat.size
    nb = -(-n // block)
    blocks = np.pad(flat, (0, nb * block - n)).reshape(nb, block)
    scale = (np.abs(blocks).max(axis=1) / np.float32(7)).astype(np.float32)
    den = np.maximum(scale, np.finfo(np.float32).tiny)[:, None]
    codes = np.clip(np.round(blocks / den), -7, 7).reshape(-1)[:n]
    return codes.astype(np.int8), scale


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(64,), (7, 9), (33, 100)], ids=["64", "7x9", "33x100"])
def test_int4_matches_numpy_and_bound(shape, dtype, block):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_t(3, shape).astype(np.float32)).astype(dtype)
    x32 = np.asarray(x, np.float32)
    q = lj.quantize_int4(x, block_size=block)
    codes, scale = int4_reference(x32, block)
    np.testing.assert_array_equal(np.asarray(q.codes, np.int8), codes)
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    out = lj.dequantize_int4(q, jnp.float32)
    assert lj.dequantize_int4(q).dtype == dtype and q.shape == shape
    ref = (codes.astype(np.float64) * np.repeat(scale, block)[: codes.size]).reshape(shape)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-6, atol=0)
    err = np.abs(np.asarray(out, np.float64) - x32).reshape(-1)
    bound = np.repeat(scale.astype(np.float64), block)[: err.size] / 2
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)


def test_int4_jit_eager_stacked_and_bytes():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 40, 24)), jnp.float32)
    q = lj.quantize_int4(x, stack_axes=1)
    with jax.disable_jit():
        q_eager = lj.quantize_int4(x, stack_axes=1)
    q_jit = jax.jit(lambda x: lj.quantize_int4(x, stack_axes=1))(x)
    for a, b, c in zip(jax.tree.leaves(q), jax.tree.leaves(q_eager), jax.tree.leaves(q_jit)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    for i in range(3):
        one = lj.quantize_int4(x[i])
        np.testing.assert_array_equal(np.asarray(one.codes), np.asarray(q.codes[i]))
    _, layers = jax.lax.scan(lambda c, ql: (c, ql.dequantize()), None, q)
    np.testing.assert_array_equal(np.asarray(layers), np.asarray(q.dequantize()))
    # 4 bits per code plus a float32 scale per 64 weights: 4.5 bits.
    assert 8 * q.nbytes / x.size == 4.5


@pytest.mark.parametrize(
    "change, match",
    [
        ({"codes": jnp.zeros((), jnp.int4)}, r"codes must have at least 1 dim"),
        ({"codes": jnp.zeros((16,), jnp.int8)}, r"codes is int8\(16,\) but expected int4\(16,\)"),
        ({"scale": jnp.zeros((2,))}, r"scale is float32\(2,\) but expected float32\(1,\)"),
        ({"scale": None}, "field scale is missing"),
    ],
    ids=["scalar", "dtype", "scale_shape", "scale_missing"],
)
def test_int4_validator(change, match):
    q = lj.quantize_int4(jnp.ones((4, 4)))
    fields = dict(codes=q.codes, scale=q.scale, inner_shape=(4, 4), dtype=jnp.float32)
    with pytest.raises(ValueError, match=match):
        lj.Int4Array(**{**fields, **change})


def test_int4_errors():
    with pytest.raises(TypeError, match="expects an Int4Array, got NF4Array"):
        lj.dequantize_int4(lj.quantize_nf4(jnp.ones((4, 4))))
    with pytest.raises(TypeError, match="quantize_int4: x has dtype int32"):
        lj.quantize_int4(jnp.ones((4, 4), jnp.int32))


def tree():
    rng = np.random.default_rng(2)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "embed": {"embedding": f(50, 16)},
        "layers": {"q": {"kernel": f(3, 16, 16)}, "mlp": {"kernel": f(3, 16, 32)}},
        "head": {"kernel": f(16, 8), "bias": f(8)},
        "step": jnp.zeros((2, 2), jnp.int32),
        "hole": None,
    }


def kinds(t):
    return {p: type(w).__name__ for p, w in lj._src.core.trees.leaves_with_paths(t)}


def test_quantize_selects_by_regex_rule_and_predicate():
    params = tree()
    by_regex = lj.quantize(
        params,
        [r"layers/.*/kernel", "head/kernel"],
        stack_axes=lambda p, w: 1 if p.startswith("layers") else 0,
    )
    by_rule = lj.quantize(
        params,
        [
            lj.LoraRule(r"layers/.*/kernel", rank=2, stack_axes=(0,)),
            lj.LoraRule("head/kernel", rank=2),
        ],
    )
    by_pred = lj.quantize(
        params,
        lambda p, w: p.endswith("kernel") and not p.startswith("embed"),
        stack_axes=lambda p, w: w.ndim - 2,
    )
    for out in (by_regex, by_rule, by_pred):
        k = kinds(out)
        assert k["layers/q/kernel"] == k["layers/mlp/kernel"] == k["head/kernel"] == "NF4Array"
        assert k["embed/embedding"] == "ArrayImpl" and k["hole"] == "NoneType"
        assert out["head"]["bias"] is params["head"]["bias"]
        assert out["layers"]["q"]["kernel"].packed.shape == (3, 128)  # stacked per layer
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(by_regex)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = params["layers"]["mlp"]["kernel"]
    deq = by_rule["layers"]["mlp"]["kernel"].dequantize()
    assert deq.shape == w.shape
    assert float(jnp.max(jnp.abs(deq - w))) < 0.15 * float(jnp.max(jnp.abs(w)))


def test_quantize_int4_format_and_eval_shape():
    params = tree()
    out = lj.quantize(params, "head/kernel", format="int4", block_size=32)
    assert (
        isinstance(out["head"]["kernel"], lj.Int4Array) and out["head"]["kernel"].block_size == 32
    )
    abstract = jax.eval_shape(lambda p: lj.quantize(p, r"layers/.*", stack_axes=1), params)
    concrete = lj.quantize(params, r"layers/.*", stack_axes=1)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert abstract["layers"]["q"]["kernel"].shape == (3, 16, 16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_split_and_merge_on_quantised_base(dtype):
    params = jax.tree.map(lambda x: x.astype(dtype), {"w": tree()["head"]["kernel"]})
    rules = [lj.LoraRule("w", rank=4)]
    frozen, trainable = lj.split(lj.quantize(params, rules), rules, key=jax.random.key(0))
    t = trainable["w"]
    t = t.with_factors(t.a, jnp.ones_like(t.b) * 0.1)
    merged = lj.merge(frozen, {"w": t})["w"]
    assert merged.dtype == dtype
    base = np.asarray(frozen["w"].dequantize(jnp.float32), np.float64)
    ref = base + t.scale * np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(merged, np.float64), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda p: lj.quantize(p, "nope/.*"),
            ValueError,
            r"pattern\(s\) \['nope/\.\*'\] matched no leaf",
        ),
        (lambda p: lj.quantize(p, lambda path, w: False), ValueError, "picked no weight"),
        (lambda p: lj.quantize(p, "hole"), ValueError, "picked no weight"),
        (lambda p: lj.quantize(p, "step"), TypeError, "'step' has dtype int32"),
        (lambda p: lj.quantize(p, "head/bias"), ValueError, r"'head/bias' has shape \(8,\)"),
        (
            lambda p: lj.quantize(p, r"layers/q/kernel", stack_axes=2),
            ValueError,
            r"shape \(3, 16, 16\) with stack_axes=2",
        ),
        (
            lambda p: lj.quantize(p, "head/kernel", format="fp4"),
            ValueError,
            "format='fp4' is not one of",
        ),
        (
            lambda p: lj.quantize(p, "head/kernel", stack_axes=-1),
            ValueError,
            "stack_axes for 'head/kernel' is -1",
        ),
        (lambda p: lj.quantize(p, [3]), TypeError, "got int"),
        (
            lambda p: lj.quantize(lj.quantize(p, "head/kernel"), "head/kernel"),
            TypeError,
            "already a NF4Array",
        ),
    ],
    ids=[
        "unmatched",
        "predicate_none",
        "only_none",
        "int",
        "1d",
        "stack",
        "format",
        "stack_neg",
        "select_type",
        "twice",
    ],
)
def test_quantize_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(tree())


def test_memory_report_exact_bytes_concrete_and_abstract():
    params = {"w": jnp.ones((128, 64), jnp.bfloat16), "b": jnp.zeros(64), "h": jnp.ones((16, 8))}
    rules = [lj.LoraRule("w", rank=4), lj.LoraRule("h", full=True)]

    def build(p):
        frozen, trainable = lj.split(p, rules, key=jax.random.key(0))
        return lj.quantize(frozen, "w"), trainable

    frozen, trainable = build(params)
    opt = optax.adam(1e-3).init(trainable)
    report = lj.memory_report(frozen, trainable, optimizer_state=opt)
    # NF4 (128 x 64): 4096 packed + 128 qabsmax + 4 absmax2 + 4 offset; bias 64 x 4.
    assert report.quantized_bytes == 4096 + 128 + 4 + 4
    assert report.frozen_bytes == report.quantized_bytes + 256
    assert report.frozen_params == 128 * 64 + 64
    assert report.quantized_params == 128 * 64
    # factors a (128, 4), b (4, 64) and the fully trained h (16, 8), all float32.
    assert report.trainable_params == 128 * 4 + 4 * 64 + 16 * 8
    assert report.trainable_bytes == report.gradient_bytes == 4 * report.trainable_params
    assert report.optimizer_bytes == 2 * report.trainable_bytes + 4  # mu, nu, int32 count
    assert report.total_bytes == report.frozen_bytes + 4 * report.trainable_bytes + 4
    text = str(report)
    assert "8,192 weights quantised at 4.133 bits" in text and text.splitlines()[-1].startswith(
        "total"
    )

    a_frozen, a_trainable = jax.eval_shape(build, params)
    a_opt = jax.eval_shape(optax.adam(1e-3).init, a_trainable)
    assert lj.memory_report(a_frozen, a_trainable, optimizer_state=a_opt) == report


def test_memory_report_counts_int4_at_four_bits():
    frozen = {"w": lj.quantize_int4(jnp.ones((64, 64)))}
    report = lj.memory_report(frozen)
    assert report.quantized_bytes == 64 * 64 // 2 + 4 * 64
    assert report.quantized_bits_per_weight == 4.5
    assert report.trainable_bytes == report.optimizer_bytes == 0
    assert lj.memory_report({"w": jnp.ones(3)}).quantized_bits_per_weight is None


def load_experiment():
    path = ROOT / "experiments" / "qlora_memory.py"
    spec = importlib.util.spec_from_file_location("qlora_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_qlora_memory_smoke_writes_only_its_section(tmp_path):
    exp = load_experiment()
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n## Other (x.py)\n\nkeep me\n")
    for _ in range(2):
        body = exp.main(["--smoke", "--out", str(out)])
    text = out.read_text()
    assert text.count(f"## {exp.TITLE}") == 1 and "## Other (x.py)\n\nkeep me" in text
    assert "`python experiments/qlora_memory.py --smoke`" in text
    rows = [
        line
        for line in body.splitlines()
        if line.startswith("| tiny") or line.startswith("| small")
    ]
    assert len(rows) == 6
    assert "QLoRA fits in 48 GiB" in body and "NF4 throughput, 256 x 256" in body


def test_llama_7b_memory_matches_hand_count():
    """QLoRA on 7B: linear layers at 4.127 bits, rest bf16, r=64 factors in float32."""
    exp = load_experiment()
    m = exp.MODELS[0]
    reports = exp.reports(m)
    linear = m.layers * (4 * m.d * m.d + 3 * m.d * m.ffn)
    other = 2 * m.vocab * m.d + (2 * m.layers + 1) * m.d
    qlora = reports["QLoRA, NF4 base"]
    assert qlora.quantized_params == linear
    assert qlora.frozen_bytes - qlora.quantized_bytes == 2 * other
    lora_params = m.layers * 64 * (4 * 2 * m.d + 3 * (m.d + m.ffn))
    assert qlora.trainable_params == lora_params and qlora.trainable_bytes == 4 * lora_params
    bits = 4 + 8 / 64 + 32 / (64 * 256)
    assert qlora.quantized_bytes == pytest.approx(linear * bits / 8, rel=1e-4)
    full = reports["full bf16 fine-tuning"]
    assert full.trainable_params == linear + other
    assert full.total_bytes == 12 * (linear + other) + 4
    assert math.isclose(reports["LoRA, bf16 base"].frozen_bytes, 2 * (linear + other))
