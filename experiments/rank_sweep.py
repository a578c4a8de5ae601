"""Held-out accuracy vs LoRA rank on the flagship task, with full fine-tuning for reference.

Claim checked (Hu et al., 2021, section 7.2 / table 6): a very small rank already matches
larger ranks and full fine-tuning. Task: all-MiniLM-L6-v2 (real weights) classifying Rotten
Tomatoes sentences fresh/rotten (``experiments/data.py``: fixed-seed shuffle, 1,000 held
out). Recipe (as ``experiments/demo.py``): LoRA on every query/value kernel (alpha = 2r, so
the scale alpha/r = 2 at every rank) plus a trained 2-way head on the mean-pooled state;
batch 32, at most 64 tokens (bucketed padding), AdamW (weight decay 0.01) with a one-cycle
schedule peaking at 2e-3, 100 steps per run (the demo's 200 halved to fit a shared
2-core machine). Full fine-tuning trains every weight with the same schedule but peak 5e-5
on the encoder (the usual BERT fine-tuning rate; not tuned here), 2e-3 on the head.

    python experiments/rank_sweep.py            # r in {1,2,4,8,16,64} + full: RESULTS.md, PNG
    python experiments/rank_sweep.py --jobs 4   # the same, 4 runs at a time in subprocesses
    python experiments/rank_sweep.py --smoke    # tiny random encoder, a few steps, prints
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import lora_jax as lj
from lora_jax.models import bert

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402

QV = r"encoder/layer_\d+/attention/(query|value)/kernel"
HEAD = lj.LoraRule(r"classifier/(kernel|bias)", full=True)
RANKS = (1, 2, 4, 8, 16, 64)
SMOKE_CONFIG = bert.BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)


@dataclasses.dataclass(frozen=True)
class Task:
    """A model with a fresh head and the tokenised task."""

    params: dict
    config: bert.BertConfig
    train_ids: list
    train_labels: np.ndarray
    test_ids: list
    test_labels: np.ndarray
    buckets: tuple[int, ...]


def load_task(smoke: bool, n_test: int = 1000) -> Task:
    """MiniLM (or, with ``smoke``, a tiny random encoder) with a new head, and the data."""
    if smoke:
        config = SMOKE_CONFIG
        params = bert.init(jax.random.key(0), config)
    else:
        params, config = bert.load(data.model_dir())
    params = {**params, **bert.init_classifier(jax.random.key(1), config, 2)}
    split = data.rotten_tomatoes(seed=0, n_test=n_test)
    tok = data.tokenizer(64)
    train_texts = split.train_texts[:512] if smoke else split.train_texts
    return Task(
        params=params,
        config=config,
        train_ids=data.encode(tok, train_texts),
        train_labels=split.train_labels[: len(train_texts)],
        test_ids=data.encode(tok, split.test_texts),
        test_labels=split.test_labels,
        buckets=(64,) if smoke else data.BUCKETS,
    )


def lora_rules(rank: int) -> list[lj.LoraRule]:
    return [lj.LoraRule(QV, rank=rank), HEAD]


def _loss(params: dict, config: bert.BertConfig, ids, mask, labels) -> jax.Array:
    logits = bert.classify(params, config, ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(params: dict, task: Task, batch_size: int = 128) -> float:
    """Held-out accuracy of a plain (merged) parameter tree."""
    predict = jax.jit(lambda p, i, m: bert.classify(p, task.config, i, m).argmax(-1))
    correct = 0
    for index, ids, mask in data.eval_batches(task.test_ids, batch_size, task.buckets):
        pred = np.asarray(predict(params, ids, mask))
        keep = index >= 0
        correct += int((pred[keep] == task.test_labels[index[keep]]).sum())
    return correct / len(task.test_ids)


def finetune(
    task: Task,
    rules: Sequence[lj.LoraRule] | None,
    *,
    steps: int,
    batch_size: int = 32,
    peak_lr: float = 2e-3,
    body_lr: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``rules``' targets (``None``: every weight) and evaluate on the held-out set.

    Args:
        rules: LoraRules for ``lj.split``; None trains the whole tree (full fine-tuning).
        body_lr: peak learning rate of every trainable leaf outside ``classifier/``
            (default ``peak_lr``).

    Returns:
        dict with ``accuracy``, ``trainable`` (parameter count), ``losses`` (per step),
        ``step_s`` / ``step_cpu_s`` (median wall / CPU seconds per step, second half),
        ``frozen``, ``trainable_tree``, ``merged``.
    """
    if rules is None:
        frozen, trainable = jax.tree.map(lambda _: None, task.params), task.params
        apply = lambda f, t, *a: _loss(t, task.config, *a)
    else:
        frozen, trainable = lj.split(task.params, rules, key=jax.random.key(seed + 2))
        apply = lambda f, t, *a: lj.lora_apply(_loss)(f, t, task.config, *a)

    def group(tree):
        label = lambda path, _: "head" if "classifier" in jax.tree_util.keystr(path) else "body"
        return jax.tree_util.tree_map_with_path(label, tree)

    sched = lambda lr: optax.cosine_onecycle_schedule(steps, lr)
    opt = optax.multi_transform(
        {
            "head": optax.adamw(sched(peak_lr), weight_decay=0.01),
            "body": optax.adamw(sched(body_lr or peak_lr), weight_decay=0.01),
        },
        group,
    )

    @jax.jit
    def step(frozen, trainable, state, ids, mask, labels):
        loss, grads = jax.value_and_grad(apply, argnums=1)(frozen, trainable, ids, mask, labels)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    state = opt.init(trainable)
    batches = data.train_batches(task.train_ids, task.train_labels, batch_size, seed, task.buckets)
    losses, times, cpu = [], [], []
    for _ in range(steps):
        ids, mask, labels = next(batches)
        t0, c0 = time.perf_counter(), time.process_time()
        trainable, state, loss = step(frozen, trainable, state, ids, mask, labels)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    merged = trainable if rules is None else lj.merge(frozen, trainable)
    n_train = lj.count_params(trainable)
    return dict(
        accuracy=accuracy(merged, task),
        trainable=n_train,
        losses=losses,
        step_s=statistics.median(times[len(times) // 2 :]),
        step_cpu_s=statistics.median(cpu[len(cpu) // 2 :]),
        frozen=frozen,
        trainable_tree=trainable,
        merged=merged,
    )


def plot(rows: list[dict], full: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    ranks = [r["rank"] for r in rows]
    ax.plot(ranks, [r["accuracy"] for r in rows], "o-", label="LoRA on query/value + head")
    ax.axhline(full["accuracy"], color="gray", ls="--", label="full fine-tuning")
    for r in rows:
        ax.annotate(f"{r['trainable'] / 1e3:.0f}k", (r["rank"], r["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(0, 6), ha="center")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r (labels: trainable parameters)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("MiniLM on Rotten Tomatoes (1,000 held out)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_TASKS: dict[bool, Task] = {}
KEYS = ("accuracy", "trainable", "step_s", "step_cpu_s")


def run_config(rank: int | str, smoke: bool, steps: int, batch_size: int) -> dict:
    """One row of the sweep (``rank="full"``: full fine-tuning); loads the task once per process."""
    if smoke not in _TASKS:
        _TASKS[smoke] = load_task(smoke, n_test=64 if smoke else 1000)
    task = _TASKS[smoke]
    if rank == "full":
        res = finetune(task, None, steps=steps, batch_size=batch_size, body_lr=5e-5)
    else:
        res = finetune(task, lora_rules(rank), steps=steps, batch_size=batch_size)
    row = dict(rank=rank, **{k: res[k] for k in KEYS})
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random encoder, few steps")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 100)")
    ap.add_argument("--jobs", type=int, default=1, help="configurations run in parallel processes")
    args = ap.parse_args()
    steps = args.steps or (3 if args.smoke else 100)
    batch_size = 8 if args.smoke else 32
    configs = [*((1, 2) if args.smoke else RANKS), "full"]
    t_start = time.perf_counter()
    jobs = [(c, args.smoke, steps, batch_size) for c in configs]
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(run_config, *zip(*jobs)))
    else:
        results = [run_config(*job) for job in jobs]
    rows, full = results[:-1], results[-1]
    task = _TASKS.get(args.smoke) or load_task(args.smoke, n_test=64 if args.smoke else 1000)
    before = accuracy(task.params, task)
    total = lj.count_params(task.params)
    lines = [
        "| r | trainable params | % of model | held-out accuracy | s / step | CPU s / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rank']} | {r['trainable']:,} | {100 * r['trainable'] / total:.3f} "
            f"| {r['accuracy']:.3f} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} |"
        )
    best = max(rows, key=lambda r: r["accuracy"])
    body = "\n".join(lines) + (
        f"\n\nAccuracy before training (random head): {before:.3f}. {steps} steps per run "
        f"(batch {batch_size}, {steps * batch_size:,} sentences, under one epoch), one seed; "
        f"the binomial standard error of an accuracy near 0.8 on {len(task.test_ids):,} "
        f"sentences is {np.sqrt(0.8 * 0.2 / len(task.test_ids)):.3f}. Best LoRA rank: "
        f"r = {best['rank']} ({best['accuracy']:.3f}); r = 1: {rows[0]['accuracy']:.3f}; full "
        f"fine-tuning: {full['accuracy']:.3f}. Total wall time "
        f"{(time.perf_counter() - t_start) / 60:.1f} min on {os.cpu_count()} CPU cores shared "
        f"with other jobs, {args.jobs} configuration(s) at a time (CPU s / step: median process "
        "CPU time of the second half of the steps, which contention does not inflate).\n\n"
        "![accuracy vs rank](rank_sweep.png)"
    )
    print(body)
    if not args.smoke:
        from _results import write_section

        plot(rows, full, os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank_sweep.png"))
        cmd = "python experiments/rank_sweep.py" + (f" --steps {args.steps}" if args.steps else "")
        cmd += f" --jobs {args.jobs}" if args.jobs > 1 else ""
        write_section("Quality vs rank (experiments/rank_sweep.py)", cmd, body)


if __name__ == "__main__":
    main()
