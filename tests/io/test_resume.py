"""Exact resume: runs killed with SIGKILL (mid-training, inside a save) and restarted from
their checkpoint directory end bit for bit where the uninterrupted run ends.

Each case runs experiments/resume.py's training processes (LoRA+ AdamW with a warm-up
cosine schedule inside ``apply_if_finite``, a per-step PRNG key, a data stream position):
the uninterrupted reference, then the same run killed and restarted. The reference is
that separate uninterrupted run (deterministic on CPU), not the library's own restore:
every step's loss (as ``float.hex``), every adapter and optimiser leaf (SHA-256) and the
optimiser tree must be identical.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import resume  # noqa: E402


def _check(result, nproc=1):
    for pid in range(nproc):
        r = result[f"process_{pid}"]
        assert r["steps"] == resume.Config().steps
        assert r["losses_equal"], result  # every step's loss, bit for bit
        assert r["final_equal"], result  # adapters, optimiser state and its tree
    for a in result["attempts"]:
        if a["kill"] == "in-save":  # killed after writing, before orbax's commit rename
            assert str(a["at_step"]) not in a["step_dirs_after_kill"], result
            assert any(n.startswith(f"{a['at_step']}.") for n in a["step_dirs_after_kill"])
        else:
            assert 3 <= a["at_step"] <= resume.Config().steps, result


def test_single_device_killed_in_a_save_and_at_random_resumes_exactly(tmp_path):
    result = resume.scenario("single", ("in-save", "random"), seed=1, workdir=tmp_path)
    _check(result)
    # the random kill landed mid-run: the restart retrained the steps after its checkpoint
    assert result["process_0"]["retrained_steps"] >= 1


def test_eight_devices_sharded_adapters_resume_exactly(tmp_path):
    _check(resume.scenario("sharded", ("random",), seed=2, workdir=tmp_path))


@pytest.mark.slow
def test_two_processes_one_killed_resume_exactly(tmp_path):
    _check(resume.scenario("sharded", ("random",), nproc=2, seed=3, workdir=tmp_path), nproc=2)
