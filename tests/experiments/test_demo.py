"""The flagship demo, its data helpers and the PEFT speed comparison (smoke settings)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import data  # noqa: E402


def _run(script: str, *args: str, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script picks its own
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sentences_match_the_corpus():
    texts, labels = data.load_sentences()
    assert len(texts) == len(labels) == 12_808
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}
    assert abs(labels.mean() - 0.578) < 0.001  # 57.8% fresh


def test_split_is_fixed_and_disjoint():
    a, b = data.rotten_tomatoes(seed=0, n_test=1000), data.rotten_tomatoes(seed=0, n_test=1000)
    assert a.test_texts == b.test_texts and len(a.test_texts) == 1000
    assert len(a.train_texts) == 11_808
    assert sorted(a.train_texts + a.test_texts) == sorted(data.load_sentences()[0])
    c = data.rotten_tomatoes(seed=1, n_test=1000)
    assert c.test_texts != a.test_texts


@pytest.mark.parametrize("n_test", [0, 12_808], ids=["zero", "all"])
def test_split_rejects_bad_sizes(n_test):
    with pytest.raises(ValueError, match=r"n_test=\d+ must be in \(0, 12808\)"):
        data.rotten_tomatoes(n_test=n_test)


def test_package_dir_names_the_fix():
    with pytest.raises(FileNotFoundError, match="'no_such_pkg_xyz' is not installed.*make setup"):
        data.package_dir("no_such_pkg_xyz")


def test_tokenizer_matches_known_ids_and_truncates():
    tok = data.tokenizer(max_len=6)
    assert data.encode(data.tokenizer(), ["A man is eating food."])[0].tolist() == [
        101, 1037, 2158, 2003, 5983, 2833, 1012, 102,
    ]  # fmt: skip
    (ids,) = data.encode(tok, ["A man is eating food."])
    assert ids.tolist() == [101, 1037, 2158, 2003, 5983, 102]


@pytest.mark.parametrize(
    "length,expected", [(1, 16), (16, 16), (17, 32), (64, 64)], ids=["1", "16", "17", "64"]
)
def test_bucket(length, expected):
    assert data.bucket(length) == expected


def test_bucket_rejects_long_input():
    with pytest.raises(ValueError, match="length 65 exceeds the largest bucket 64"):
        data.bucket(65)


def test_eval_batches_cover_every_row_once_with_bucketed_widths():
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 100, n).astype(np.int32) for n in rng.integers(2, 60, 50)]
    seen = []
    for index, input_ids, mask in data.eval_batches(ids, batch_size=16):
        assert input_ids.shape == mask.shape == (16, data.bucket(int(mask.sum(1).max())))
        for i, row, m in zip(index, input_ids, mask):
            if i >= 0:
                np.testing.assert_array_equal(row[: m.sum()], ids[i])
                assert not row[m.sum() :].any()
                seen.append(int(i))
    assert sorted(seen) == list(range(50))


@pytest.mark.parametrize("pool", [1, 4], ids=["random", "grouped"])
def test_train_batches_reshuffle_and_keep_labels(pool):
    ids = [np.full(n, n, np.int32) for n in range(1, 65)]
    labels = np.arange(1, 65, dtype=np.int32)
    batches = data.train_batches(ids, labels, batch_size=8, seed=0, pool=pool)
    epochs = [[next(batches) for _ in range(8)] for _ in range(2)]  # 64 // 8 batches an epoch
    for epoch in epochs:
        seen = np.concatenate([y for _, _, y in epoch])
        assert sorted(seen) == list(range(1, 65))  # every row once per epoch
        for input_ids, mask, y in epoch:
            np.testing.assert_array_equal(input_ids[:, 0], y)  # each row is its own label
            np.testing.assert_array_equal(mask.sum(1), y)
    assert not np.array_equal(epochs[0][0][2], epochs[1][0][2])


def test_grouped_batches_pad_less():
    rng = np.random.default_rng(0)
    ids = [np.ones(n, np.int32) for n in rng.integers(5, 64, 2048)]
    labels = np.zeros(2048, np.int32)
    width = {}
    for pool in (1, 16):
        batches = data.train_batches(ids, labels, batch_size=32, seed=0, pool=pool)
        width[pool] = np.mean([next(batches)[0].shape[1] for _ in range(64)])
    assert width[16] < 0.8 * width[1], width


@pytest.mark.slow  # 12 s idle, up to 90 s loaded: real model, three compiles
def test_demo_smoke(tmp_path):
    out = _run("demo.py", "--smoke", "--out", str(tmp_path))
    m = re.search(r"^held-out accuracy: (\d\.\d+) -> (\d\.\d+)", out, re.M)
    assert m, out
    before, after = (float(x) for x in m.groups())
    # Training helps: 0.333 -> 0.708 on the seeded smoke run (48 held-out sentences).
    assert 0.0 <= before < after - 0.1 and after <= 1.0, (before, after)
    assert "predictions identical: True" in out and "reloaded adapters identical: True" in out
    assert re.search(r"trainable params: 74,498 of 22,566,146 \(302\.9x fewer", out), out
    assert any((tmp_path / "adapter_orbax").iterdir())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "adapter_peft" / name).stat().st_size > 0
    png = tmp_path / "training_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"training curve: {png}" in out
    assert "(48 sentences," in out
    results = ROOT / "experiments" / "RESULTS.md"
    recorded = results.read_text() if results.exists() else ""
    assert "(48 sentences," not in recorded  # smoke figures are never recorded
    assert "(48 sentences," in (tmp_path / "summary.md").read_text()  # the summary goes to --out
    assert re.search(r"s/step \(process CPU \d+\.\d+ s/step: \d+\.\d+ cores used\)", out), out


@pytest.mark.slow  # 40 s idle, minutes loaded: imports torch, transformers, peft; two models
def test_peft_speed_smoke():
    out = _run("peft_speed.py", "--smoke", timeout=900)  # MiniLM and a tiny Llama, both sides
    rows = dict(re.findall(r"^\| (lora_jax|PyTorch \+ PEFT) \| (\d+\.\d+) \|", out, re.M))
    assert set(rows) == {"lora_jax", "PyTorch + PEFT"}, out
    assert all(float(v) > 0 for v in rows.values())
    assert re.search(r"steps/s over PyTorch \+ PEFT steps/s: \*\*\d+\.\d+x\*\*", out), out
    smol = re.findall(
        r"^\| SmolLM2 (lora_jax|PyTorch \+ PEFT) (LoRA|QLoRA)[^|]* \| (\d+\.\d+) \|", out, re.M
    )
    assert {(who, kind) for who, kind, _ in smol} >= {
        ("lora_jax", "LoRA"),
        ("lora_jax", "QLoRA"),
        ("PyTorch + PEFT", "LoRA"),
    }, out
    assert re.search(r"cores used", out) and "pinned to 1 core(s)" in out, out
    if sys.platform == "linux":  # glibc: the heap setting took, and the report says so
        assert "memory: one malloc arena, no mmap, freed memory kept" in out, out


@pytest.mark.slow  # 30 s idle: five tiny jitted steps and a torch step on CPU
def test_device_bench_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["OUT"] = str(tmp_path)
    proc = subprocess.run(
        ["bash", str(ROOT / "experiments" / "device_bench.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "PY": sys.executable},
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "device_bench.md").read_text()
    for row in (
        "lora_jax LoRA",
        "lora_jax floor",
        "lora_jax full fine-tuning",
        "lora_jax QLoRA (NF4 base)",
        "PyTorch + PEFT LoRA",
    ):
        assert re.search(rf"^\| {re.escape(row)} \| \d+\.\d+ \|", report, re.M), report
    assert re.search(r"LoRA step / floor: \*\*\d+\.\d+x\*\*", report), report
    assert re.search(r"\*\*\d+% of the roofline\*\*", report), report
