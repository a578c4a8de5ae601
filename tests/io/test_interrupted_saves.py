"""Saving without loss: saves killed at any point, and two processes saving to one path.

A writer subprocess saves adapters whose ``b`` factor is filled with the step number, so a
loaded checkpoint is consistent when every element of ``b`` equals its recorded step.
It is killed with SIGKILL either at each step of the directory swap (before each rename,
before and during the removal of the old checkpoint) or after a random delay while it
saves in a loop. After every kill the checkpoint must load and be consistent.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.checkpoint import read_info

RULES = [lj.LoraRule("w", rank=4)]

WRITER = textwrap.dedent(
    """
    import os, pathlib, shutil, signal, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    import lora_jax as lj
    from lora_jax._src.io import checkpoint

    path, mode, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rules = [lj.LoraRule("w", rank=4)]
    params = {"w": jnp.asarray(np.arange(64 * 32, dtype=np.float32).reshape(64, 32))}
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))

    def save(step):
        t = trainable["w"]
        tree = {"w": t.with_factors(t.a, jnp.full(t.b.shape, float(step), jnp.float32))}
        lj.save_adapters(path, tree, rules=rules, base=frozen, step=step)

    if mode.startswith("kill-at-"):  # SIGKILL at one event of the directory swap
        at, events = int(mode.rsplit("-", 1)[1]), [0]
        real_rename, real_rmtree = pathlib.Path.rename, shutil.rmtree
        real_replace = checkpoint.replace_dir

        def event():
            events[0] += 1
            if events[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)

        def rename(self, target):
            event()
            return real_rename(self, target)

        def rmtree(p, *args, **kwargs):
            event()
            if at == events[0] + 1:  # die halfway through deleting the old checkpoint
                real_rmtree(pathlib.Path(p) / "arrays")
                event()
            return real_rmtree(p, *args, **kwargs)

        def replace_dir(*args):
            pathlib.Path.rename, shutil.rmtree = rename, rmtree
            try:
                return real_replace(*args)
            finally:
                pathlib.Path.rename, shutil.rmtree = real_rename, real_rmtree

        checkpoint.replace_dir = replace_dir
        save(first)
    else:  # save in a loop: until killed, or for a given number of seconds
        seconds = float(mode.split("-")[1]) if mode.startswith("for-") else 1e9
        start, step = time.time(), first
        while time.time() - start < seconds:
            save(step)
            print(step, flush=True)
            step += 1
    """
)


def _pair():
    params = {"w": jnp.asarray(np.arange(64 * 32, dtype=np.float32).reshape(64, 32))}
    return lj.split(params, RULES, key=jax.random.key(0))


def _save(path, step):
    frozen, trainable = _pair()
    t = trainable["w"]
    tree = {"w": t.with_factors(t.a, jnp.full(t.b.shape, float(step), jnp.float32))}
    lj.save_adapters(path, tree, rules=RULES, base=frozen, step=step)


def _writer(path, mode, first) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(pathlib.Path(lj.__file__).parents[1]))
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode, str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _check_consistent(path) -> int:
    """Load the checkpoint; every b element must equal the recorded step. Returns the step."""
    frozen, trainable = _pair()
    back = lj.load_adapters(path, base=frozen)
    step = read_info(path)["step"]
    np.testing.assert_array_equal(back["w"].a, trainable["w"].a)
    np.testing.assert_array_equal(np.asarray(back["w"].b), np.full((4, 32), step, np.float32))
    return step


# Swap events: 1 rename old aside, 2 rename new in, 3 delete old, 4 halfway through deleting.
KILL_POINTS = {"before-aside": 1, "before-rename-in": 2, "before-delete-old": 3, "mid-delete": 4}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS), ids=list(KILL_POINTS))
def test_kill_during_swap_keeps_a_loadable_checkpoint(tmp_path, point):
    path = tmp_path / "c"
    _save(path, 1)
    proc = _writer(path, f"kill-at-{KILL_POINTS[point]}", 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert _check_consistent(path) in (1, 2)
    _save(path, 3)  # the next save recovers and removes the old checkpoints
    assert _check_consistent(path) == 3
    # Killed before its rename, a save leaves its (never read) staging directory behind.
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name != "c")
    assert left == (["c.saving"] if KILL_POINTS[point] <= 2 else [])


@pytest.mark.slow
def test_random_kills_keep_a_loadable_checkpoint(tmp_path):
    path, rng, survived, kills = tmp_path / "c", random.Random(0), 0, 5
    _save(path, 0)
    last = 0
    for i in range(kills):
        first = 1000 * (i + 1)
        proc = _writer(path, "loop", first)
        assert proc.stdout.readline().strip() == str(first)  # one save done: now mid-loop
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        step = _check_consistent(path)
        assert step >= last and (step == last or step >= first)
        survived, last = survived + 1, step
    print(f"\nrandom kills: {survived}/{kills} left a loadable, consistent checkpoint")
    _save(path, 99_999)  # removes any old checkpoint a kill mid-swap left
    assert _check_consistent(path) == 99_999
    left = {p.name.split("-")[0] for p in tmp_path.iterdir() if p.name != "c"}
    assert left <= {"c.saving"}  # only unfinished staging directories, never read


@pytest.mark.slow
def test_concurrent_saves_do_not_corrupt(tmp_path):
    path = tmp_path / "c"
    procs = [_writer(path, "for-3", first) for first in (10_000, 20_000)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    steps = [[int(s) for s in out.split()] for out, _ in outs]
    assert all(len(s) >= 2 for s in steps), steps
    print(f"\nconcurrent saves: {[len(s) for s in steps]} by two processes, final step consistent")
    assert _check_consistent(path) in {s for run in steps for s in run}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_save_refuses_to_replace_other_things(tmp_path):
    frozen, trainable = _pair()
    (tmp_path / "file").write_text("precious")
    with pytest.raises(ValueError, match=r"file exists and is not a directory; .* another path"):
        lj.save_adapters(tmp_path / "file", trainable, rules=RULES, base=frozen)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("precious")
    with pytest.raises(
        ValueError, match=r"project is a non-empty directory that is not an adapter"
    ):
        lj.save_adapters(tmp_path / "project", trainable, rules=RULES, base=frozen)
    assert (tmp_path / "file").read_text() == (tmp_path / "project" / "notes.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "project"]
