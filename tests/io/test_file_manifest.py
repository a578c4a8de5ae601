"""The list of array files saved with each checkpoint, checked before orbax reads them.

A damaged array file used to reach orbax, whose failed concurrent read could crash the
process later (lora_jax/_src/io/file_manifest.py). Each damaged file must be refused by
name before any orbax restore, and the listed sizes and digests must be the files' own
(recomputed here with hashlib, not with the library's helper).
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax as lj
from lora_jax.checkpoint import AdapterCheckpointManager

RULES = [lj.LoraRule("w", rank=4, in_axes=(0,))]
LIST = "lora_jax_files.json"


def _pair():
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 32), np.float32))}
    frozen, trainable = lj.split(params, RULES, key=jax.random.key(0))
    f = trainable["w"]
    b = jnp.asarray(np.random.default_rng(1).standard_normal(f.b.shape), f.b.dtype)
    return frozen, {"w": f.with_factors(f.a, b)}


def _files(item_dir):
    """Every file under ``item_dir``, relative to its parent, by os.walk."""
    out = {}
    for root, _, names in os.walk(item_dir):
        for n in names:
            full = os.path.join(root, n)
            out[os.path.relpath(full, os.path.dirname(item_dir))] = full
    return out


def _data_file(c):
    return max(_files(c / "arrays").values(), key=os.path.getsize)


def _no_orbax_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("orbax was asked to read a checkpoint that should be refused")

    monkeypatch.setattr(ocp.Checkpointer, "restore", refuse)
    monkeypatch.setattr(ocp.CheckpointManager, "restore", refuse)


def test_save_lists_every_array_file_with_its_size_and_digest(tmp_path):
    frozen, trainable = _pair()
    c = lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    listed = json.loads((c / LIST).read_text())["files"]
    on_disk = _files(c / "arrays")
    assert sorted(listed) == sorted(on_disk) and len(on_disk) >= 3
    for rel, full in on_disk.items():
        data = open(full, "rb").read()
        assert listed[rel] == [len(data), hashlib.sha256(data).hexdigest()], rel
    assert not any(k.startswith("meta/") for k in listed)  # JSON is validated field by field


def _truncate(f):
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def _flip(f):
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01  # same size: only the digest sees it
    open(f, "wb").write(bytes(data))


DAMAGE = {
    "truncated": (_truncate, r"has \d+ bytes but was saved with \d+ \(truncated\)"),
    "flipped": (_flip, r"does not match the SHA-256 recorded at save"),
    "removed": (os.remove, r"is missing; the checkpoint is incomplete"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_array_file_is_refused_before_orbax_reads(tmp_path, monkeypatch, name):
    frozen, trainable = _pair()
    c = lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    victim = _data_file(c)
    damage, match = DAMAGE[name]
    damage(victim)
    _no_orbax_reads(monkeypatch)
    with pytest.raises(ValueError, match=match) as e:
        lj.load_adapters(c)
    assert os.path.relpath(victim, c) in str(e.value)


def test_checkpoint_saved_without_the_list_still_loads(tmp_path):
    frozen, trainable = _pair()
    c = lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    (c / LIST).unlink()  # as lora_jax wrote checkpoints before the list existed
    back = lj.load_adapters(c, base=frozen)
    np.testing.assert_array_equal(back["w"].b, trainable["w"].b)


HOSTILE = {
    "outside-path": lambda files: {"../secret": [6, hashlib.sha256(b"secret").hexdigest()]},
    "absolute-path": lambda files: {"/etc/hostname": [1, "0" * 64]},
    "not-a-pair": lambda files: {k: "big" for k in files},
    "size-not-a-number": lambda files: {k: [str(v[0]), v[1]] for k, v in files.items()},
    "nul-in-path": lambda files: {"arrays/x\x00y": [1, "0" * 64]},
    "not-a-dict": lambda files: [1, 2, 3],
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_list_is_refused_without_reading_outside(tmp_path, monkeypatch, name):
    frozen, trainable = _pair()
    c = lj.save_adapters(tmp_path / "c", trainable, rules=RULES, base=frozen)
    (tmp_path / "secret").write_bytes(b"secret")
    listing = json.loads((c / LIST).read_text())
    listing["files"] = HOSTILE[name](listing["files"])
    (c / LIST).write_text(json.dumps(listing))
    _no_orbax_reads(monkeypatch)
    refused = r"lora_jax_files.json (has an invalid entry|is not a list)"
    with pytest.raises(ValueError, match=refused):
        lj.load_adapters(c)


def test_manager_lists_each_step_and_refuses_a_damaged_optimiser_state(tmp_path):
    frozen, trainable = _pair()
    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        for step in (1, 2):
            mgr.save(step, trainable, rules=RULES, base=frozen, opt_state=state)
        assert mgr.all_steps() == [1, 2]  # waits for the background save: step 2 is listed
        assert (tmp_path / "run" / "2" / LIST).is_file()
    for step in (1, 2):
        listed = json.loads((tmp_path / "run" / str(step) / LIST).read_text())["files"]
        assert sorted(listed) == sorted(
            _files(tmp_path / "run" / str(step) / "arrays")
            | _files(tmp_path / "run" / str(step) / "state")
        )
    victim = max(_files(tmp_path / "run" / "2" / "state").values(), key=os.path.getsize)
    _flip(victim)
    opt_like = jax.eval_shape(opt.init, trainable)
    with AdapterCheckpointManager(tmp_path / "run") as mgr:
        t, o, step, _ = mgr.restore_train_state(1, base=frozen, opt_like=opt_like)
        assert step == 1
        np.testing.assert_array_equal(o[0].mu["w"].a, state[0].mu["w"].a)
        with pytest.raises(ValueError, match=r"run/2/state/\S+ does not match the SHA-256"):
            mgr.restore_train_state(2, base=frozen, opt_like=opt_like)
