"""Throughput of one mixed batch over many adapters (AdapterBank) versus a merged model per adapter.

Model: lora_jax.models.gpt BENCH (4 layers, d_model 512, MLP 2048, vocab 8192), LoRA r = 8
(alpha 16) on q, k, v, o, fc1, fc2, float32, one CPU core (pinned). A batch of 64 sequences of 32
tokens (BENCH's 128-token sequences shortened so the whole run fits in a few minutes on a
shared 2-core machine) is served

  bank N       one jitted call, lj.lora_apply(gpt.forward)(frozen, bank, ..., adapter_ids=ids)
               with example i using adapter 1 + i % N
  loop N       for each of the N adapters: lj.merge it into the base (jitted), run its
               examples through the merged model (jitted gpt.forward)
  merged       one merged model on the whole batch (the zero-overhead single-task case)
  base         the base model

It also times the low-rank kernel alone on the mixed batch (one adapted 512x512 matmul):
gathered factors with batched matmuls (BGMV, what the bank runs) against grouping the
tokens per adapter with lax.ragged_dot (SGMV).

    python experiments/bank_throughput.py           # writes experiments/RESULTS.md
    python experiments/bank_throughput.py --smoke   # tiny model, prints only
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # noqa: E402

_timing.pin_one_core()  # before jax starts its threads
HEAP = _timing.heap_for_timing(sys.argv)  # before any thread allocates
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import gpt  # noqa: E402

SMOKE = gpt.Config(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=16)
is_factors = lambda x: isinstance(x, lj.LoraFactors)


def median_times(fns: dict, repeats: int, stats: dict | None = None) -> dict[str, float]:
    """Median process CPU seconds per call of each function, run in interleaved rounds.

    CPU time (all threads of this one-core process) rather than wall time: on a shared
    machine it does not count the time other processes held the core. ``stats`` receives
    the full :class:`_timing.Timing` per function (wall time too).
    """
    timings = _timing.interleaved(fns, repeats)
    if stats is not None:
        stats.update(timings)
    return {k: t.median_cpu for k, t in timings.items()}


def make_adapters(params, n: int, rank: int) -> tuple:
    """``n`` adapters with random non-zero factors for the same base."""
    rule = lj.LoraRule(gpt.LORA_TARGETS, rank=rank, alpha=2.0 * rank, stack_axes=(0,))
    frozen, template = lj.split(params, rule, key=jax.random.key(0))
    adapters = []
    for i in range(n):
        leaves, tree = jax.tree.flatten(template, is_leaf=is_factors)
        new = []
        for j, f in enumerate(leaves):
            ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(i), j))
            a = jax.random.normal(ka, f.a.shape) / np.sqrt(f.a.shape[-2])
            new.append(f.with_factors(a, 0.02 * jax.random.normal(kb, f.b.shape)))
        adapters.append(jax.tree.unflatten(tree, new))
    return frozen, adapters


def kernel_times(d: int, tokens: int, seq: int, n: int, rank: int, repeats: int) -> dict:
    """One adapted (d, d) matmul's low-rank term on a mixed batch: BGMV vs ragged_dot (SGMV)."""
    k = jax.random.split(jax.random.key(n), 3)
    batch = tokens // seq
    x = jax.random.normal(k[0], (batch, seq, d))
    a = jax.random.normal(k[1], (n, d, rank))
    b = jax.random.normal(k[2], (n, rank, d))
    ids = jnp.arange(batch) % n

    @jax.jit
    def bgmv(x, a, b, ids):
        t = jnp.einsum("btd,bdr->btr", x, a[ids])
        return jnp.einsum("btr,bro->bto", t, b[ids])

    @jax.jit
    def sgmv(x, a, b, ids):
        order = jnp.argsort(ids)
        xs = x[order].reshape(batch * seq, d)
        sizes = (jnp.bincount(ids, length=n) * seq).astype(jnp.int32)
        y = lax.ragged_dot(lax.ragged_dot(xs, a, sizes), b, sizes).reshape(batch, seq, d)
        return jnp.zeros_like(y).at[order].set(y)

    np.testing.assert_allclose(bgmv(x, a, b, ids), sgmv(x, a, b, ids), rtol=2e-3, atol=2e-3)
    fns = {"bgmv": lambda: bgmv(x, a, b, ids), "sgmv": lambda: sgmv(x, a, b, ids)}
    return median_times(fns, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, prints only")
    ap.add_argument("--repeats", type=int, default=None)
    _timing.add_system_malloc_flag(ap)
    args = ap.parse_args()
    cfg, batch, seq, rank = (SMOKE, 8, 8, 2) if args.smoke else (gpt.BENCH, 64, 32, 8)
    counts = (1, 2, 8) if args.smoke else (1, 8, 64)
    repeats = args.repeats or (2 if args.smoke else 7)

    params = gpt.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab)
    frozen, adapters = make_adapters(params, max(counts), rank)
    forward = jax.jit(lambda p, tok: gpt.forward(p, cfg, tok))
    merge = jax.jit(lj.merge)
    served = jax.jit(
        lambda f, bank, ids, tok: lj.lora_apply(gpt.forward)(f, bank, cfg, tok, adapter_ids=ids)
    )

    merged = merge(frozen, adapters[0])
    fns = {"base": lambda: forward(params, tokens), "merged": lambda: forward(merged, tokens)}
    check = None
    for n in counts:
        bank = lj.stack_adapters(adapters[:n])
        ids = jnp.asarray(1 + np.arange(batch) % n, jnp.int32)
        groups = [np.flatnonzero(np.asarray(ids) == j + 1) for j in range(n)]

        def loop(with_merge: bool = True, n=n, groups=groups):
            outs = []
            for j in range(n):
                p = merge(frozen, adapters[j]) if with_merge else merged
                outs.append(forward(p, tokens[groups[j]]))
            return outs

        fns[f"bank{n}"] = lambda bank=bank, ids=ids: served(frozen, bank, ids, tokens)
        fns[f"loop{n}"] = loop
        fns[f"fwd{n}"] = lambda loop=loop: loop(False)
        if n == max(counts):  # the bank's mixed batch equals the merged models' outputs
            out = served(frozen, bank, ids, tokens)
            check = max(float(jnp.abs(out[g] - o).max()) for g, o in zip(groups, loop()))
    stats: dict = {}
    med = median_times(fns, repeats, stats)
    t_base, t_merged = med["base"], med["merged"]
    rows = [(n, med[f"bank{n}"], med[f"loop{n}"], med[f"fwd{n}"]) for n in counts]
    kernels = {n: kernel_times(cfg.d_model, batch * seq, seq, n, rank, repeats) for n in counts}

    ntok = batch * seq
    us = lambda t: 1e6 * t / ntok
    lines = [
        "| adapters in the batch | bank (µs/token) | loop: merge + forward (µs/token) "
        "| loop: forwards only (µs/token) | bank / loop |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, tb, tl, tf in rows:
        lines.append(f"| {n} | {us(tb):.1f} | {us(tl):.1f} | {us(tf):.1f} | {tb / tl:.2f} |")
    lines += [
        "",
        f"Single merged model: {us(t_merged):.1f} µs/token; base model: {us(t_base):.1f} µs/token. "
        f"Per-token overhead of the bank with one adapter over the merged model: "
        f"{us(rows[0][1]) - us(t_merged):+.1f} µs (**{rows[0][1] / t_merged:.2f}x** in CPU time, "
        f"{stats['bank1'].median_wall / stats['merged'].median_wall:.2f}x in wall time).",
        "",
        "Low-rank kernel alone (one adapted matmul, mixed batch): "
        + "; ".join(
            f"{n} adapter(s): BGMV {1e3 * k['bgmv']:.2f} ms, ragged_dot {1e3 * k['sgmv']:.2f} ms"
            for n, k in kernels.items()
        )
        + ". The bank uses BGMV (vmap with factors gathered per example) for mixed ids; "
        "when every example has the same slot (the 1-adapter row) it runs the batch as one "
        "call with that slot's factors (lax.cond at run time).",
        "",
        f"Model {cfg}; LoRA r={rank} on q, k, v, o, fc1, fc2; batch {batch} x {seq} tokens, "
        f"example i uses adapter 1 + i mod N; median of {repeats} interleaved rounds after a "
        f"warm-up, process CPU time, one core; memory: {HEAP}. "
        f"Contention: {_timing.contention()}. "
        f"Max |bank - merged loop| over the logits with "
        f"{max(counts)} adapters: "
        f"{check:.1e}.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.smoke:
        from _results import write_section

        title, cmd = _timing.results_names(
            "Adapter bank (experiments/bank_throughput.py)",
            "python experiments/bank_throughput.py",
            args.system_malloc,
        )
        write_section(title, cmd, body)


if __name__ == "__main__":
    main()
