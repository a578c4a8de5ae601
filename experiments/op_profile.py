"""Where a training step's time goes: per-op times of the compiled GPT floor and LoRA steps.

Runs the floor and the factored LoRA step of ``experiments/bench_step.py`` under
``jax.profiler`` (one process pinned to one core), sums each compiled op's trace events
per step, and prints, per configuration, the time by op kind (``ynn_fusion``: XLA:CPU's
fast matmul library; ``dot``: a matmul left to XLA's own emitter; ``copy``,
``wrapped_broadcast``, ...) and the slowest ops with their output shapes. XLA:CPU runs
independent ops concurrently even on one core, so an op's time can include another's:
read the kinds, not the last millisecond. The profiler adds its own cost.

    python experiments/op_profile.py            # gpt.BENCH, prints markdown
    python experiments/op_profile.py --smoke    # tiny model, for the tests
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import bench_step  # noqa: E402  (before jax: pins the process, sets the heap and XLA_FLAGS)
import jax  # noqa: E402

from lora_jax.models import gpt  # noqa: E402

# Trace events that are not single compiled ops: the runtime's own spans, and while loops
# (their body's ops are counted one by one).
RUNTIME = re.compile(
    r"^(ThunkExecutor|\$|Pjit|Common|end:|Allocate|Handle|Parse|Python|Wait|Thread|while)"
)


def op_kind(name: str) -> str:
    """``ynn_fusion.12`` -> ``ynn_fusion``."""
    return re.sub(r"[.\d]+$", "", name)


def output_shapes(hlo: str) -> dict[str, str]:
    """Instruction name -> its output type (``f32[512,8]{1,0}``) in compiled HLO text."""
    found = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+\]\S*)", hlo, re.MULTILINE)
    return dict(reversed(found))  # the first definition of a name wins


def profile(run, steps: int, folder: str) -> dict[str, float]:
    """Seconds per step of every compiled op over ``steps`` calls of ``run``."""
    jax.profiler.start_trace(folder)
    for _ in range(steps):
        jax.block_until_ready(run())
    jax.profiler.stop_trace()
    trace = sorted(pathlib.Path(folder).rglob("*.trace.json.gz"))[-1]
    per_op = collections.Counter()
    for event in json.load(gzip.open(trace))["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") == "X" and not RUNTIME.match(name):
            per_op[name] += event["dur"] * 1e-6 / steps
    return per_op


def report(name: str, per_op: dict[str, float], shapes: dict[str, str], top: int) -> list[str]:
    kinds = collections.Counter()
    for op, s in per_op.items():
        kinds[op_kind(op)] += s
    total = sum(per_op.values())
    lines = [f"### {name}: compiled ops {1e3 * total:.1f} ms per step", "", "| op kind | ms |"]
    lines += ["|---|---:|"] + [f"| {k} | {1e3 * s:.2f} |" for k, s in kinds.most_common(12)]
    lines += ["", "| op | output | ms |", "|---|---|---:|"]
    for op, s in per_op.most_common(top):
        lines.append(f"| {op} | `{shapes.get(op, '?')}` | {1e3 * s:.2f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps")
    ap.add_argument("--top", type=int, default=12, help="slowest ops listed per configuration")
    args = ap.parse_args()
    cfg, batch, seq, rank = (bench_step.SMOKE, 2, 8, 2) if args.smoke else (gpt.BENCH, 4, 128, 8)
    lines = []
    for name in ("floor", "factored"):
        steps, states, _ = bench_step.build(cfg, batch, seq, rank, only=name)
        compiled = steps[name].lower(*states[name]).compile()
        state = states[name]

        def run(compiled=compiled, state=state):
            train, opt_state, loss = compiled(*state)
            state[:2] = [train, opt_state]
            return loss

        for _ in range(3):  # warm caches and the heap
            jax.block_until_ready(run())
        with tempfile.TemporaryDirectory() as folder:
            per_op = profile(run, 2 if args.smoke else 5, folder)
        lines += report(name, per_op, output_shapes(compiled.as_text()), args.top)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
