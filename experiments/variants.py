"""LoRA variants on the flagship task: LoRA, rsLoRA (r=64), DoRA, AdaLoRA, GLoRA, PiSSA, VeRA.

all-MiniLM-L6-v2 + Rotten Tomatoes with the demo's recipe (query/value adapters plus a fully
trained 2-way head on the mean-pooled output, batch 32, at most 64 tokens, AdamW with weight
decay 0.01 and a one-cycle schedule peaking at 2e-3, 1,000 held-out sentences of a fixed-seed
shuffle). Every variant has scale 2 (alpha = 2r; rsLoRA alpha = 16, so alpha/sqrt(64) = 2).
AdaLoRA starts at rank 12 per matrix and prunes to an average of 8 (tinit 10%, tfinal 20% of
the steps, reallocation every 5 steps), with PEFT's orthogonality penalty (weight 0.5).
GLoRA runs twice: lora_jax's fixed configuration (A a per-column vector, B rank 8, C none,
D and E vectors on the query/value biases) and one with a low-rank A and a vector C, the
form whose elementwise product with W0 the engine has to form densely. VeRA (a plug-in
variant, lj.Vera) uses r=256 shared frozen projections and trains only its scaling vectors
(scale 1, no alpha), at the same learning rate as the others.

XLA runs in one CPU thread (so the step times do not depend on what else the machine
runs); after training, every variant's jitted step runs on the same 32 x 64 batch, round by
round (interleaved), and the median per variant is reported as a ratio to plain LoRA.

    python experiments/variants.py              # about 15 min on 2 CPU cores
    python experiments/variants.py --smoke      # tiny run for the tests
    python experiments/variants.py --only VeRA  # one row (plus the LoRA baseline), not recorded
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import data  # noqa: E402
from _results import write_section  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import bert  # noqa: E402

TITLE = "Variants (experiments/variants.py)"
QUERY_VALUE = r".*/(query|value)/kernel"
SPLIT_SEED = 0
ORTH_WEIGHT = 0.5  # PEFT's AdaLoraConfig.orth_reg_weight default


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    rule: dict  # LoraRule keyword arguments for the query/value kernels
    adalora: bool = False


VARIANTS = (
    Variant("LoRA r=8", {"rank": 8, "alpha": 16.0, "init": "kaiming"}),
    Variant("rsLoRA r=64", {"rank": 64, "alpha": 16.0, "init": "kaiming", "rslora": True}),
    Variant("DoRA r=8", {"rank": 8, "alpha": 16.0, "init": "kaiming", "dora": True}),
    Variant("AdaLoRA r=12->8", {"rank": 12, "alpha": 24.0, "adalora": True}, adalora=True),
    Variant("GLoRA r=8", {"rank": 8, "alpha": 16.0, "init": "kaiming", "glora": True}),
    Variant(
        "GLoRA r=8, low-rank A",
        {"rank": 8, "alpha": 16.0, "init": "kaiming", "glora": lj.Glora(a="lowrank", c="vector")},
    ),
    Variant("PiSSA r=8", {"rank": 8, "alpha": 16.0, "init": "pissa"}),
    Variant("VeRA r=256", {"rank": 256, "variant": lj.Vera()}),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per variant")
    p.add_argument("--lr", type=float, default=2e-3, help="peak of the one-cycle schedule")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    p.add_argument(
        "--only",
        metavar="NAME",
        help="run the variants whose name starts with NAME, with LoRA as the time baseline; "
        "the table is printed, not recorded",
    )
    args = p.parse_args(argv)
    args.batch_size, args.max_len, args.n_test = 32, 64, 1000
    if args.smoke:
        args.steps, args.batch_size, args.max_len, args.n_test, args.rounds = 4, 4, 16, 24, 2
    return args


def build(variant: Variant, params: dict, seed: int):
    """(rules, frozen, trainable) of one variant; the head is trained fully."""
    rules = [
        lj.LoraRule(QUERY_VALUE, **variant.rule),
        lj.LoraRule(r"classifier/.*", full=True),
    ]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(seed))
    # the head's leaves are the arrays of `params`: copy them, the step donates its inputs
    return rules, frozen, jax.tree.map(jnp.copy, trainable)


def make_step(cfg, opt, allocator: lj.RankAllocator | None):
    """Jitted step ``(trainable, opt_state, alloc_state, frozen, ids, mask, labels)``."""

    def loss_fn(trainable, frozen, ids, mask, labels):
        logits = lj.lora_apply(bert.classify)(frozen, trainable, cfg, ids, mask)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        if allocator is not None:
            loss = loss + ORTH_WEIGHT * lj.orthogonal_regularizer(trainable, squared=False)
        return loss

    def step(trainable, opt_state, alloc_state, frozen, ids, mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, labels)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if allocator is not None:
            trainable, alloc_state = allocator.update(trainable, grads, alloc_state)
        return trainable, opt_state, alloc_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def setup(variant: Variant, params: dict, cfg, args):
    """Everything one variant's training needs: the split, the optimiser and the step."""
    rules, frozen, trainable = build(variant, params, args.seed)
    allocator = None
    if variant.adalora:
        allocator = lj.RankAllocator(
            target_rank=8,
            total_steps=args.steps,
            tinit=args.steps // 10,
            tfinal=args.steps // 5,
            delta_t=5 if not args.smoke else 1,
        )
    opt = optax.adamw(optax.cosine_onecycle_schedule(args.steps, args.lr), weight_decay=0.01)
    step = make_step(cfg, opt, allocator)
    alloc_state = None if allocator is None else allocator.init(trainable)
    return rules, frozen, trainable, opt.init(trainable), alloc_state, step, allocator


def adapter_params(trainable) -> int:
    """Trainable scalars in the adapters (a, b and any variant's parts), the head excluded."""
    return sum(
        sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
        for _, t in lj._src.core.trees.leaves_with_paths(trainable)
        if isinstance(t, lj.LoraFactors)
    )


def load_model(seed: int):
    params, cfg = bert.load(data.model_dir())
    params = {**params, **bert.init_classifier(jax.random.key(seed + 1), cfg, 2)}
    return params, cfg


def time_steps(trained: dict, batch: tuple, rounds: int) -> dict[str, float]:
    """Median seconds of each variant's training step on ``batch``, interleaved by round.

    ``trained`` maps a variant's name to ``[step, frozen, trainable, opt_state, alloc_state]``.
    """
    times = {name: [] for name in trained}
    for _ in range(rounds + 1):  # the first round compiles the batch's shape, if new
        for name, st in trained.items():
            step, frozen, *state = st
            start = time.perf_counter()
            out = jax.block_until_ready(step(*state, frozen, *batch))
            times[name].append(time.perf_counter() - start)
            st[2:] = out[:3]
    return {k: float(np.median(x[1:])) for k, x in times.items()}


def main(argv: list[str] | None = None) -> list[str]:
    """Train every variant, time their steps, return (and record) the table rows."""
    given = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(given)
    t_start = time.perf_counter()
    buckets = tuple(b for b in data.BUCKETS if b < args.max_len) + (args.max_len,)
    split = data.rotten_tomatoes(seed=SPLIT_SEED, n_test=args.n_test)
    tok = data.tokenizer(args.max_len)
    train_ids, test_ids = data.encode(tok, split.train_texts), data.encode(tok, split.test_texts)
    params, cfg = load_model(args.seed)
    forward = jax.jit(lambda f, t, i, m: lj.lora_apply(bert.classify)(f, t, cfg, i, m))

    import demo  # the flagship script's evaluation helpers

    results, trained = [], {}
    chosen = [v for v in VARIANTS if args.only is None or v.name.startswith(args.only)]
    if not chosen:
        raise SystemExit(f"--only {args.only!r} matches none of {[v.name for v in VARIANTS]}")
    for v in [VARIANTS[0]] * (VARIANTS[0] not in chosen) + chosen:
        rules, frozen, trainable, opt_state, alloc_state, step, allocator = setup(
            v, params, cfg, args
        )
        n_params = adapter_params(trainable)
        batches = data.train_batches(
            train_ids, split.train_labels, args.batch_size, args.seed, buckets
        )
        start = time.perf_counter()
        for _ in range(args.steps):
            ids, mask, labels = next(batches)
            trainable, opt_state, alloc_state, loss = step(
                trainable, opt_state, alloc_state, frozen, ids, mask, labels
            )
        loss = float(loss)
        seconds = time.perf_counter() - start
        logits = demo.predict(forward, (frozen, trainable), test_ids, buckets)
        acc = demo.accuracy(logits, split.test_labels)
        ranks = ""
        if allocator is not None:
            kept = allocator.rank_pattern(alloc_state)
            per = [r for v_ in kept.values() for r in v_]
            ranks = f"kept ranks {min(per)}-{max(per)} (total {sum(per)} of {12 * len(per)})"
        print(f"{v.name}: held-out accuracy {acc:.3f}, final loss {loss:.3f}, "
              f"{n_params:,} adapter params, {seconds:.0f} s {ranks}")  # fmt: skip
        results.append((v, acc, n_params, ranks))
        trained[v.name] = [step, frozen, trainable, opt_state, alloc_state]
    long = [x for x in train_ids if len(x) > args.max_len // 2][: args.batch_size]
    batch = (*data.pad(long, (args.max_len,)), split.train_labels[: args.batch_size])
    times = time_steps(trained, batch, args.rounds)
    base = times[VARIANTS[0].name]
    header = (
        "| variant | held-out accuracy | adapter params | step time vs LoRA (1 thread) | notes |\n"
        "|---|---|---|---|---|"
    )
    rows = [
        f"| {v.name} | {acc:.3f} | {n:,} | {times[v.name] / base:.2f}x "
        f"({1e3 * times[v.name]:.0f} ms) | {ranks} |"
        for v, acc, n, ranks in results
    ]
    lines = [header, *rows]
    total = time.perf_counter() - t_start
    print("\n".join(lines) + f"\ntotal wall time: {total:.0f} s")
    if not args.smoke and args.only is None:
        body = (
            "\n".join(lines)
            + f"\n\n{args.steps} steps of {args.batch_size} sentences (at most {args.max_len} "
            f"tokens) per variant, {len(split.test_labels):,} held-out sentences; the 2-way head "
            f"(770 params) is trained too. Step times: median of {args.rounds} interleaved "
            f"rounds on one {args.batch_size} x {args.max_len} batch, one XLA thread. Total "
            f"wall time {total:.0f} s."
        )
        command = "python experiments/variants.py" + (f" {shlex.join(given)}" if given else "")
        write_section(TITLE, command, body)
    return lines


if __name__ == "__main__":
    main()
