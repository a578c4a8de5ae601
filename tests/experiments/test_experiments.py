"""The claim-checking experiments: each script's --smoke run in a subprocess, plus their helpers.

Each script is run as a researcher would (``python experiments/<name>.py --smoke``) and the
numbers it prints are checked against independent counts (r(d + k) per adapted matrix) or
sanity ranges; the numerical helpers are checked against dense numpy references.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXPERIMENTS)

import _results  # noqa: E402
import _timing  # noqa: E402
import causal_lm  # noqa: E402
import intrinsic_rank  # noqa: E402
import zero_overhead  # noqa: E402


def run_smoke(script: str) -> str:
    """stdout of ``python experiments/<script> --smoke`` (smoke runs only print)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no fake devices
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def numbers(line: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", line)]


def lora_count(d: int, k: int, r: int) -> int:
    """Independent count: a rank-r update of a d x k matrix trains r (d + k) values."""
    return r * (d + k)


def test_interleaved_rotates_the_order():
    """Each round starts one configuration later, so none always follows the same one."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = _timing.interleaved(fns, repeats=4, steps=2, warmup=2)
    rounds = ["".join(calls[i : i + 6 : 2]) for i in range(0, len(calls), 6)]
    assert rounds == ["abc", "bca", "cab", "abc", "bca", "cab"]
    assert all(len(t.wall) == len(t.cpu) == 4 for t in stats.values())  # warm-up not kept


def test_system_malloc_flag_leaves_malloc_alone(monkeypatch):
    monkeypatch.setattr(_timing, "keep_freed_memory", lambda: pytest.fail("mallopt called"))
    assert _timing.heap_for_timing(["x.py", "--system-malloc"]) == "glibc's default malloc"


def test_default_malloc_runs_get_their_own_results_section():
    assert _timing.results_names("T", "python x.py", False) == ("T", "python x.py")
    assert _timing.results_names("T", "python x.py", True) == (
        "T, glibc's default malloc",
        "python x.py --system-malloc",
    )


def test_results_stamp_names_the_cpu_model(monkeypatch, tmp_path):
    """Sessions land on different CPUs: the stamp must name the model and its vector ISA."""
    info = "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx avx2 fma\n"
    real = pathlib.Path.read_text
    fake = lambda self, *a, **k: info if str(self) == "/proc/cpuinfo" else real(self, *a, **k)  # noqa: E731
    monkeypatch.setattr(pathlib.Path, "read_text", fake)
    assert _results.cpu_name() == "Example CPU 9000 (avx2)"
    _results.write_section("T", "python x.py", "body", path=tmp_path / "R.md")
    assert "Example CPU 9000 (avx2), " in (tmp_path / "R.md").read_text()


def test_param_table_smoke():
    out = run_smoke("param_table.py")
    assert "4096 x 4096 matrix, r = 8: 65,536 trainable vs 16,777,216 (256x fewer)" in out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| LLaMA-7B"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[2], int(cells[3]))] = int(cells[4].replace(",", ""))
    d, f, n = 4096, 11008, 32
    for r in (8, 64):
        assert rows[("q,v", r)] == n * 2 * lora_count(d, d, r)
        assert rows[("q,k,v,o", r)] == n * 4 * lora_count(d, d, r)
        assert rows[("all linear", r)] == n * (4 * lora_count(d, d, r) + 3 * lora_count(d, f, r))
    assert rows[("q,v", 8)] == 4_194_304


def test_param_table_gpt3_checkpoint_claim():
    import param_table

    s = param_table.abstract_summary(param_table.gpt3_175b(), "layers/attn/(q|v)/kernel", 4)
    assert s.trainable_params == 96 * 2 * lora_count(12288, 12288, 4)
    assert 30 < 2 * s.trainable_params / 1e6 < 40  # the paper's "35 MB" (fp16)
    assert s.reduction > 9000  # the paper's "10,000x"


def test_zero_overhead_smoke():
    out = run_smoke("zero_overhead.py")
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        # Each cell is "median [min, max]" of a time ratio. No speed band: ratios are
        # measured while the other test worker runs (unmerged read 3.2x once, 1.5-2x idle),
        # so the smoke run checks the table is complete and consistent, not the speed.
        for cell in (cells[5], cells[6]):
            med, lo, hi = numbers(cell)[:3]
            assert 0 < lo <= med <= hi, line


@pytest.mark.parametrize("name", ["tiny BERT", "tiny GPT"], ids=["bert", "gpt"])
def test_zero_overhead_variants_agree(name):
    """Merged, unmerged and the dense float64 oracle give the same output; base differs."""
    work = zero_overhead.workloads(smoke=True)[name]
    base = np.asarray(work["base"][0](*work["base"][1]))
    merged = np.asarray(work["merged"][0](*work["merged"][1]))
    unmerged = np.asarray(work["unmerged"][0](*work["unmerged"][1]))
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert np.abs(merged - base).max() > 1e-4  # the random b really changes the model
    frozen, trainable = work["unmerged"][1]
    for (_, w), (_, t) in zip(
        jax.tree_util.tree_leaves_with_path(work["merged"][1][0]),
        jax.tree_util.tree_leaves_with_path(frozen),
    ):
        assert w.shape == t.shape and w.dtype == t.dtype  # merging adds no parameters


def test_rank_sweep_smoke():
    out = run_smoke("rank_sweep.py")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["rank"] for r in rows] == [1, 2, "full"]
    h, layers, head = 32, 2, 32 * 2 + 2  # the smoke encoder; query and value per layer
    for r in rows[:2]:
        assert r["trainable"] == layers * 2 * lora_count(h, h, r["rank"]) + head
    assert rows[2]["trainable"] > 100 * rows[1]["trainable"]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["step_s"] > 0


def test_intrinsic_rank_smoke():
    out = run_smoke("intrinsic_rank.py")
    rows = [line for line in out.splitlines() if line.startswith("| layer_")]
    assert len(rows) == 4
    for line in rows:
        full, lora, phi88, phi11 = numbers(line.split("|", 2)[2])
        assert 0 < full <= 1 and lora == pytest.approx(1.0, abs=1e-3)  # rank(dW_lora) <= 8
        assert 0 <= phi88 <= 1 and 0 <= phi11 <= 1


@pytest.mark.parametrize("k", [1, 3, 8], ids=["k1", "k3", "k8"])
def test_energy_fraction_matches_numpy(k):
    rng = np.random.default_rng(k)
    m = rng.normal(size=(20, 12)) + 5 * np.outer(rng.normal(size=20), rng.normal(size=12))
    _, s = intrinsic_rank.spectrum(m)
    eig = np.sort(np.linalg.eigvalsh(m.T @ m))[::-1]  # s^2, computed another way
    expected = eig[:k].sum() / np.square(m).sum()
    assert intrinsic_rank.energy_fraction(s, k) == pytest.approx(expected, rel=1e-9)


def test_subspace_similarity_reference():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    a, b = q[:, :8], q[:, 8:16]
    assert intrinsic_rank.subspace_similarity(a, a, 8, 8) == pytest.approx(1.0, abs=1e-12)
    assert intrinsic_rank.subspace_similarity(a, b, 8, 8) == pytest.approx(0.0, abs=1e-12)
    mixed = np.concatenate([a[:, :2], b[:, :6]], axis=1)  # shares 2 of 8 directions with a
    assert intrinsic_rank.subspace_similarity(a, mixed, 8, 8) == pytest.approx(2 / 8, abs=1e-12)
    assert intrinsic_rank.subspace_similarity(a, mixed, 4, 1) == pytest.approx(1.0, abs=1e-12)
    # Random subspaces of a d-dim space: about max(i, j) / d.
    d = 400
    basis = lambda: np.linalg.qr(rng.normal(size=(d, 8)))[0]
    phis = [intrinsic_rank.subspace_similarity(basis(), basis(), 8, 8) for _ in range(20)]
    assert np.mean(phis) == pytest.approx(8 / d, rel=0.3)


def test_op_profile_smoke():
    """Both steps are profiled; op kinds add up to the total and every listed op has its shape."""
    out = run_smoke("op_profile.py")
    sections = re.findall(
        r"### (\w+): compiled ops ([\d.]+) ms per step\n(.*?)(?=###|\Z)", out, re.S
    )
    assert [name for name, _, _ in sections] == ["floor", "factored"], out[-2000:]
    for _, total, body in sections:
        kinds = re.findall(r"^\| ([a-z_\-]+) \| ([\d.]+) \|$", body, re.M)
        ops = re.findall(r"^\| (\S+) \| `(\S+)` \| ([\d.]+) \|$", body, re.M)
        assert float(total) > 0 and kinds and ops, body
        # the 12 largest kinds cover most of the total, and never more than all of it
        assert 0.5 * float(total) <= sum(float(ms) for _, ms in kinds) <= float(total) + 0.1, body
        assert all(re.fullmatch(r"\w+\[[\d,]*\]\S*", shape) for _, shape, _ in ops), body


def test_causal_lm_smoke():
    out = run_smoke("causal_lm.py")
    rows = {
        line.split("|")[1].strip(): numbers(line)
        for line in out.splitlines()
        if line.startswith(("| LoRA", "| QLoRA", "| PyTorch"))
    }
    peft_rows = {"PyTorch + PEFT LoRA", "PyTorch + PEFT + bitsandbytes QLoRA"}
    assert set(rows) == {"LoRA", "QLoRA", *peft_rows}, out
    for name, (before, after, *_) in rows.items():
        assert 0 < after < before < 10, (name, before, after)  # training lowers held-out loss
    cfg = causal_lm.SMOKE_CONFIG
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = sum(
        lora_count(i, o, 16) for i, o in [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    )
    assert f"({cfg.num_hidden_layers * per_layer:,} of" in out
    diff = float(re.search(r"max \|logit difference\| (\S+)\.", out).group(1))
    assert diff < 1e-4  # our adapter, reloaded by transformers + PEFT
    assert out.count("To be, or not to be,") == 3  # samples before, after LoRA, after QLoRA


def test_windows_are_non_overlapping():
    w = causal_lm.windows(np.arange(23), 5)
    np.testing.assert_array_equal(w, np.arange(20).reshape(4, 5))


def test_trace_time_smoke():
    out = run_smoke("trace_time.py")
    line = lambda prefix: next(s for s in out.splitlines() if s.startswith(prefix))  # noqa: E731
    plain_eqns = numbers(line("plain trace:"))[-1]
    lora_eqns = numbers(line("lora_apply trace:"))[-1]
    # 14 adapted uses (7 per layer, 2 layers), each adding the rank-r products to the program
    assert plain_eqns + 14 * 2 <= lora_eqns <= 2 * plain_eqns
    assert numbers(line("ratio:"))[0] > 0
