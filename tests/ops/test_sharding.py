"""Factor shardings, sharded split, and the reference training step on every mesh layout.

Tolerances: float32 runs on a sharded mesh reduce in a different order than on one
device, so losses and adapters after 3 AdamW steps agree to ``rtol = atol = 1e-5``
(measured: <= 5e-7 for losses, <= 1.5e-6 for adapters). merge/unmerge against float64
numpy: ``atol = 1e-5``.
"""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import comm_bytes  # noqa: E402
import sharded_step as ss  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _norm(spec, ndim):
    """A PartitionSpec as a tuple padded with None to ``ndim`` entries."""
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def _assert_same_shardings(arrays, shardings):
    """Every array's sharding is equivalent (same device layout) to the given one."""
    flat = jax.tree.leaves(shardings)
    assert len(jax.tree.leaves(arrays)) == len(flat)
    for x, s in zip(jax.tree.leaves(arrays), flat):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def _one(shape, spec, rule, overrides=None):
    params = {"w": jnp.zeros(shape)}
    _, trainable = lj.split(params, rule, key=jax.random.key(0))
    s = lj.factor_shardings({"w": spec}, trainable, overrides=overrides)["w"]
    return _norm(s.a, trainable["w"].a.ndim), _norm(s.b, trainable["w"].b.ndim)


SPEC_CASES = [
    # (shape, base spec, rule kwargs, overrides, expected a spec, expected b spec)
    ((16, 8), P("fsdp", "model"), {}, None, ("fsdp", None), (None, "model")),
    ((16, 8), P("fsdp"), {}, None, ("fsdp", None), (None, None)),
    ((16, 8), P("fsdp", "model"), {"in_axes": (1,)}, None, ("model", None), (None, "fsdp")),
    (
        (4, 16, 8),
        P("data", "fsdp", "model"),
        {"stack_axes": (0,), "in_axes": (1,)},
        None,
        ("data", "fsdp", None),
        ("data", None, "model"),
    ),
    (
        (4, 8, 16),
        P("model", None, "fsdp"),
        {"in_axes": (0, 1)},
        None,
        ("model", None, None),
        (None, "fsdp"),
    ),
    ((16, 8), P("fsdp", "model"), {}, {"w": "column"}, (None, None), (None, "model")),
    ((16, 8), P("model", "fsdp"), {}, {"w": "row"}, ("model", None), (None, None)),
    (
        (16, 8),
        P("fsdp", "model"),
        {},
        {"w": lambda path, spec, t: (P(None, spec[1]), P(spec[1], None))},
        (None, "model"),
        ("model", None),
    ),
]


@pytest.mark.parametrize(
    "shape,spec,kw,overrides,want_a,want_b",
    SPEC_CASES,
    ids=["2d", "short_spec", "in_axis_1", "stacked", "two_in_axes", "column", "row", "callable"],
)
def test_factor_specs(shape, spec, kw, overrides, want_a, want_b):
    rank = 2
    rule = lj.LoraRule("w", rank=rank, **kw)
    assert _one(shape, spec, rule, overrides) == (want_a, want_b)


def test_factor_shardings_tree_mesh_and_full_leaves():
    mesh = ss.make_mesh("fsdp_tp")
    params = {"q": jnp.zeros((16, 8)), "head": jnp.zeros((8, 4)), "ln": jnp.zeros((8,))}
    rules = [lj.LoraRule("q", rank=2), lj.LoraRule("head", full=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    specs = {"q": P("fsdp", "model"), "head": P(None, "model"), "ln": P()}
    out = lj.factor_shardings(specs, trainable, mesh=mesh)
    assert out["ln"] is None
    assert out["head"] == NamedSharding(mesh, P(None, "model"))
    assert out["q"].a == NamedSharding(mesh, P("fsdp", None))
    assert out["q"].b == NamedSharding(mesh, P(None, "model"))
    assert out["q"].in_axes == trainable["q"].in_axes and out["q"].alpha == trainable["q"].alpha
    # NamedShardings (or placed arrays) carry their own mesh; abstract trainable trees work
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    abstract = jax.eval_shape(lambda p: lj.split(p, rules, key=jax.random.key(0))[1], params)
    assert lj.factor_shardings(named, abstract) == out
    placed = jax.tree.map(jax.device_put, params, named)
    assert lj.factor_shardings(placed, trainable) == out
    # plain PartitionSpecs without a mesh stay PartitionSpecs
    assert lj.factor_shardings(specs, trainable)["q"].a == P("fsdp", None)


def _pair():
    params = {"q": jnp.zeros((16, 8)), "head": jnp.zeros((8, 4))}
    rules = [lj.LoraRule("q", rank=2), lj.LoraRule("head", full=True)]
    return lj.split(params, rules, key=jax.random.key(0))


def test_factor_shardings_errors():
    frozen, trainable = _pair()
    specs = {"q": P("fsdp"), "head": P()}
    with pytest.raises(ValueError, match="'head' is trainable but specs has no entry"):
        lj.factor_shardings({"q": P("fsdp"), "head": None}, trainable)
    with pytest.raises(ValueError, match=r"overrides\['q'\] = 'diagonal': expected one of"):
        lj.factor_shardings(specs, trainable, overrides={"q": "diagonal"})
    with pytest.raises(TypeError, match="overrides must be a dict"):
        lj.factor_shardings(specs, trainable, overrides=[("q", "row")])
    with pytest.raises(ValueError, match=r"override pattern\(s\) \['k'\] matched no adapted"):
        lj.factor_shardings(specs, trainable, overrides={"k": "row"})
    with pytest.raises(ValueError, match="'q': PartitionSpec .* has 3 entries but the weight"):
        lj.factor_shardings({"q": P("a", "b", "c"), "head": P()}, trainable)
    with pytest.raises(TypeError, match="'q': expected a PartitionSpec, a NamedSharding"):
        lj.factor_shardings({"q": np.zeros((16, 8)), "head": P()}, trainable)
    with pytest.raises(ValueError, match="'q': specs are bare PartitionSpecs and no mesh"):
        lj.split_sharded(
            {"q": jnp.zeros((16, 8))},
            lj.LoraRule("q", rank=2),
            key=jax.random.key(0),
            specs={"q": P("fsdp")},
        )


@pytest.mark.parametrize("layout", ["fsdp", "tp", "fsdp_tp"], ids=["fsdp", "tp", "fsdp_tp"])
def test_split_sharded_matches_split(layout):
    cfg = ss.Config()
    mesh = ss.make_mesh(layout)
    host = ss.init_params(cfg)
    specs = ss.param_specs(host, layout)
    params = ss.place(host, specs, mesh)
    rules = [*ss.rules(cfg), lj.LoraRule("head/kernel", full=True)]
    frozen, trainable = lj.split_sharded(
        params, rules, key=jax.random.key(3), overrides=ss.overrides(layout)
    )
    ref_frozen, ref_trainable = lj.split(host, rules, key=jax.random.key(3))
    want = lj.factor_shardings(specs, trainable, mesh=mesh, overrides=ss.overrides(layout))
    for x, y, s in zip(
        jax.tree.leaves(trainable), jax.tree.leaves(ref_trainable), jax.tree.leaves(want)
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding == s
        assert x.addressable_shards[0].data.shape == s.shard_shape(x.shape)
    head = params["head"]["kernel"]
    assert (
        frozen["head"]["kernel"] is None and trainable["head"]["kernel"].sharding == head.sharding
    )
    q = frozen["layer_0"]["attn"]["q"]["kernel"]
    assert q is params["layer_0"]["attn"]["q"]["kernel"]  # frozen leaves are not copied
    assert jax.tree.structure(frozen) == jax.tree.structure(ref_frozen)


def _random_b(trainable, seed=1):
    leaves, treedef = jax.tree.flatten(trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))
    out = []
    for i, t in enumerate(leaves):
        if isinstance(t, lj.LoraFactors):
            b = jax.random.normal(jax.random.key(seed + i), t.b.shape, t.b.dtype)
            t = t.with_factors(t.a, jax.device_put(b, t.b.sharding))
        out.append(t)
    return jax.tree.unflatten(treedef, out)


def _weights_ref(frozen_host, trainable):
    """``(keys, W0 + scale * a @ b)`` in float64 numpy for every adapted 2-D kernel."""
    out = []
    for path, t in jax.tree_util.tree_flatten_with_path(
        trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors)
    )[0]:
        w0 = frozen_host
        for k in path:
            w0 = w0[k.key]
        a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
        out.append(([k.key for k in path], w0.astype(np.float64) + t.scale * a @ b))
    return out


@pytest.mark.parametrize("layout", ["fsdp", "tp", "fsdp_tp"], ids=["fsdp", "tp", "fsdp_tp"])
def test_merge_unmerge_keep_shardings_without_gathers(layout):
    cfg = ss.Config()
    mesh = ss.make_mesh(layout)
    host = ss.init_params(cfg)
    specs = ss.param_specs(host, layout)
    params = ss.place(host, specs, mesh)
    frozen, trainable = lj.split_sharded(
        params, ss.rules(cfg), key=jax.random.key(0), overrides=ss.overrides(layout)
    )
    trainable = _random_b(trainable)
    shardings = jax.tree.map(lambda x: x.sharding, frozen)
    ref = _weights_ref(host, trainable)
    merge = jax.jit(lj.merge, donate_argnums=0)
    unmerge = jax.jit(lj.unmerge, donate_argnums=0)
    hlo = merge.lower(frozen, trainable).compile().as_text()
    hlo += unmerge.lower(frozen, trainable).compile().as_text()
    assert [c for c in comm_bytes.collectives(hlo) if c[0] == "all-gather"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "donated buffers were not usable" would raise
        merged = merge(frozen, trainable)
        assert frozen["layer_0"]["attn"]["q"]["kernel"].is_deleted()
        _assert_same_shardings(merged, shardings)
        merged_host = jax.tree.map(lambda x: np.asarray(x, np.float64), merged)
        restored = unmerge(merged, trainable)
    _assert_same_shardings(restored, shardings)
    for path, want in ref:
        m, r, w0 = merged_host, restored, host
        for k in path:
            m, r, w0 = m[k], r[k], w0[k]
        np.testing.assert_allclose(m, want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(r), w0, atol=1e-5)


@pytest.mark.parametrize("layout", ["tp", "fsdp_tp"], ids=["tp", "fsdp_tp"])
def test_lora_apply_tensor_parallel_never_gathers_weights(layout):
    cfg = ss.Config(vocab=96)  # no other weight shares an adapted kernel's shape
    mesh = ss.make_mesh(layout)
    host = ss.init_params(cfg)
    params = ss.place(host, ss.param_specs(host, layout), mesh)
    frozen, trainable = lj.split_sharded(
        params, ss.rules(cfg), key=jax.random.key(0), overrides=ss.overrides(layout)
    )
    trainable = _random_b(trainable)
    tokens = jax.device_put(ss.tokens_for(cfg, 0)[:, :-1], NamedSharding(mesh, ss.BATCH_SPEC))
    apply = jax.jit(lambda f, t, x: lj.lora_apply(ss.forward)(f, t, x, cfg))
    hlo = apply.lower(frozen, trainable, tokens).compile().as_text()
    d, f = cfg.d_model, cfg.d_ff
    gathered = {
        s for op, _, shapes in comm_bytes.collectives(hlo) if op == "all-gather" for s in shapes
    }
    # tp gathers no weight; fsdp_tp gathers a kernel's 'fsdp' axis, never its 'model' axis
    assert not {(d, d), (d, f), (f, d)} & gathered, gathered
    logits = apply(frozen, trainable, tokens)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    assert logits.sharding.shard_shape(logits.shape)[0] == cfg.batch // n_batch
    device = jax.devices()[0]
    merged = jax.device_put(lj.merge(frozen, trainable), device)
    dense = jax.jit(lambda p, x: ss.forward(p, x, cfg))(merged, jax.device_put(tokens, device))
    # float32 on both sides; the 16-way sharded reductions sum in another order than the one-device
    # merged run (max difference 2.2e-4 measured on this machine's CPU for fsdp_tp), so 5e-4.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), rtol=1e-4, atol=5e-4)


# expected (a, b) specs of layer_0's q (column-parallel) and o (row-parallel) factors
LAYOUT_SPECS = {
    "data": {"q": ((None, None), (None, None)), "o": ((None, None), (None, None))},
    "fsdp": {"q": (("fsdp", None), (None, None)), "o": (("fsdp", None), (None, None))},
    "tp": {"q": ((None, None), (None, "model")), "o": (("model", None), (None, None))},
    "fsdp_tp": {"q": ((None, None), (None, "model")), "o": (("model", None), (None, None))},
}


@pytest.fixture(scope="module")
def reference():
    return ss.run_single(ss.Config())


class CompileCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _compare(losses, trainable, reference):
    ref_losses, ref_trainable = reference
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    assert jax.tree.structure(trainable) == jax.tree.structure(ref_trainable)
    for x, y in zip(jax.tree.leaves(trainable), jax.tree.leaves(ref_trainable)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)
    b0 = ref_trainable["layer_0"]["attn"]["q"]["kernel"].b
    assert float(jnp.abs(b0).max()) > 1e-3  # the adapters did move


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUT_SPECS), ids=list(LAYOUT_SPECS))
def test_sharded_step_matches_single_device(layout, reference):
    cfg = ss.Config()
    s = ss.setup_sharded(cfg, layout)
    for name, (want_a, want_b) in LAYOUT_SPECS[layout].items():
        t = s.trainable["layer_0"]["attn"][name]["kernel"]
        assert (_norm(t.a.sharding.spec, 2), _norm(t.b.sharding.spec, 2)) == (want_a, want_b)
    trainable, opt_state, losses = s.trainable, s.opt_state, []
    counts = []
    for i in range(3):
        tokens = jax.device_put(ss.tokens_for(cfg, i), s.batch_sharding)
        with CompileCounter() as counter:
            new, opt_state, loss = s.step(s.frozen, trainable, opt_state, tokens)
        counts.append(counter.count)
        assert trainable["layer_0"]["attn"]["q"]["kernel"].a.is_deleted()  # donated
        trainable = new
        losses.append(float(loss))
    assert counts[0] >= 1 and counts[1:] == [0, 0]
    _assert_same_shardings(trainable, s.trainable_sharding)
    _compare(losses, trainable, reference)


@pytest.mark.slow
def test_pmap_step_matches_single_device(reference):
    losses, trainable = ss.run_pmap(ss.Config())
    _compare(losses, trainable, reference)


def test_comm_bytes_smoke():
    m = comm_bytes.measure(comm_bytes.SMOKE)
    # LoRA all-reduces exactly the factor gradients (plus the 4-byte loss)
    assert m["lora"] == m["adapted_lora"] + 4
    assert m["full"] == m["all_full"] + 4
    assert m["materialized"] == m["adapted_full"] + 4
    assert "LoRA / full (measured)" in comm_bytes.table(comm_bytes.SMOKE, m)


def test_collectives_parser():
    hlo = (
        "  %ar = (f32[64,4]{1,0}, f32[4,64]{1,0}) all-reduce(%x, %y), replica_groups={}\n"
        "  %rs = bf16[8,16]{1,0} reduce-scatter(%z), dimensions={0}\n"
        "  %ag = f32[16,8]{1,0} all-gather-start(f32[2,8]{1,0} %w), dimensions={0}\n"
    )
    got = comm_bytes.collectives(hlo)
    assert got == [
        ("all-reduce", 2 * 64 * 4 * 4, ((64, 4), (4, 64))),
        ("reduce-scatter", 8 * 16 * 2, ((8, 16),)),
        ("all-gather", 16 * 8 * 4, ((16, 8),)),
    ]
    assert comm_bytes.reduced_bytes(hlo, 8) == 2 * 64 * 4 * 4 + 8 * 8 * 16 * 2


def test_write_results_replaces_only_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Other\n\nkeep me\n")
    comm_bytes.write_results("first\n", path)
    comm_bytes.write_results("second\n", path)
    text = path.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count(comm_bytes.SECTION) == 1


def _auto_mesh(shape, names):
    # jax.make_mesh defaults to Explicit axes, under which NF4's table lookups need an
    # out_sharding; Auto axes let XLA propagate the codes' sharding.
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.mark.parametrize(
    "shape,stack,spec",
    [((128, 64), 0, P("fsdp", None)), ((2, 128, 64), 1, P("data", "fsdp", None))],
    ids=["matrix", "stacked"],
)
def test_nf4_shardings_dequantize_locally(shape, stack, spec):
    mesh = _auto_mesh((2, 4), ("data", "fsdp"))
    w = jax.random.normal(jax.random.key(0), shape)
    q = lj.quantize_nf4(w, stack_axes=stack)
    shardings = lj.nf4_shardings(q, NamedSharding(mesh, spec))
    assert shardings.packed.spec == P(*spec[:stack], "fsdp")
    assert shardings.absmax2.spec == P(*spec[:stack], None)  # 32 blocks per shard < 256
    placed = jax.device_put(q, shardings)
    dequantize = jax.jit(lambda x: x.dequantize())
    hlo = dequantize.lower(placed).compile().as_text()
    assert [c for c in comm_bytes.collectives(hlo) if c[0] == "all-gather"] == []
    dense = dequantize(placed)
    assert dense.sharding.is_equivalent_to(NamedSharding(mesh, spec), len(shape))
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(q.dequantize()))


def test_split_sharded_nf4_base_matches_dense_reference():
    mesh = _auto_mesh((8,), ("fsdp",))
    w = jax.random.normal(jax.random.key(0), (128, 64))
    q = lj.quantize_nf4(w)
    spec = P("fsdp", None)
    params = {"w": jax.device_put(q, lj.nf4_shardings(q, NamedSharding(mesh, spec)))}
    rule = lj.LoraRule("w", rank=4)
    frozen, trainable = lj.split_sharded(
        params, rule, key=jax.random.key(1), specs={"w": spec}, mesh=mesh
    )
    assert trainable["w"].a.sharding.spec == P("fsdp", None)
    trainable = _random_b(trainable)
    x = jax.random.normal(jax.random.key(2), (16, 128))
    y = jax.jit(lj.lora_apply(lambda p, x: x @ p["w"]))(frozen, trainable, x)
    t = trainable["w"]
    ref = np.asarray(x, np.float64) @ (
        np.asarray(q.dequantize(), np.float64)
        + t.scale * np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
    )
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_nf4_shardings_errors():
    mesh = _auto_mesh((8,), ("fsdp",))
    q = lj.quantize_nf4(jnp.ones((128, 64)))
    with pytest.raises(ValueError, match=r"shards an inner axis other than the first"):
        lj.nf4_shardings(q, NamedSharding(mesh, P(None, "fsdp")))
    small = lj.quantize_nf4(jnp.ones((8, 64)))
    with pytest.raises(ValueError, match=r"8 shards of 512 elements per matrix do not each"):
        lj.nf4_shardings(small, NamedSharding(mesh, P("fsdp")))
