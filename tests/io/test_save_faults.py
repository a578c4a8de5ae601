"""Faults while a training checkpoint is written: a full disk, a read-only directory and
another writer in the directory. Each must raise a clear error naming the directory, and
leave the previous step loadable with its exact optimiser state.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.checkpoint import AdapterCheckpointManager

RULES = [lj.LoraRule("w", rank=4)]
BIG = 4 << 20  # bytes of the extra array that does not fit


def _big():
    """BIG bytes that do not compress (orbax writes zstd)."""
    return np.random.default_rng(1).standard_normal(BIG // 4, np.float32)


def _run():
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((32, 16), np.float32))}
    frozen, trainable = lj.split(params, RULES, key=jax.random.key(0))
    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    with jax.numpy_dtype_promotion("standard"):  # adam's bias correction mixes int and float
        updates, state = opt.update(grads, state, trainable)
    return frozen, optax.apply_updates(trainable, updates), state, opt


def _save_first(directory):
    frozen, trainable, state, _ = _run()
    with AdapterCheckpointManager(directory) as mgr:
        mgr.save(1, trainable, rules=RULES, base=frozen, opt_state=state, extra={"pos": 1})


def _assert_step_1_loads(directory):
    frozen, trainable, state, opt = _run()
    with AdapterCheckpointManager(directory) as mgr:
        assert mgr.all_steps() == [1]
        t, o, step, extra = mgr.restore_train_state(
            base=frozen, opt_like=jax.eval_shape(opt.init, trainable)
        )
    assert (step, extra) == (1, {"pos": 1})
    for x, y in zip(jax.tree.leaves((t, o)), jax.tree.leaves((trainable, state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# A process that saves step 2 with an extra array of BIG bytes, under a file size limit.
SAVER = textwrap.dedent(
    """
    import os, resource, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    from test_save_faults import RULES, _big, _run
    from lora_jax.checkpoint import AdapterCheckpointManager

    frozen, trainable, state, _ = _run()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    mgr = AdapterCheckpointManager(sys.argv[1])
    try:
        mgr.save(2, trainable, rules=RULES, base=frozen, opt_state=state,
                 extra={"pos": 2, "big": _big()})
        mgr.wait_until_finished()
    except OSError as e:
        print("OSError:", e)
    """
)


def test_disk_full_by_file_size_limit_keeps_previous_step(tmp_path):
    _save_first(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(Path(lj.__file__).parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", SAVER, str(tmp_path / "run"), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OSError: saving step 2 to " in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "File too large" in out.stdout and "step 1 (and 0 before it) on disk" in out.stdout
    assert "check free space and write permission" in out.stdout
    _assert_step_1_loads(tmp_path / "run")


@contextlib.contextmanager
def _mounted(*args):
    """``mount args...`` (root only) for the block; skips where mounting is not allowed."""
    target = args[-1]
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) (the file-size-limit test covers a full disk)")
    if subprocess.run(["mount", *args], capture_output=True).returncode != 0:
        pytest.skip("mount is not permitted here (no CAP_SYS_ADMIN)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", target], check=True)


def test_disk_full_on_small_tmpfs_keeps_previous_step(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    with _mounted("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)):
        _save_first(disk / "run")
        frozen, trainable, state, _ = _run()
        with AdapterCheckpointManager(disk / "run") as mgr:
            big = {"pos": 2, "big": _big()}
            with pytest.raises(OSError, match=r"saving step 2 to .*run failed: .*No space left"):
                mgr.save(2, trainable, rules=RULES, base=frozen, opt_state=state, extra=big)
                mgr.wait_until_finished()
        _assert_step_1_loads(disk / "run")
        # with room again (the failed step's leftovers are removed), saving goes on
        with AdapterCheckpointManager(disk / "run") as mgr:
            mgr.save(2, trainable, rules=RULES, base=frozen, opt_state=state)
            assert mgr.all_steps() == [1, 2]


@contextlib.contextmanager
def _read_only(directory):
    """Make ``directory`` read-only: chmod for a normal user, a read-only bind mount as root."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    with _mounted("--bind", "-o", "ro", str(directory), str(directory)):
        yield


@pytest.mark.parametrize("manager", ["open", "new"], ids=["open-manager", "new-manager"])
def test_read_only_directory_keeps_previous_step(tmp_path, manager):
    frozen, trainable, state, _ = _run()
    run = tmp_path / "run"
    mgr = AdapterCheckpointManager(run)
    mgr.save(1, trainable, rules=RULES, base=frozen, opt_state=state, extra={"pos": 1})
    mgr.wait_until_finished()
    if manager == "new":
        mgr.close()
    with _read_only(run):
        if manager == "new":
            mgr = AdapterCheckpointManager(run)
        with pytest.raises(
            OSError, match=r"saving step 2 to .*run failed: .*(Read-only|ermission)"
        ):
            mgr.save(2, trainable, rules=RULES, base=frozen, opt_state=state)
            mgr.wait_until_finished()
        mgr.close()
        _assert_step_1_loads(run)  # readable while read-only
    _assert_step_1_loads(run)


def test_other_writer_adding_or_removing_steps(tmp_path):
    frozen, trainable, state, _ = _run()
    run = tmp_path / "run"
    _save_first(run)
    with AdapterCheckpointManager(run) as mgr:
        mgr.save(2, trainable, rules=RULES, base=frozen, opt_state=state, extra={"pos": 2})
        mgr.wait_until_finished()
        shutil.copytree(run / "2", run / "9")  # another run's writer, in our directory
        with pytest.raises(ValueError, match=r"step 3 is not after the latest saved step 9 in"):
            mgr.save(3, trainable, rules=RULES, base=frozen, opt_state=state)
        shutil.rmtree(run / "9")
        shutil.rmtree(run / "2")  # ... and one that deletes our newest step
        mgr.save(3, trainable, rules=RULES, base=frozen, opt_state=state, extra={"pos": 3})
        assert mgr.all_steps() == [1, 3]
    shutil.rmtree(run / "3")
    _assert_step_1_loads(run)
