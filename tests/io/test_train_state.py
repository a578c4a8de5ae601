"""Training checkpoints: optimiser state and ``extra`` saved with the adapter, restored exactly.

The reference for every round trip is the state in memory: a restored optimiser must
continue with bit-identical updates, and restored PRNG keys must draw the same numbers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.checkpoint import AdapterCheckpointManager, fingerprint

RULES = [lj.LoraRule(r"(q|v)/kernel", rank=4), lj.LoraRule("head", full=True)]


def _pair():
    rng = np.random.default_rng(0)
    params = {
        "q": {"kernel": jnp.asarray(rng.standard_normal((16, 8), np.float32))},
        "v": {"kernel": jnp.asarray(rng.standard_normal((16, 8), np.float32))},
        "head": jnp.asarray(rng.standard_normal((8,), np.float32)),
    }
    return lj.split(params, RULES, key=jax.random.key(0))


def _labels(trainable):
    return jax.tree.map(lambda _: "adam", trainable) | {"head": "sgd"}


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lora-plus": lambda: lj.lora_plus(optax.adam, optax.linear_schedule(1e-3, 1e-2, 5)),
    "multi-transform": lambda: optax.multi_transform(
        {"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-1, momentum=0.9)}, _labels
    ),
    "masked": lambda: optax.masked(
        optax.adam(1e-2), lambda t: {"q": True, "v": False, "head": True}
    ),
    "apply-if-finite": lambda: optax.apply_if_finite(lj.lora_plus(optax.adam, 1e-2), 3),
    "chain-clip-inject": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    ),
}


def _train(opt, trainable, steps=3):
    state = opt.init(trainable)
    for i in range(steps):
        grads = jax.tree.map(lambda x, g=0.1 * (i + 1): jnp.full_like(x, g), trainable)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    return trainable, state


def _same_leaves(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("name", list(OPTIMIZERS), ids=list(OPTIMIZERS))
def test_optimizer_state_round_trip_continues_identically(tmp_path, name):
    frozen, trainable = _pair()
    opt = OPTIMIZERS[name]()
    trainable, state = _train(opt, trainable)
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, trainable, rules=RULES, base=frozen, opt_state=state)
        t, o, step, extra = mgr.restore_train_state(
            base=frozen, opt_like=jax.eval_shape(opt.init, trainable)
        )
    assert step == 3 and extra == {}
    _same_leaves(o, state)
    _same_leaves(t, trainable)
    # the restored state drives the next update exactly as the original does
    grads = jax.tree.map(lambda x: jnp.full_like(x, -0.3), trainable)
    with jax.numpy_dtype_promotion("standard"):
        _same_leaves(opt.update(grads, o, t), opt.update(grads, state, trainable))


def test_extra_keeps_keys_and_json_values(tmp_path):
    frozen, trainable = _pair()
    extra = {
        "key": jax.random.key(7),
        "rbg_key": jax.random.key(8, impl="rbg"),
        "raw_key": jax.random.PRNGKey(9),
        "keys": jax.random.split(jax.random.key(10), 3),
        "counts": np.arange(4, dtype=np.int64),
        "data_position": 1234,
        "epoch": {"name": "first", "shuffle": [3, 1, 2], "lr": 0.5},
    }
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, trainable, rules=RULES, base=frozen, extra=extra)
        _, opt_state, _, back = mgr.restore_train_state()
    assert opt_state is None
    for name in ("key", "rbg_key", "keys"):
        assert jax.random.key_impl(back[name]) == jax.random.key_impl(extra[name])
        np.testing.assert_array_equal(
            jax.random.uniform(back[name], (5,))
            if name != "keys"
            else jax.random.key_data(back[name]),
            jax.random.uniform(extra[name], (5,))
            if name != "keys"
            else jax.random.key_data(extra[name]),
        )
    assert back["raw_key"].dtype == jnp.uint32
    np.testing.assert_array_equal(
        jax.random.normal(back["raw_key"]), jax.random.normal(extra["raw_key"])
    )
    np.testing.assert_array_equal(back["counts"], extra["counts"])
    assert (back["data_position"], back["epoch"]) == (1234, extra["epoch"])


def test_restores_onto_opt_like_shardings_and_dtypes(tmp_path):
    frozen, trainable = _pair()
    opt = optax.adam(1e-2)
    trainable, state = _train(opt, trainable)
    mesh = jax.make_mesh((8,), ("x",))
    sharded = NamedSharding(mesh, P(None, "x"))

    def target(x):
        s = sharded if x.ndim == 2 and x.shape[1] == 8 else NamedSharding(mesh, P())
        dtype = jnp.bfloat16 if x.ndim == 2 else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=s)

    opt_like = jax.tree.map(target, jax.eval_shape(opt.init, trainable))
    like = jax.tree.map(target, trainable)
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, trainable, rules=RULES, base=frozen, opt_state=state)
        t, o, _, _ = mgr.restore_train_state(like=like, opt_like=opt_like)
    for got, want, ref in zip(
        jax.tree.leaves(o), jax.tree.leaves(opt_like), jax.tree.leaves(state)
    ):
        assert got.dtype == want.dtype
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref).astype(want.dtype))
    assert t["q"]["kernel"].b.sharding == sharded


def test_save_refuses_bad_extra_and_state(tmp_path):
    frozen, trainable = _pair()
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(TypeError, match=r"extra must be a dict with str keys"):
            mgr.save(1, trainable, rules=RULES, base=frozen, extra=[1, 2])
        with pytest.raises(TypeError, match=r"extra\['f'\] is neither an array, a PRNG key nor"):
            mgr.save(1, trainable, rules=RULES, base=frozen, extra={"f": object()})
        with pytest.raises(TypeError, match=r"extra\['nan'\] is neither"):
            mgr.save(1, trainable, rules=RULES, base=frozen, extra={"nan": float("nan")})
        with pytest.raises(TypeError, match=r"opt_state leaf \['x'\] is a object, not an array"):
            mgr.save(1, trainable, rules=RULES, base=frozen, opt_state={"x": object()})
        assert mgr.all_steps() == []


def test_restore_refuses_what_does_not_fit(tmp_path):
    frozen, trainable = _pair()
    adam = optax.adam(1e-2)
    trainable, state = _train(adam, trainable)
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        mgr.save(3, trainable, rules=RULES, base=frozen, opt_state=state)
        with pytest.raises(ValueError, match=r"holds an optimiser state: pass opt_like=jax.eval"):
            mgr.restore_train_state()
        sgd_like = jax.eval_shape(optax.sgd(1e-2, momentum=0.9).init, trainable)
        with pytest.raises(ValueError, match=r"opt_like has 5 array leaves but .*run/3 saved 11"):
            mgr.restore_train_state(opt_like=sgd_like)
        wrong = jax.eval_shape(
            adam.init, {"q": trainable["q"], "v": trainable["v"], "head": jnp.ones(3)}
        )
        with pytest.raises(
            ValueError,
            match=r"does not match .* at optimiser leaf 1: opt_like has .*\['head'\] \(3,\)",
        ):
            mgr.restore_train_state(opt_like=wrong)
        other = {"q": {"kernel": jnp.ones((16, 4))}, "v": frozen["v"], "head": None}
        with pytest.raises(ValueError, match=r"adapter does not fit base: 'q/kernel' has shape"):
            mgr.restore_train_state(base=other, opt_like=jax.eval_shape(adam.init, trainable))
        mgr.save(4, trainable, rules=RULES, base=frozen)  # an adapter-only step
        with pytest.raises(ValueError, match=r"run/4 holds no optimiser state"):
            mgr.restore_train_state(opt_like=jax.eval_shape(adam.init, trainable))
        with pytest.raises(ValueError, match=r"step 4 is not after the latest saved step 4 in"):
            mgr.save(4, trainable, rules=RULES, base=frozen)
        with pytest.raises(ValueError, match=r"no adapter checkpoint for step 7 .* \[3, 4\]"):
            mgr.restore_train_state(7)


def _flip_state(step_dir):
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts)
    assert files, list((step_dir / "state").rglob("*"))
    for f in files:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))


def _truncate_state(step_dir):
    for f in (p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts):
        f.write_bytes(f.read_bytes()[:5])


def _bad_train_json(step_dir):
    for f in (step_dir / "train").rglob("*"):
        if f.is_file():
            f.write_text("{not json")


def _foreign_train(step_dir):
    for f in (step_dir / "train").rglob("*"):
        if f.is_file():
            f.write_text(json.dumps({"format": "other"}))


@pytest.mark.parametrize(
    "damage, match",
    [
        (_flip_state, r"run/3/state|training state in .*run/3 is corrupted"),
        (_truncate_state, r"run/3/state|training state in .*run/3 is corrupted"),
        (_bad_train_json, r"cannot read the training state in .*run/3/train"),
        (_foreign_train, r"run/3/train is not a lora_jax training state"),
    ],
    ids=["flipped-bytes", "truncated", "bad-json", "foreign-json"],
)
def test_damaged_training_state_is_named_and_older_step_loads(tmp_path, damage, match):
    frozen, trainable = _pair()
    opt = optax.adam(1e-2)
    t2, s2 = _train(opt, trainable, 2)
    t3, s3 = _train(opt, trainable, 3)
    opt_like = jax.eval_shape(opt.init, trainable)
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        mgr.save(2, t2, rules=RULES, base=frozen, opt_state=s2)
        mgr.save(3, t3, rules=RULES, base=frozen, opt_state=s3)
    damage(tmp_path / "run" / "3")
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(ValueError, match=match):
            mgr.restore_train_state(opt_like=opt_like)
        _, o, step, _ = mgr.restore_train_state(2, opt_like=opt_like)
    assert step == 2
    _same_leaves(o, s2)


def test_one_writer_per_directory(tmp_path):
    frozen, trainable = _pair()
    first = AdapterCheckpointManager(tmp_path / "run")
    first.save(1, trainable, rules=RULES, base=frozen)
    second = AdapterCheckpointManager(tmp_path / "run")
    with pytest.raises(ValueError, match=r"run is being written by another AdapterCheckpointMan"):
        second.save(2, trainable, rules=RULES, base=frozen)
    first.close()  # releases the directory
    second.save(2, trainable, rules=RULES, base=frozen, extra={"n": 2})
    second.close()
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        assert mgr.all_steps() == [1, 2] and mgr.restore_train_state()[3] == {"n": 2}


def test_adapter_files_of_a_step_load_with_load_adapters(tmp_path):
    frozen, trainable = _pair()
    opt = optax.adam(1e-2)
    trainable, state = _train(opt, trainable)
    with AdapterCheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(5, trainable, rules=RULES, base=fingerprint(frozen), opt_state=state)
    back = lj.load_adapters(tmp_path / "run" / "5", base=frozen)
    np.testing.assert_array_equal(back["q"]["kernel"].b, trainable["q"]["kernel"].b)
