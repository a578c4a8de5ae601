"""NF4 storage: bit-exact against bitsandbytes 0.50 (CPU), round trips, jit, stacking, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax._src.quant.nf4 import NF4_CODE, dynamic_map

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

EXPECTED_CODE = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
SHAPES = [(64,), (5,), (1, 1), (3, 70), (7, 9), (128, 64), (257, 65), (1000, 33)]
DTYPES = {"f32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


def make(shape, kind, seed=0):
    """float32 test data: normal, uniform, outlier-heavy (Student t, df=1), or with zero blocks."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if kind == "uniform":
        x = rng.uniform(-3, 3, n)
    elif kind == "outliers":
        x = rng.standard_t(1, n)
    else:
        x = rng.standard_normal(n)
    if kind == "zero_blocks":
        x[:64] = 0.0  # a full all-zero block
        x[(n // 64) * 64 :] = 0.0  # and a zero partial last block (if any)
        x[-1] = x[-1] if n > 64 else 1.0  # an all-zero matrix: test_all_zero_matrix
    return x.astype(np.float32).reshape(shape)


def both(x_np, dtype):
    """The same values as a jax array and a torch tensor of the given dtype."""
    jdt, tdt = DTYPES[dtype]
    t = torch.from_numpy(x_np).to(tdt)
    return jnp.asarray(t.float().numpy()).astype(jdt), t


def bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def test_code_book_matches_bitsandbytes():
    assert NF4_CODE.tolist() == EXPECTED_CODE
    np.testing.assert_array_equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(dynamic_map(), F.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("kind", ["normal", "uniform", "outliers", "zero_blocks"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_quantize_bit_exact_vs_bitsandbytes(shape, dtype, kind):
    x, t = both(make(shape, kind), dtype)
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)

    q = lj.quantize_nf4(x, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax.numpy()))

    qd = lj.quantize_nf4(x)
    np.testing.assert_array_equal(np.asarray(qd.packed), packed.numpy().reshape(-1))
    _, state_dq = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
    # offset is a float32 mean; summation order may differ by an ulp (rtol 1e-6). XLA treats
    # the subnormal 1e-38 absmax of an all-zero partial block as 0 (atol: float32 tiny).
    tiny = np.finfo(np.float32).tiny
    np.testing.assert_allclose(qd.offset, state_dq.offset.numpy(), rtol=1e-6, atol=tiny)
    # bitsandbytes' second level applied to the same absmax and our offset: bit-exact.
    offset = torch.tensor(np.asarray(qd.offset))
    q2, state2 = F.quantize_blockwise(state.absmax - offset, blocksize=256)
    np.testing.assert_array_equal(np.asarray(qd.qabsmax), q2.numpy())
    np.testing.assert_array_equal(bits(qd.absmax2), bits(state2.absmax.numpy()))
    if np.asarray(qd.offset) == state_dq.offset.numpy():
        np.testing.assert_array_equal(np.asarray(qd.qabsmax), state_dq.absmax.numpy())
        np.testing.assert_array_equal(bits(qd.absmax2), bits(state_dq.state2.absmax.numpy()))


def wrap(packed, state, shape, jdt):
    common = dict(
        packed=jnp.asarray(packed.numpy().reshape(-1)), inner_shape=shape, dtype=jdt, block_size=64
    )
    if state.nested:
        return lj.NF4Array(
            qabsmax=jnp.asarray(state.absmax.numpy()),
            absmax2=jnp.asarray(state.state2.absmax.numpy()),
            offset=jnp.asarray(state.offset.numpy()),
            **common,
        )
    return lj.NF4Array(absmax=jnp.asarray(state.absmax.numpy()), **common)


@pytest.mark.parametrize("dq", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_dequantize_wrapped_bitsandbytes_state_bit_exact(shape, dtype, dq):
    _, t = both(make(shape, "outliers", seed=1), dtype)
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=dq)
    ref = F.dequantize_4bit(packed, state, quant_type="nf4").float().numpy()
    ref = ref.reshape(shape)  # bitsandbytes returns (1, n) for a 1-D weight
    q = wrap(packed, state, shape, DTYPES[dtype][0])
    assert q.shape == shape and q.dtype == DTYPES[dtype][0]
    eager = q.dequantize()
    assert eager.dtype == DTYPES[dtype][0]
    jitted = jax.jit(lambda q: q.dequantize())(q)
    with jax.disable_jit():
        op_by_op = lj.dequantize_nf4(q)
    for out in (eager, jitted, op_by_op):
        np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("dq", [True, False], ids=["double_quant", "plain"])
@pytest.mark.parametrize("shape", [(7, 9), (257, 65)], ids=["7x9", "257x65"])
def test_jit_and_eager_agree(shape, dq):
    x = jnp.asarray(make(shape, "outliers", seed=2))
    q_jit = jax.jit(lambda x: lj.quantize_nf4(x, double_quant=dq))(x)
    with jax.disable_jit():
        q_eager = lj.quantize_nf4(x, double_quant=dq)
        w_eager = q_eager.dequantize()
    for a, b in zip(jax.tree.leaves(q_jit), jax.tree.leaves(q_eager)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(bits(jax.jit(lj.dequantize_nf4)(q_jit)), bits(w_eager))


# Largest distance from a value in [-1, 1] to its nearest NF4 code: half the widest gap.
HALF_GAP = float(np.max(np.diff(NF4_CODE.astype(np.float64)))) / 2


@pytest.mark.parametrize("kind", ["normal", "uniform", "outliers"])
def test_round_trip_matches_float64_nearest_code(kind):
    """Dequantised weights equal a float64 numpy reference (nearest NF4 code times absmax)."""
    x = make((96, 80), kind, seed=3).astype(np.float64)
    q = lj.quantize_nf4(jnp.asarray(x, jnp.float32), double_quant=False)
    blocks = x.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    s = blocks / absmax
    nearest = NF4_CODE.astype(np.float64)[np.abs(s[..., None] - NF4_CODE).argmin(-1)]
    ref = (nearest * absmax).reshape(x.shape)
    got = np.asarray(q.dequantize(jnp.float32), np.float64)
    # Equal to float32 rounding (rtol 1e-6) except where s is within 1e-6 of a midpoint.
    close = np.isclose(got, ref, rtol=1e-6, atol=0)
    assert close.mean() > 0.999
    err = np.abs(got - x).reshape(-1, 64)
    assert np.all(err <= HALF_GAP * absmax * (1 + 1e-6))


def test_double_quant_error_bound():
    x = make((512, 64), "outliers", seed=4)
    q = lj.quantize_nf4(jnp.asarray(x))
    exact = np.abs(x.reshape(-1, 64)).max(axis=1)
    dq = np.asarray(q.block_absmax())
    # 8-bit dynamic codes of (absmax - mean): error <= absmax2 * widest map gap / 2.
    gap = float(np.max(np.diff(dynamic_map().astype(np.float64))))
    scale2 = np.repeat(np.asarray(q.absmax2), 256)[: exact.size]
    assert np.all(np.abs(dq - exact) <= scale2 * gap / 2 + 1e-6 * exact)
    err = np.abs(np.asarray(q.dequantize()) - x).reshape(-1, 64)
    # Codes are chosen with the exact absmax; only the scale they multiply is approximate.
    bound = HALF_GAP * exact + np.abs(dq - exact)
    assert np.all(err <= bound[:, None] * (1 + 1e-6))


def test_memory_bits_per_weight():
    x = jnp.zeros((4096, 4096), jnp.bfloat16)
    q = jax.eval_shape(lj.quantize_nf4, x)
    assert lj.memory_report({"w": q}).quantized_bits_per_weight == pytest.approx(4.127, abs=5e-4)
    exact = 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2
    assert 8 * q.nbytes / x.size == pytest.approx(exact, rel=1e-12)
    plain = jax.eval_shape(lambda x: lj.quantize_nf4(x, double_quant=False), x)
    assert 8 * plain.nbytes / x.size == 4.5


def test_stacked_equals_per_layer_and_scans():
    x = jnp.asarray(make((3, 2, 40, 24), "normal", seed=5)).astype(jnp.bfloat16)
    q = lj.quantize_nf4(x, stack_axes=2)
    assert q.shape == x.shape and q.packed.shape == (3, 2, 480) and q.offset.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = lj.quantize_nf4(x[i, j])
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(q)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i, j])
    _, per_layer = jax.lax.scan(lambda c, ql: (c, ql.dequantize()), None, q)
    np.testing.assert_array_equal(bits(per_layer), bits(q.dequantize()))
    assert jax.tree.map(lambda f: f[0], q).shape == (2, 40, 24)


def test_pytree_and_vmap():
    q = lj.quantize_nf4(jnp.asarray(make((4, 16, 8), "normal")), stack_axes=1)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 4  # packed, qabsmax, absmax2, offset
    assert jax.tree.unflatten(treedef, leaves).shape == (4, 16, 8)
    assert jax.tree.map(lambda f: None, q).packed is None  # non-array leaves skip validation
    out = jax.vmap(lambda ql: ql.dequantize())(q)
    np.testing.assert_array_equal(bits(out), bits(q.dequantize()))


@settings(max_examples=8, deadline=None)
@example(rows=3, cols=16, block=32, dq=False, seed=0)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 150),
    block=st.sampled_from([32, 64, 128]),
    dq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_bit_exact(rows, cols, block, dq, seed):
    x = make((rows, cols), "normal", seed=seed)
    t = torch.from_numpy(x)
    packed, state = F.quantize_4bit(t, blocksize=block, quant_type="nf4", compress_statistics=dq)
    q = lj.quantize_nf4(jnp.asarray(x), block_size=block, double_quant=dq)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    if not dq:
        np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax.numpy()))
    # bitsandbytes' CPU dequantize reads a 2-D state whose last block is partial with the wrong
    # absmax (e.g. (3, 16) at block 32 differs from the same bytes read as (48,)); the format is
    # defined on the flattened weight, so compare with its flat reading.
    state.shape = torch.Size([rows * cols])
    ref = F.dequantize_4bit(packed, state, quant_type="nf4").numpy().reshape(rows, cols)
    got = q.dequantize()
    if dq and np.asarray(q.offset) != state.offset.numpy():
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(bits(got), bits(ref))


@pytest.mark.parametrize("shape", [(5,), (64,), (2, 64)], ids=["partial", "full", "two_full"])
def test_all_zero_matrix(shape):
    x = np.zeros(shape, np.float32)
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
    q = lj.quantize_nf4(jnp.asarray(x), double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    assert set(np.asarray(q.packed).tolist()) == {0x77}
    # bitsandbytes clamps a partial block's absmax to 1e-38 (subnormal); the bits survive.
    np.testing.assert_array_equal(bits(q.absmax), bits(state.absmax.numpy()))
    qd = lj.quantize_nf4(jnp.asarray(x))
    assert not np.any(np.asarray(qd.dequantize()))
    assert np.asarray(qd.absmax2).tolist() == [0.0]  # XLA reads subnormals as zero


def test_odd_count_pads_low_nibble_with_7():
    q = lj.quantize_nf4(jnp.zeros((3, 3)), double_quant=False)
    assert np.asarray(q.packed).tolist() == [0x77] * 5
    q = lj.quantize_nf4(jnp.asarray([[-1.0, 1.0, -1.0]]), block_size=3, double_quant=False)
    assert np.asarray(q.packed).tolist() == [0x0F, 0x07]


def good_fields():
    return lj.quantize_nf4(jnp.ones((8, 16)), block_size=32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": jnp.ones((4, 4), jnp.int32)}, TypeError, "only floating-point"),
        ({"block_size": 0}, ValueError, "block_size=0 must be a positive int"),
        ({"block_size": 1.5}, ValueError, "block_size=1.5"),
        ({"stack_axes": "1"}, TypeError, "stack_axes='1' must be an int"),
        ({"stack_axes": 2}, ValueError, r"stack_axes=2 must be in \[0, 2\)"),
        ({"x": jnp.ones((0, 4))}, ValueError, "no elements per matrix"),
    ],
    ids=["int", "block0", "block_float", "stack_type", "stack_range", "empty"],
)
def test_quantize_errors(kwargs, error, match):
    kwargs = {"x": jnp.ones((4, 4)), **kwargs}
    with pytest.raises(error, match=match):
        lj.quantize_nf4(kwargs.pop("x"), **kwargs)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"packed": jnp.zeros((), jnp.uint8)}, ValueError, r"packed must have at least 1 dim"),
        ({"packed": jnp.zeros((63,), jnp.uint8)}, ValueError, r"packed is uint8\(63,\).*\(64,\)"),
        ({"packed": jnp.zeros((64,), jnp.int8)}, ValueError, r"packed is int8\(64,\)"),
        ({"qabsmax": None}, ValueError, "field qabsmax is missing"),
        ({"absmax2": jnp.zeros((2,))}, ValueError, r"absmax2 is float32\(2,\).*float32\(1,\)"),
        ({"offset": jnp.zeros((1,))}, ValueError, r"offset is float32\(1,\) but expected"),
        ({"absmax": jnp.ones((4,))}, ValueError, "both absmax and double-quantisation"),
        ({"inner_shape": (8.0, 16)}, TypeError, "inner_shape=.* must be a tuple of ints"),
        ({"dtype": jnp.int8}, TypeError, "must be the float dtype"),
        ({"dtype": None}, TypeError, "dtype=None must be"),
        ({"block_size": -1}, ValueError, "block_size=-1 must be a positive int"),
    ],
    ids=[
        "scalar",
        "packed_len",
        "packed_dtype",
        "missing",
        "absmax2",
        "offset",
        "both",
        "inner",
        "dtype",
        "no_dtype",
        "block",
    ],
)
def test_validator_messages(change, error, match):
    q = good_fields()
    fields = dict(
        packed=q.packed,
        qabsmax=q.qabsmax,
        absmax2=q.absmax2,
        offset=q.offset,
        inner_shape=q.inner_shape,
        dtype=q.dtype,
        block_size=q.block_size,
    )
    with pytest.raises(error, match=match):
        lj.NF4Array(**{**fields, **change})


def test_plain_absmax_shape_checked():
    q = lj.quantize_nf4(jnp.ones((8, 16)), double_quant=False)
    with pytest.raises(ValueError, match=r"absmax is float32\(3,\) but expected float32\(2,\)"):
        lj.NF4Array(packed=q.packed, absmax=jnp.ones(3), inner_shape=(8, 16), dtype=jnp.float32)


def test_dequantize_nf4_type_error():
    with pytest.raises(TypeError, match="expects an NF4Array, got ArrayImpl"):
        lj.dequantize_nf4(jnp.ones((2, 2)))


def midpoint_straddlers(count, seed=0):
    """(absmax, y) pairs where y / absmax and y * (1 / absmax) fall on opposite sides of an
    NF4 midpoint, so division and reciprocal-multiplication give different codes."""
    rng = np.random.default_rng(seed)
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    found = []
    while len(found) < count:
        am = np.float32(rng.uniform(0.5, 4))
        m = mids[rng.integers(0, 15)]
        y = np.float32(m * am)
        for step in range(-3, 4):
            z = y
            for _ in range(abs(step)):
                z = np.nextafter(z, np.float32(np.sign(step) * np.inf))
            if ((z / am) > m) != ((z * (np.float32(1) / am)) > m):
                found.append((am, z))
                break
    return found


@pytest.mark.parametrize("n", [3, 64], ids=["partial_block_divides", "full_block_multiplies"])
def test_rounding_of_scale_matches_bitsandbytes(n):
    """bitsandbytes divides in a partial last block and multiplies by the reciprocal in full
    blocks; values straddling a midpoint tell the two apart."""
    for am, y in midpoint_straddlers(12, seed=n):
        x = np.zeros(n, np.float32)
        x[:2] = am, y
        packed, _ = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4")
        q = lj.quantize_nf4(jnp.asarray(x), double_quant=False)
        assert np.asarray(q.packed)[0] == packed.numpy().reshape(-1)[0]
