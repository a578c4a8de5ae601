"""Bytes all-reduced per data-parallel step: LoRA versus full fine-tuning.

Compiles (does not run) one data-parallel AdamW step of the benchmark transformer on
8 fake CPU devices and sums the result sizes of the all-reduce / reduce-scatter ops in
the optimised HLO. LoRA's gradient traffic for an adapted ``(d, k)`` matrix is
``r (d + k)`` scalars instead of ``d k``.

    python experiments/comm_bytes.py            # benchmark model, writes experiments/RESULTS.md
    python experiments/comm_bytes.py --smoke    # tiny model, prints only
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharded_step as ss  # noqa: E402

import lora_jax as lj  # noqa: E402

BENCH = ss.Config(vocab=8192, d_model=512, n_layers=4, n_heads=8, d_ff=2048, seq=128, rank=8)
SMOKE = ss.Config(vocab=256, d_model=64, n_layers=2, n_heads=4, d_ff=256, seq=16, rank=4)
PER_DEVICE_BATCH = 4
SECTION = "## Communication (experiments/comm_bytes.py)"
MODES = ("full", "lora", "materialized")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1}
_OP = re.compile(r"=\s*(.*?)\s+(all-reduce|reduce-scatter|all-gather|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s8|u8|pred)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, int, tuple[tuple[int, ...], ...]]]:
    """``(op, bytes, shapes)`` of every collective in HLO text (tuple results summed).

    For an all-reduce the result size equals the operand size; for a reduce-scatter
    the result is one shard, so its operand is ``result * group size`` (see
    :func:`reduced_bytes`). ``-done`` halves of async pairs are skipped.
    """
    out = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shapes = [
            tuple(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(m.group(1))
        ]
        dtypes = [dt for dt, _ in _SHAPE.findall(m.group(1))]
        if m.group(3) and len(shapes) > 1:  # async start returns (operands, results)
            shapes, dtypes = shapes[len(shapes) // 2 :], dtypes[len(dtypes) // 2 :]
        nbytes = sum(int(np.prod(s)) * _DTYPE_BYTES.get(dt, 1) for s, dt in zip(shapes, dtypes))
        out.append((m.group(2), nbytes, tuple(shapes)))
    return out


def reduced_bytes(hlo_text: str, n_devices: int) -> int:
    """Bytes of gradient fed into all-reduce / reduce-scatter per device per step."""
    total = 0
    for op, nbytes, _ in collectives(hlo_text):
        if op == "all-reduce":
            total += nbytes
        elif op == "reduce-scatter":
            total += nbytes * n_devices
    return total


def step_hlo(cfg: ss.Config, mode: str) -> str:
    """Optimised HLO of one data-parallel step on all devices (compiled, not run).

    ``mode``: ``"full"`` fine-tuning, ``"lora"`` (factored lora_apply) or
    ``"materialized"`` (lora_apply on ``W0 + scale * a @ b``).
    """
    mesh = ss.make_mesh("data")
    n = mesh.devices.size
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, ss.BATCH_SPEC)
    host = ss.init_params(cfg)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), host)
    tokens = jax.ShapeDtypeStruct((PER_DEVICE_BATCH * n, cfg.seq + 1), np.int32, sharding=batch)
    opt = ss.optimizer(cfg)
    if mode != "full":
        frozen, trainable = jax.eval_shape(
            lambda p: lj.split(p, ss.rules(cfg), key=jax.random.key(0)), params
        )
        frozen, trainable = (
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), t)
            for t in (frozen, trainable)
        )
        opt_state = jax.eval_shape(opt.init, trainable)
        materialize = mode == "materialized"
        step = jax.jit(lambda f, t, o, x: ss.train_step(f, t, o, x, cfg, materialize=materialize))
        lowered = step.lower(frozen, trainable, opt_state, tokens)
    else:

        def full_step(p, o, x):
            loss, grads = jax.value_and_grad(ss.loss_fn)(p, x, cfg)
            with jax.numpy_dtype_promotion("standard"):  # as ss.train_step
                updates, o = opt.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        opt_state = jax.eval_shape(opt.init, params)
        lowered = jax.jit(full_step).lower(params, opt_state, tokens)
    return lowered.compile().as_text()


def expected(cfg: ss.Config) -> dict:
    """Analytic gradient bytes (float32): adapted matrices, full and LoRA, and the rest."""
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    mats = [(d, d)] * 4 + [(d, f), (f, d)]
    adapted_full = 4 * L * sum(a * b for a, b in mats)
    adapted_lora = 4 * L * sum(cfg.rank * (a + b) for a, b in mats)
    total_params = sum(x.size for x in jax.tree.leaves(ss.init_params(cfg)))
    return {
        "adapted_full": adapted_full,
        "adapted_lora": adapted_lora,
        "all_full": 4 * total_params,
    }


def measure(cfg: ss.Config) -> dict:
    n = jax.device_count()
    got = {mode: reduced_bytes(step_hlo(cfg, mode), n) for mode in MODES}
    return {**got, "devices": n, **expected(cfg)}


def table(cfg: ss.Config, m: dict) -> str:
    mib = 2.0**20
    rows = [
        "| | bytes reduced per step | MiB |",
        "|---|---:|---:|",
        f"| full fine-tuning, measured (HLO) | {m['full']:,} | {m['full'] / mib:.2f} |",
        f"| full fine-tuning, all parameters (4 B each) | {m['all_full']:,} | "
        f"{m['all_full'] / mib:.2f} |",
        f"| LoRA, measured (HLO) | {m['lora']:,} | {m['lora'] / mib:.3f} |",
        f"| LoRA with lora_apply(materialize=True), measured | {m['materialized']:,} | "
        f"{m['materialized'] / mib:.2f} |",
        f"| LoRA factors, expected r(d+k) per matrix | {m['adapted_lora']:,} | "
        f"{m['adapted_lora'] / mib:.3f} |",
        f"| adapted matrices under full fine-tuning, dk | {m['adapted_full']:,} | "
        f"{m['adapted_full'] / mib:.2f} |",
    ]
    return "\n".join(rows) + (
        f"\n\nLoRA / full (measured): **{m['lora'] / m['full']:.4f}**; "
        f"measured LoRA / expected r(d+k)/(dk) traffic of the adapted matrices: "
        f"{m['lora'] / m['adapted_lora']:.3f} (expected ratio r(d+k)/(dk) = "
        f"{m['adapted_lora'] / m['adapted_full']:.4f}).\n"
        f"Model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, MLP "
        f"{cfg.d_ff}, vocab {cfg.vocab}, seq {cfg.seq}, batch {PER_DEVICE_BATCH} per device x "
        f"{m['devices']} fake CPU devices, LoRA r={cfg.rank} on q,k,v,o,fc1,fc2; float32 "
        f"gradients, AdamW. Measured bytes include the 4-byte loss. Materialising "
        f"W0 + scale a@b makes XLA all-reduce the dense weight gradient before projecting "
        f"it onto a and b, so it costs as much as full fine-tuning of those matrices.\n"
    )


def write_results(text: str, path: Path) -> None:
    """Replace this script's section of RESULTS.md (create the file if missing)."""
    section = f"{SECTION}\n\nCommand: `python experiments/comm_bytes.py`\n\n{text}"
    old = path.read_text() if path.exists() else "# Results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + section + ("" if nxt < 0 else "\n" + old[nxt + 1 :])
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model; RESULTS.md untouched")
    args = parser.parse_args()
    cfg = SMOKE if args.smoke else BENCH
    text = table(cfg, measure(cfg))
    print(text)
    if not args.smoke:
        write_results(text, Path(__file__).resolve().parent / "RESULTS.md")


if __name__ == "__main__":
    main()
