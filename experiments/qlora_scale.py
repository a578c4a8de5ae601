"""QLoRA at the largest scale this machine holds: a Llama-shaped bf16 checkpoint, NF4 while loading.

Claim checked: a model whose bf16 weights do not fit in memory can still be fine-tuned,
because ``llama.load(..., quantize=rules)`` quantises each tensor as it is read. The
script (1) writes a Llama-shaped checkpoint of random bf16 weights, one safetensors
shard per layer (``--size 13b``: 13.0B parameters, about 26 GB of disk); (2) in a fresh
process, loads it with quantise-while-loading and runs a few LoRA steps (r=16 on every
linear layer, short sequences, ``jax.checkpoint`` per block), recording peak RSS
(``VmHWM``), RSS after loading, the step time and ``lj.memory_report``; (3) deletes
the checkpoint (unless ``--keep``).

    python experiments/qlora_scale.py --size 13b     # RESULTS.md; needs ~12 GiB free RAM
    python experiments/qlora_scale.py --size 0.5b    # the same path at 0.5B parameters
    python experiments/qlora_scale.py --smoke        # tiny shape, seconds, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# Llama shapes: (hidden, intermediate, layers, heads, kv heads, vocab).
SIZES = {
    "13b": (5120, 13824, 40, 40, 40, 32000),  # Llama-2-13B
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "0.5b": (1536, 4096, 16, 12, 4, 32000),
    "tiny": (256, 512, 2, 4, 2, 1000),
}
TARGETS = r"layers/(attention|mlp)/\w+/kernel"
GIB = 2**30


def config_json(size: str) -> dict:
    d, f, n, h, kv, v = SIZES[size]
    return dict(
        model_type="llama", vocab_size=v, hidden_size=d, intermediate_size=f,
        num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=kv,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip


def n_params(cfg: dict) -> int:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return cfg["num_hidden_layers"] * layer + 2 * v * d + d


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 / GIB


def write_checkpoint(folder: str, cfg: dict) -> int:
    """Random bf16 weights (N(0, 0.02)), one shard per layer; returns bytes written."""
    import ml_dtypes
    from safetensors.numpy import save_file

    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0

    def shard(name: str, shapes: dict) -> None:
        nonlocal total
        tensors = {}
        for key, shape in shapes.items():
            if len(shape) == 1:
                tensors[key] = np.ones(shape, ml_dtypes.bfloat16)
            else:
                w = rng.standard_normal(shape, np.float32)
                w *= 0.02
                tensors[key] = w.astype(ml_dtypes.bfloat16)
                del w
        save_file(tensors, os.path.join(folder, name))
        weight_map.update({k: name for k in tensors})
        total += sum(t.nbytes for t in tensors.values())

    shard("embed.safetensors", {"model.embed_tokens.weight": (v, d)})
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shard(
            f"layer-{i:03d}.safetensors",
            {
                f"{p}.input_layernorm.weight": (d,),
                f"{p}.self_attn.q_proj.weight": (d, d),
                f"{p}.self_attn.k_proj.weight": (kv, d),
                f"{p}.self_attn.v_proj.weight": (kv, d),
                f"{p}.self_attn.o_proj.weight": (d, d),
                f"{p}.post_attention_layernorm.weight": (d,),
                f"{p}.mlp.gate_proj.weight": (f, d),
                f"{p}.mlp.up_proj.weight": (f, d),
                f"{p}.mlp.down_proj.weight": (d, f),
            },
        )
    shard("head.safetensors", {"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return total


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This address space's peak RSS (``VmHWM``); ``ru_maxrss`` would include the parent's
    peak, which Linux carries into a child across fork + exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def train(folder: str, steps: int, seq: int) -> dict:
    """Run in a fresh process: load with quantise-while-loading, then a few LoRA steps."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax.models import llama

    rss_start = rss_bytes()
    rules = [lj.LoraRule(TARGETS, rank=16, alpha=32.0, stack_axes=(0,))]
    t0 = time.perf_counter()
    params, config = llama.load(folder, quantize=rules)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    peak_loaded = peak_rss_bytes()
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    del params
    opt = optax.adamw(1e-4)
    state = opt.init(trainable)
    report = lj.memory_report(frozen, trainable, optimizer_state=state)

    def loss_fn(frozen, trainable, tokens):
        def lm(p, tokens):
            logits = llama.forward(p, config, tokens[:, :-1], remat=True)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), tokens[:, 1:]
            ).mean()

        return lj.lora_apply(lm)(frozen, trainable, tokens)

    @jax.jit
    def step(frozen, trainable, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(frozen, trainable, tokens)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    rng = np.random.default_rng(0)
    times, cpu, losses = [], [], []
    for _ in range(steps):
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, seq + 1)), jnp.int32)
        w0, c0 = time.perf_counter(), time.process_time()
        trainable, state, loss = step(frozen, trainable, state, tokens)
        losses.append(float(loss))
        times.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return dict(
        rss_start=rss_start, rss_loaded=rss_loaded, peak_loaded=peak_loaded,
        peak=peak_rss_bytes(),
        load_s=load_s, step_s=times, cpu_s=cpu, losses=losses, report=str(report),
        report_total=report.total_bytes, frozen_bytes=report.frozen_bytes,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="13b")
    ap.add_argument("--smoke", action="store_true", help="--size tiny, 2 steps, prints only")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence (batch 1)")
    ap.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temp dir)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--min-free-gib", type=float, default=8.0, help="abort below this MemAvailable")
    ap.add_argument("--_train", help=argparse.SUPPRESS)  # internal: the fresh training process
    args = ap.parse_args()
    if args._train:
        print(json.dumps(train(args._train, args.steps, args.seq)))
        return
    size = "tiny" if args.smoke else args.size
    steps = 2 if args.smoke else args.steps
    cfg = config_json(size)
    total_params = n_params(cfg)
    free = available_gib()
    print(f"{size}: {total_params / 1e9:.2f}B parameters, {2 * total_params / GIB:.1f} GiB bf16; "
          f"MemAvailable {free:.1f} GiB")  # fmt: skip
    if free < args.min_free_gib:
        sys.exit(f"only {free:.1f} GiB available (< --min-free-gib {args.min_free_gib}); abort.")
    folder = tempfile.mkdtemp(prefix=f"qlora_{size}_", dir=args.dir)
    try:
        t0 = time.perf_counter()
        written = write_checkpoint(folder, cfg)
        write_s = time.perf_counter() - t0
        cmd = [sys.executable, os.path.abspath(__file__), "--_train", folder,
               "--steps", str(steps), "--seq", str(args.seq)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"training process failed ({out.returncode}):\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    step = np.median(r["step_s"][1:]) if steps > 1 else r["step_s"][0]
    cpu = np.median(r["cpu_s"][1:]) if steps > 1 else r["cpu_s"][0]
    body = (
        f"| | |\n|---|---:|\n"
        f"| parameters (Llama shape {size}) | {total_params / 1e9:.2f}B |\n"
        f"| bf16 checkpoint on disk | {written / GIB:.2f} GiB |\n"
        f"| peak RSS, fresh process (load + {steps} steps) | {r['peak'] / GIB:.2f} GiB |\n"
        f"| peak RSS during quantise-while-loading | {r['peak_loaded'] / GIB:.2f} GiB |\n"
        f"| RSS after loading (NF4 base in memory) | {r['rss_loaded'] / GIB:.2f} GiB |\n"
        f"| `lj.memory_report` total (base + factors + grads + Adam) | "
        f"{r['report_total'] / GIB:.2f} GiB |\n"
        f"| load + quantise time | {r['load_s']:.0f} s |\n"
        f"| step time (batch 1 x {args.seq} tokens, median) | {step:.1f} s wall, "
        f"{cpu:.1f} s CPU |\n\n"
        f"LoRA r=16 on q, k, v, o, gate, up, down of every layer, `jax.checkpoint` per "
        f"block, AdamW; losses {', '.join(f'{x:.3f}' for x in r['losses'])}. Process RSS "
        f"at start {r['rss_start'] / GIB:.2f} GiB (Python, JAX). Checkpoint written in "
        f"{write_s:.0f} s and deleted afterwards. The process could use "
        f"{len(os.sched_getaffinity(0))} of the machine's {os.cpu_count()} cores; say what "
        f"else ran beside it when quoting the times.\n\n"
        f"```\n{r['report']}\n```"
    )
    print(body)
    if not args.smoke:
        from _results import write_section

        write_section(
            f"QLoRA at scale, {size} (experiments/qlora_scale.py)",
            f"python experiments/qlora_scale.py --size {size}",
            body,
        )


if __name__ == "__main__":
    main()
