"""Training-step and inference benchmark of the factored engine (ratios, one process, one core).

Workload (lora_jax.models.gpt.BENCH): decoder-only LM, 4 layers, d_model 512, 8 heads, MLP 2048,
vocab 8192, seq 128, batch 4, float32, AdamW; LoRA r = 8 on q, k, v, o, fc1, fc2. Configurations
are stepped in turn inside one process and the medians compared:

  full         every weight trained
  floor        every weight frozen, one bias vector after the embedding trained
  factored     lj.lora_apply (the factored engine)
  materialized lj.lora_apply(materialize=True) (rebuilds W0 + s*a@b)
  lora_bf16    factored, bf16 base (float32 factors)
  qlora        factored, NF4 base (double-quantised, dequantised per layer at its use)

Memory is measured in a fresh subprocess per configuration (VmRSS after 3 steps).

    python experiments/bench_step.py            # full workload, writes RESULTS.md
    python experiments/bench_step.py --smoke    # tiny, for the tests
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # noqa: E402

_timing.pin_one_core()  # before jax starts its threads
# Before any thread allocates. Only the timing process: the --only children measure RSS,
# which a heap that keeps freed memory would inflate by the step's temporary buffer.
HEAP = _timing.DEFAULT_HEAP if "--only" in sys.argv else _timing.heap_for_timing(sys.argv)
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import gpt  # noqa: E402

SMOKE = gpt.Config(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=16)


def build(cfg: gpt.Config, batch: int, seq: int, rank: int, only: str | None = None):
    """Jitted steps, their (trainable, optimiser state, frozen) arguments, and forward passes.

    Frozen weights are passed as arguments (not closed over), as a training script does.
    """
    params = gpt.init(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab)
    rules = [lj.LoraRule(gpt.LORA_TARGETS, rank=rank, alpha=2.0 * rank, stack_axes=(0,))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(2))
    opt = optax.adamw(1e-4)

    def make(loss_fn):
        def step(train, state, fixed):
            loss, grads = jax.value_and_grad(loss_fn)(train, fixed)
            updates, state = opt.update(grads, state, train)
            return optax.apply_updates(train, updates), state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    configs = {
        "full": (lambda p, _: gpt.loss(p, cfg, tokens), params, None),
        "floor": (lambda b, p: gpt.loss(p, cfg, tokens, b), jnp.zeros((cfg.d_model,)), params),
        "factored": (
            lambda t, f: lj.lora_apply(gpt.loss)(f, t, cfg, tokens),
            trainable,
            frozen,
        ),
        "materialized": (
            lambda t, f: lj.lora_apply(gpt.loss, materialize=True)(f, t, cfg, tokens),
            trainable,
            frozen,
        ),
        "lora_bf16": (
            lambda t, f: lj.lora_apply(gpt.loss)(f, t, cfg, tokens),
            trainable,
            jax.tree.map(lambda w: w.astype(jnp.bfloat16), frozen),
        ),
        "qlora": (
            lambda t, f: lj.lora_apply(gpt.loss)(f, t, cfg, tokens),
            trainable,
            lj.quantize(frozen, rules),
        ),
    }
    if only:
        configs = {only: configs[only]}
    steps = {k: make(loss) for k, (loss, _, _) in configs.items()}
    states = {
        k: [jax.tree.map(jnp.copy, x), opt.init(x), fixed] for k, (_, x, fixed) in configs.items()
    }
    inputs = tokens[:, :-1]
    forward = jax.jit(lambda p: gpt.forward(p, cfg, inputs))
    fwd = {
        "base": (forward, (params,)),
        "merged": (forward, (lj.merge(frozen, trainable),)),
        "unmerged": (
            jax.jit(lambda f, t: lj.lora_apply(gpt.forward)(f, t, cfg, inputs)),
            (frozen, trainable),
        ),
    }
    return steps, states, fwd


def compile_times(steps, states) -> tuple[dict[str, float], dict[str, int]]:
    """Compile time (s) and compiled memory (argument + temporary + output bytes) per config."""
    seconds, memory = {}, {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        compiled = fn.lower(*states[name]).compile()
        seconds[name] = time.perf_counter() - t0
        m = compiled.memory_analysis()
        memory[name] = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
    return seconds, memory


def time_steps(steps, states, fwd, repeats: int, warmup: int) -> dict[str, _timing.Timing]:
    """Wall and process CPU seconds of every step and forward, stepped in turn."""

    def stepper(name):
        def run():
            train, state, loss = steps[name](*states[name])
            states[name][:2] = [train, state]
            return loss

        return run

    fns = {name: stepper(name) for name in steps}
    fns.update({name: (lambda fn=fn, args=args: fn(*args)) for name, (fn, args) in fwd.items()})
    return _timing.interleaved(fns, repeats, warmup=warmup)


def live_rss(config: str, smoke: bool) -> float:
    """Resident memory (MiB) of a fresh process after it compiled and ran 3 steps of one config.

    (Peak RSS is dominated by XLA's compilation and is the same for every configuration.)
    """
    cmd = [sys.executable, __file__, "--only", config] + (["--smoke"] if smoke else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mib"]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and few steps")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    _timing.add_system_malloc_flag(ap)
    args = ap.parse_args()
    cfg, batch, seq = (SMOKE, 2, 8) if args.smoke else (gpt.BENCH, 4, 128)
    repeats = args.repeats or (3 if args.smoke else 20)

    steps, states, fwd = build(cfg, batch, seq, rank=8 if not args.smoke else 2, only=args.only)
    if args.only:
        name = args.only
        state = states[name]
        for _ in range(3):
            train, opt_state, loss = steps[name](*state)
            state[:2] = [train, opt_state]
        loss.block_until_ready()
        print(json.dumps({"config": name, "rss_mib": _rss_mib()}))
        return

    compiled, compiled_mem = compile_times(steps, states)
    times = time_steps(steps, states, fwd, repeats, warmup=2)
    med = {k: t.median_cpu for k, t in times.items()}  # CPU time: the load-robust measure
    mem = {k: live_rss(k, args.smoke) for k in steps}
    n_params = lj.count_params(states["full"][0])
    n_train = lj.count_params(states["factored"][0])
    rows = [
        "| configuration | × floor | × full fine-tuning | wall s/step | CPU s/step | cores used "
        "| compile (s) | compiled memory (MiB) | RSS after 3 steps (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in steps:
        t = times[k]
        rows.append(
            f"| {k} | {med[k] / med['floor']:.2f} | {med[k] / med['full']:.2f} "
            f"| {t.median_wall:.3f} | {t.median_cpu:.3f} | {t.cores:.2f} "
            f"| {compiled[k]:.1f} | {compiled_mem[k] / 2**20:.0f} | {mem[k]:.0f} |"
        )
    adam_mib = 2 * 4 * (n_params - n_train) / 2**20
    compile_ratio = compiled["factored"] / compiled["materialized"]
    saved_mib = (compiled_mem["full"] - compiled_mem["factored"]) / 2**20
    body = "\n".join(rows) + (
        f"\n\n{n_params:,} parameters, {n_train:,} trainable (LoRA r = 8 on q, k, v, o, fc1, fc2); "
        f"ratios of median process CPU time over {repeats} interleaved steps after 2 warm-up "
        f"rounds, one core; memory of the timing process: {HEAP}. "
        f"Contention: {_timing.contention()}.\n\n"
        f"Factored compile time / materialized: {compile_ratio:.2f}.\n"
        f"Memory, full - factored: compiled {saved_mib:.0f} MiB, "
        f"RSS {mem['full'] - mem['factored']:.0f} MiB "
        f"(AdamW state that LoRA does not keep: {adam_mib:.0f} MiB; "
        f"gradients: {adam_mib / 2:.0f} MiB).\n\n"
        f"QLoRA step / f32-base LoRA step: {med['qlora'] / med['factored']:.2f}; "
        f"QLoRA step / bf16-base LoRA step: {med['qlora'] / med['lora_bf16']:.2f}.\n\n"
        "Inference forward (same batch): "
        f"unmerged (factored) / merged = {med['unmerged'] / med['merged']:.3f}; "
        f"merged / base = {med['merged'] / med['base']:.3f}.\n"
    )
    print(body)
    if not args.no_write:
        from _results import write_section

        cmd = "python experiments/bench_step.py" + (" --smoke" if args.smoke else "")
        title = "Training step (experiments/bench_step.py)"
        write_section(*_timing.results_names(title, cmd, args.system_malloc), body)


if __name__ == "__main__":
    main()
