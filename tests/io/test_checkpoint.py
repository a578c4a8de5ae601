"""Adapter checkpoints: bit-exact round trips, size, base checks, corruption, atomicity."""

import json
import pathlib
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.checkpoint import AdapterCheckpointManager, fingerprint, read_info

RULES = [
    lj.LoraRule(r"layers/kernel", rank=4, alpha=8.0, stack_axes=(0,), in_axes=(1,), rslora=True),
    lj.LoraRule(r"attn/.*/kernel", rank=8, dropout=0.1),
    lj.LoraRule(r"embed", rank=2, param_dtype=jnp.bfloat16),
    lj.LoraRule(r"head/.*", full=True),
]


def _params(seed=0, d=64):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    return {
        "embed": arr(50, 16),
        "layers": {"kernel": arr(3, d, 32)},
        "attn": [{"kernel": arr(d, d)}, {"kernel": arr(d, d), "bias": arr(d)}],
        "head": {"kernel": arr(d, 2), "bias": arr(2)},
    }


def _nonzero(trainable, seed=1):
    """Give every factor a random non-zero ``b`` so round trips exercise real values."""
    key = jax.random.key(seed)

    def leaf(t):
        if not isinstance(t, lj.LoraFactors):
            return t
        b = jax.random.normal(jax.random.fold_in(key, t.b.size), t.b.shape, t.b.dtype)
        return t.with_factors(t.a, b)

    return jax.tree.map(leaf, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))


@pytest.fixture
def pair():
    frozen, trainable = lj.split(_params(), RULES, key=jax.random.key(0))
    return frozen, _nonzero(trainable)


def _assert_same(x, y):
    is_f = lambda t: isinstance(t, lj.LoraFactors)  # noqa: E731
    assert jax.tree.structure(x, is_leaf=is_f) == jax.tree.structure(y, is_leaf=is_f)
    xs, ys = jax.tree.leaves(x, is_leaf=is_f), jax.tree.leaves(y, is_leaf=is_f)
    for u, v in zip(xs, ys):
        if isinstance(u, lj.LoraFactors):
            assert (u.alpha, u.stack_axes, u.in_axes, u.out_axes, u.rslora, u.dropout) == (
                v.alpha,
                v.stack_axes,
                v.in_axes,
                v.out_axes,
                v.rslora,
                v.dropout,
            )
            pairs = [(u.a, v.a), (u.b, v.b)]
        else:
            pairs = [(u, v)]
        for p, q in pairs:
            assert p.dtype == q.dtype and p.shape == q.shape
            np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def test_round_trip_bit_exact(pair, tmp_path):
    frozen, trainable = pair
    path = lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen, step=7)
    back = lj.load_adapters(path, base=frozen)
    _assert_same(back, trainable)
    assert back["attn"][1]["bias"] is None and back["embed"].a.dtype == jnp.bfloat16
    # The loaded factors give the same update under jit as the originals.
    got, want = back["layers"]["kernel"], trainable["layers"]["kernel"]
    np.testing.assert_array_equal(jax.jit(lj.lora_delta)(got), lj.lora_delta(want))


def test_info_restores_rules_step_metadata(pair, tmp_path):
    frozen, trainable = pair
    meta = {"lr": 1e-3, "note": "x"}
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen, step=12, metadata=meta)
    info = read_info(tmp_path / "c")
    assert info["rules"] == RULES
    assert (info["step"], info["metadata"], info["lora_jax_version"]) == (12, meta, lj.__version__)
    assert info["base"] == fingerprint(frozen)


def test_size_within_ten_percent(tmp_path):
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((512, 512), np.float32))}
    params["head"] = params["w"] + 1.0
    rules = [lj.LoraRule("w", rank=64), lj.LoraRule("head", full=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _nonzero(trainable)
    lj.save_adapters(tmp_path / "c", trainable, rules=rules, base=frozen)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "c").rglob("*") if f.is_file())
    want = 4 * (512 * 64 * 2 + 512 * 512)
    assert abs(on_disk - want) / want < 0.10, (on_disk, want)


def _other_shape(params):
    params["attn"][1]["kernel"] = params["attn"][1]["kernel"][:, :32]
    return params


def _missing_path(params):
    del params["embed"]
    return params


@pytest.mark.parametrize(
    "change, match",
    [
        (_other_shape, r"'attn/1/kernel' has shape \(64, 32\) in the base"),
        (_missing_path, "at leaf 3 the base has 'head/bias' but the adapter has 'embed'"),
    ],
    ids=["other-shape", "missing-path"],
)
def test_load_onto_other_base_raises(pair, tmp_path, change, match):
    frozen, trainable = pair
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    rules = [r for r in RULES if r.pattern != "embed"]
    other, _ = lj.split(change(_params()), rules, key=jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        lj.load_adapters(tmp_path / "c", base=other)


def test_save_checks_base(pair, tmp_path):
    _, trainable = pair
    other, _ = lj.split(_other_shape(_params()), RULES, key=jax.random.key(0))
    with pytest.raises(ValueError, match="base passed to save_adapters"):
        lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=other)


def test_full_leaf_where_base_has_weight_raises(pair, tmp_path):
    _, trainable = pair
    with pytest.raises(ValueError, match="'head/bias' is trained fully .* base holds a weight"):
        lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=_params())


def test_content_hash_detects_other_weights(pair, tmp_path):
    frozen, trainable = pair
    fp = fingerprint(frozen, content=True)
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=fp)
    assert lj.load_adapters(tmp_path / "c", base=frozen)["layers"]["kernel"].rank == 4
    other, _ = lj.split(_params(seed=5), RULES, key=jax.random.key(0))
    with pytest.raises(ValueError, match="content hash"):
        lj.load_adapters(tmp_path / "c", base=other)


def test_bad_trainable_leaf_raises(pair, tmp_path):
    frozen, trainable = pair
    trainable["head"]["bias"] = "oops"
    with pytest.raises(TypeError, match="'head/bias': trainable leaf of type str"):
        lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)


def _largest_data_file(path):
    files = [f for f in (path / "arrays").rglob("*") if f.is_file() and "/d/" in str(f)]
    return max(files, key=lambda f: f.stat().st_size)


def _flip(path):
    f = _largest_data_file(path)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(255 - b for b in data[mid : mid + 16])
    f.write_bytes(bytes(data))


def _truncate(path):
    f = _largest_data_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bad_json(path):
    (path / "meta" / "metadata").write_text('{"format": "lora_jax.adap')


def _foreign_json(path):
    (path / "meta" / "metadata").write_text(json.dumps({"x": 1}))


@pytest.mark.parametrize(
    "damage, match",
    [
        (_flip, r"c/arrays"),
        (_truncate, r"c/arrays"),
        (_bad_json, r"c/meta"),
        (_foreign_json, r"c/meta is not a lora_jax adapter checkpoint"),
    ],
    ids=["flipped-bytes", "truncated", "bad-json", "foreign-json"],
)
def test_corrupted_checkpoint_raises(tmp_path, damage, match):
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((256, 256), np.float32))}
    rules = [lj.LoraRule("w", rank=32)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    lj.save_adapters(tmp_path / "c", _nonzero(trainable), rules=rules, base=frozen)
    damage(tmp_path / "c")
    with pytest.raises(ValueError, match=match):
        lj.load_adapters(tmp_path / "c")


def test_arrays_that_read_cleanly_but_differ_fail_their_digest(tmp_path):
    """Valid array files of another save (file list and all) under this save's meta.

    orbax reads them without error, so only the per-array SHA-256 in ``meta`` sees it.
    """
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 32), np.float32))}
    rules = [lj.LoraRule("w", rank=4)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    c = lj.save_adapters(tmp_path / "c", _nonzero(trainable, 1), rules=rules, base=frozen)
    other = lj.save_adapters(tmp_path / "o", _nonzero(trainable, 2), rules=rules, base=frozen)
    shutil.rmtree(c / "arrays")
    shutil.copytree(other / "arrays", c / "arrays")
    shutil.copy(other / "lora_jax_files.json", c / "lora_jax_files.json")
    with pytest.raises(ValueError, match=r"c/arrays is corrupted: 'w' \(b\) does not match"):
        lj.load_adapters(c)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="no adapter checkpoint at .*nowhere"):
        lj.load_adapters(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="cannot read adapter checkpoint metadata"):
        read_info(tmp_path / "nowhere")


@pytest.mark.parametrize("when", ["before-write", "after-write"], ids=["before", "after"])
def test_failed_save_keeps_previous(pair, tmp_path, monkeypatch, when):
    frozen, trainable = pair
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen, step=1)
    original = ocp.Checkpointer.save

    def crash(self, *args, **kwargs):
        if when == "after-write":
            original(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        lj.save_adapters(tmp_path / "c", _nonzero(trainable, 9), rules=RULES, base=frozen, step=2)
    monkeypatch.undo()
    _assert_same(lj.load_adapters(tmp_path / "c"), trainable)
    assert read_info(tmp_path / "c")["step"] == 1


def test_overwrite_replaces(pair, tmp_path):
    frozen, trainable = pair
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen, step=1)
    newer = _nonzero(trainable, 9)
    lj.save_adapters(tmp_path / "c", newer, rules=RULES, base=frozen, step=2)
    _assert_same(lj.load_adapters(tmp_path / "c"), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_manager_keeps_last_n(pair, tmp_path):
    frozen, trainable = pair
    mgr = AdapterCheckpointManager(tmp_path / "run", max_to_keep=2)
    versions = {}
    for step in range(5):
        versions[step] = _nonzero(trainable, step)
        assert mgr.save(step, versions[step], rules=RULES, base=frozen, metadata={"loss": step})
    assert mgr.all_steps() == [3, 4] and mgr.latest_step() == 4
    _assert_same(mgr.restore(), versions[4])
    _assert_same(mgr.restore(3, base=frozen), versions[3])
    _assert_same(lj.load_adapters(tmp_path / "run" / "3"), versions[3])
    with pytest.raises(
        ValueError, match=r"no adapter checkpoint for step 1 .* saved steps: \[3, 4\]"
    ):
        mgr.restore(1)
    mgr.close()


def test_restore_onto_like_shardings_and_dtypes(pair, tmp_path):
    frozen, trainable = pair
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    mesh = jax.make_mesh((8,), ("x",))
    abstract = jax.eval_shape(lambda: lj.split(_params(), RULES, key=jax.random.key(0))[1])

    def spec(x):
        # Shard the largest axis divisible by 8, keep the rest replicated.
        axes = [i for i, d in enumerate(x.shape) if d % 8 == 0]
        names = [None] * x.ndim
        if axes:
            names[max(axes, key=lambda i: x.shape[i])] = "x"
        return jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*names)))

    like = jax.tree.map(spec, abstract)
    back = lj.load_adapters(tmp_path / "c", like=like)
    for got, want, ref in zip(
        jax.tree.leaves(back), jax.tree.leaves(like), jax.tree.leaves(trainable)
    ):
        assert got.sharding == want.sharding and got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.astype(jnp.bfloat16)))
    assert back["layers"]["kernel"].b.sharding.spec == P(None, None, "x")


def test_like_mismatch_raises(pair, tmp_path):
    frozen, trainable = pair
    lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    rules = [lj.LoraRule("embed", rank=3)] + RULES[:2] + RULES[3:]
    like = jax.eval_shape(lambda: lj.split(_params(), rules, key=jax.random.key(0))[1])
    with pytest.raises(
        ValueError, match=r"like= does not match the checkpoint at leaf 3: like has 'embed'"
    ):
        lj.load_adapters(tmp_path / "c", like=like)


class Pair(NamedTuple):
    enc: dict
    dec: dict


def test_custom_nodes_load_from_base_alone(tmp_path):
    params = Pair({"w": jnp.ones((8, 8))}, {"w": jnp.ones((8, 4))})
    rules = [lj.LoraRule(".*w", rank=2)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _nonzero(trainable)
    lj.save_adapters(tmp_path / "c", trainable, rules=rules, base=frozen)
    for kwargs in ({}, {"base": fingerprint(frozen)}):  # a fingerprint has no tree nodes
        with pytest.raises(
            ValueError, match=r"custom pytree nodes \(an nnx.State.*pass base= \(the frozen tree"
        ):
            lj.load_adapters(tmp_path / "c", **kwargs)
    for kwargs in ({"base": frozen}, {"like": trainable}):
        back = lj.load_adapters(tmp_path / "c", **kwargs)
        assert isinstance(back, Pair)
        _assert_same(back, trainable)


def test_not_a_checkpoint_raises(tmp_path):
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(tmp_path / "x", args=ocp.args.Composite(meta=ocp.args.JsonSave({"x": 1})))
    assert pathlib.Path(tmp_path / "x").is_dir()
    with pytest.raises(ValueError, match="not a lora_jax adapter checkpoint"):
        lj.load_adapters(tmp_path / "x")


def _linen_boxed():
    nn = pytest.importorskip("flax.linen")

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            return nn.Dense(4, kernel_init=init)(x)

    return Model().init(jax.random.key(0), jnp.ones((1, 8)))["params"]


def _nnx_state():
    nnx = pytest.importorskip("flax.nnx")
    return nnx.state(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("make", [_linen_boxed, _nnx_state], ids=["linen-boxed", "nnx-state"])
def test_library_trees_load_from_base_alone(tmp_path, make):
    params = make()
    rules = [lj.LoraRule(r".*kernel.*", rank=2)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(1))
    trainable = _nonzero(trainable)
    lj.save_adapters(tmp_path / "c", trainable, rules=rules, base=frozen)
    back = lj.load_adapters(tmp_path / "c", base=frozen)
    assert type(back) is type(trainable)
    _assert_same(back, trainable)
