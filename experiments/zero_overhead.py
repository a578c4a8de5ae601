"""Inference latency of a merged LoRA model vs the base model, and of the unmerged form.

Claim checked (Hu et al., 2021, section 4.1): after ``W = W0 + BA`` is merged, inference costs
exactly what the base model costs ("no additional inference latency"). Also measured: the
unmerged forward ``lj.lora_apply(fn)(frozen, trainable, ...)``, which computes
``x @ W0 + s (x @ a) @ b`` and so does a little more work.

Workloads: all-MiniLM-L6-v2 (real weights), batch 32 x 64 tokens, LoRA r = 8 on query/value;
``gpt.BENCH`` (4 layers, d_model 512, batch 4 x 128 tokens), LoRA r = 8 on q, k, v, o, fc1, fc2.
The factors ``b`` are set to random values so the merged weights differ from the base. One
process pinned to one core; the three forwards run interleaved, and the per-round ratios of
process CPU time are summarised by their median and quartiles.

    python experiments/zero_overhead.py           # writes RESULTS.md
    python experiments/zero_overhead.py --smoke   # tiny models, prints
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # noqa: E402

HEAP = _timing.DEFAULT_HEAP
if __name__ == "__main__":  # not when the tests import the workloads
    _timing.pin_one_core()  # before jax starts its threads
    HEAP = _timing.heap_for_timing(sys.argv)  # before any thread allocates
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import zlib  # noqa: E402

import data  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import bert, gpt  # noqa: E402

SMOKE_BERT = bert.BertConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)
SMOKE_GPT = gpt.Config(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=16)


def randomise_b(trainable, key: jax.Array):
    """Replace every factor ``b`` (zero at init) by small random values."""

    def fill(path, t):
        if not isinstance(t, lj.LoraFactors):
            return t
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
        return dataclasses.replace(t, b=0.01 * jax.random.normal(k, t.b.shape, t.b.dtype))

    return jax.tree_util.tree_map_with_path(
        fill, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors)
    )


def workloads(smoke: bool) -> dict[str, dict]:
    """name -> {"base": (fn, args), "merged": ..., "unmerged": ..., "note": str}."""
    out = {}
    if smoke:
        cfg = SMOKE_BERT
        params = bert.init(jax.random.key(0), cfg)
    else:
        params, cfg = bert.load(data.model_dir())
    b, s = (2, 8) if smoke else (32, 64)
    ids = jax.random.randint(jax.random.key(1), (b, s), 0, cfg.vocab_size)
    mask = jnp.ones((b, s), jnp.int32)
    rules = [lj.LoraRule(r"encoder/layer_\d+/attention/(query|value)/kernel", rank=8)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(2))
    trainable = randomise_b(trainable, jax.random.key(3))
    fwd = jax.jit(lambda p: bert.forward(p, cfg, ids, mask))
    out["MiniLM" if not smoke else "tiny BERT"] = {
        "base": (fwd, (params,)),
        "merged": (fwd, (lj.merge(frozen, trainable),)),
        "unmerged": (
            jax.jit(lambda f, t: lj.lora_apply(bert.forward)(f, t, cfg, ids, mask)),
            (frozen, trainable),
        ),
        "note": f"batch {b} x {s} tokens, r = 8 on query/value",
    }

    gcfg = SMOKE_GPT if smoke else gpt.BENCH
    b, s = (2, 8) if smoke else (4, 128)
    params = gpt.init(jax.random.key(4), gcfg)
    tokens = jax.random.randint(jax.random.key(5), (b, s), 0, gcfg.vocab)
    rules = [lj.LoraRule(gpt.LORA_TARGETS, rank=8, stack_axes=(0,))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(6))
    trainable = randomise_b(trainable, jax.random.key(7))
    fwd = jax.jit(lambda p: gpt.forward(p, gcfg, tokens))
    out["gpt.BENCH" if not smoke else "tiny GPT"] = {
        "base": (fwd, (params,)),
        "merged": (fwd, (lj.merge(frozen, trainable),)),
        "unmerged": (
            jax.jit(lambda f, t: lj.lora_apply(gpt.forward)(f, t, gcfg, tokens)),
            (frozen, trainable),
        ),
        "note": f"batch {b} x {s} tokens, r = 8 on q, k, v, o, fc1, fc2",
    }
    return out


VARIANTS = ("base", "merged", "unmerged")


def measure(work: dict, repeats: int, warmup: int = 2) -> dict[str, _timing.Timing]:
    """Wall and process CPU seconds per call of each variant, the variants interleaved."""
    fns = {k: (lambda fn=work[k][0], args=work[k][1]: fn(*args)) for k in VARIANTS}
    return _timing.interleaved(fns, repeats, warmup=warmup)


def ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``num / den``."""
    q = np.percentile(np.asarray(num) / np.asarray(den), [50, 25, 75])
    return float(q[0]), float(q[1]), float(q[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models, few repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30)")
    _timing.add_system_malloc_flag(ap)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.smoke else 30)
    lines = [
        "| model | workload | base wall ms | base CPU ms | cores used "
        "| merged / base [IQR] | unmerged / merged [IQR] |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, work in workloads(args.smoke).items():
        t = measure(work, repeats)
        m, lo, hi = ratio(t["merged"].cpu, t["base"].cpu)
        u, ulo, uhi = ratio(t["unmerged"].cpu, t["merged"].cpu)
        base = t["base"]
        lines.append(
            f"| {name} | {work['note']} | {1e3 * base.median_wall:.1f} "
            f"| {1e3 * base.median_cpu:.1f} | {base.cores:.2f} "
            f"| {m:.3f} [{lo:.3f}, {hi:.3f}] | {u:.3f} [{ulo:.3f}, {uhi:.3f}] |"
        )
    body = "\n".join(lines) + (
        f"\n\nRatios of process CPU time per forward, median and quartiles over {repeats} "
        "interleaved rounds after 2 warm-up rounds; one process pinned to one core "
        f"(os.sched_setaffinity), one compute thread, float32; memory: {HEAP}. "
        f"Contention: {_timing.contention()}. The merged model runs the same compiled "
        "program on different numbers, so merged / base is 1 up to timing noise; unmerged "
        "keeps the adapter branch."
    )
    print(body)
    if not args.smoke:
        from _results import write_section

        cmd = "python experiments/zero_overhead.py" + (
            f" --repeats {args.repeats}" if args.repeats else ""
        )
        title = "Inference overhead (experiments/zero_overhead.py)"
        write_section(*_timing.results_names(title, cmd, args.system_malloc), body)


if __name__ == "__main__":
    main()
