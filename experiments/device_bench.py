"""Accelerator benchmark: a Llama-shaped ~1B bf16 model, lora_jax against PyTorch + PEFT.

Run by experiments/device_bench.sh on a GPU machine (jax with CUDA, torch, peft; no package
registry needed). Measures, on one device, stepped in turn in one process:

  LoRA step      r=16 alpha 32 on q, k, v, o, gate, up, down, bf16 base, float32 factors
  floor          every weight frozen, only the RMSNorm scales train (forward + activation
                 gradients through every layer: no LoRA step can be faster)
  full           every weight trained (bf16 weights, AdamW)
  QLoRA step     the LoRA step on an NF4 base (lj.quantize, double quantisation)
  PEFT LoRA      PyTorch + PEFT, same shapes, bf16 base, same LoRA targets
and the NF4 dequantisation throughput of one 8192 x 8192 matrix against the memory
roofline (bytes read + written over the device's peak bandwidth, --bandwidth-gbs).

    bash experiments/device_bench.sh                 # on the GPU machine
    bash experiments/device_bench.sh --dry-run       # CPU, tiny shapes, end to end
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import argparse  # noqa: E402
import datetime  # noqa: E402

import _timing  # noqa: E402

# TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 query / 4 kv heads, ffn 5632.
ONE_B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
)
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = r"layers/(attention/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def jax_steps(shape: dict, tokens, rank: int) -> tuple[dict, int]:
    """Closures for the lora_jax LoRA, floor, full and QLoRA steps, and the parameter count."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from lora_jax.models import llama

    config = llama.LlamaConfig(**shape)
    params = llama.init(jax.random.key(0), config, jnp.bfloat16)
    tokens = jnp.asarray(tokens, jnp.int32)
    opt = optax.adamw(1e-4)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    def make(loss_fn):
        def step(train, state, fixed):
            loss, grads = jax.value_and_grad(loss_fn)(train, fixed)
            updates, state = opt.update(grads, state, train)
            return optax.apply_updates(train, updates), state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    def lora_loss(train, fixed):
        return ce(lj.lora_apply(llama.forward)(fixed, train, config, tokens[:, :-1]))

    def floor_loss(scales, fixed):
        layers = {**fixed["layers"], **scales}
        return ce(llama.forward({**fixed, "layers": layers}, config, tokens[:, :-1]))

    def full_loss(p, _):
        return ce(llama.forward(p, config, tokens[:, :-1]))

    rules = [lj.LoraRule(TARGETS, rank=rank, alpha=2.0 * rank, stack_axes=(0,))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(1))
    norms = {k: params["layers"][k] for k in ("input_layernorm", "post_attention_layernorm")}
    configs = {
        "lora_jax LoRA": (lora_loss, trainable, frozen),
        "lora_jax floor": (floor_loss, jax.tree.map(jnp.copy, norms), params),
        "lora_jax full fine-tuning": (full_loss, jax.tree.map(jnp.copy, params), None),
        "lora_jax QLoRA (NF4 base)": (lora_loss, trainable, lj.quantize(frozen, rules)),
    }
    fns = {}
    for name, (loss_fn, train, fixed) in configs.items():
        step = make(loss_fn)
        state = [jax.tree.map(jnp.copy, train), opt.init(train)]

        def run(step=step, state=state, fixed=fixed):
            state[0], state[1], loss = step(state[0], state[1], fixed)
            return loss

        fns[name] = run
    return fns, lj.count_params(params)


def torch_step(shape: dict, tokens, rank: int, device: str):
    """A closure for one PyTorch + PEFT LoRA step of the same shape (bf16 base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device=device, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LINEAR))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # float32 factors, as lora_jax keeps them
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device)

    def run():
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises

    return run


def nf4_roofline(n: int, bandwidth_gbs: float, repeats: int) -> str:
    """NF4 -> bf16 dequantisation of an n x n matrix: time and fraction of the memory roofline."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lj

    q = lj.quantize_nf4(jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16))
    deq = jax.jit(lambda q: q.dequantize())
    seconds = _timing.interleaved({"deq": lambda: deq(q)}, repeats)["deq"].median_wall
    read = sum(x.nbytes for x in jax.tree.leaves(q))
    moved = read + 2 * n * n  # read the codes and scales, write bf16
    ideal = moved / (bandwidth_gbs * 1e9)
    return (
        f"NF4 dequantisation of a {n} x {n} matrix: {1e3 * seconds:.3f} ms, "
        f"{moved / seconds / 1e9:.0f} GB/s moved ({read / n / n:.3f} B/weight read + 2 written); "
        f"memory roofline at {bandwidth_gbs:.0f} GB/s: {1e3 * ideal:.3f} ms "
        f"(**{ideal / seconds:.0%} of the roofline**)."
    )


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, end to end")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="peak (H200: 4800)")
    ap.add_argument("--out", type=pathlib.Path, help="also write the report here")
    args = ap.parse_args(argv)
    if args.dry_run:
        _timing.pin_one_core()
        os.environ["JAX_PLATFORMS"] = "cpu"
        shape, args.batch, args.seq, args.repeats, nf4_n = TINY, 2, 16, 2, 256
    else:
        shape, nf4_n = ONE_B, 8192
    import jax
    import numpy as np

    device = "cpu" if args.dry_run else "cuda"
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], (args.batch, args.seq + 1))
    fns, n_params = jax_steps(shape, tokens, args.rank)
    try:
        fns["PyTorch + PEFT LoRA"] = torch_step(shape, tokens, args.rank, device)
        torch_note = ""
    except Exception as e:  # noqa: BLE001 - reported, never silently
        torch_note = f"PyTorch + PEFT did not run: {type(e).__name__}: {e}"
    stats = _timing.interleaved(fns, args.repeats, warmup=2)
    lora, floor = stats["lora_jax LoRA"].median_wall, stats["lora_jax floor"].median_wall
    lines = [
        f"# Device benchmark ({datetime.date.today()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__})",
        "",
        f"Llama-shaped model {shape} ({n_params / 1e9:.2f}B parameters, bf16), batch "
        f"{args.batch} x {args.seq} tokens, LoRA r={args.rank} on {', '.join(LINEAR)}, AdamW; "
        f"median of {args.repeats} interleaved rounds after 2 warm-up rounds.",
        "",
        *_timing.table(stats),
        "",
        f"LoRA step / floor: **{lora / floor:.2f}x**; "
        f"full fine-tuning / floor: {stats['lora_jax full fine-tuning'].median_wall / floor:.2f}x; "
        f"QLoRA step / LoRA step: {stats['lora_jax QLoRA (NF4 base)'].median_wall / lora:.2f}x.",
    ]
    if "PyTorch + PEFT LoRA" in stats:
        peft = stats["PyTorch + PEFT LoRA"].median_wall
        lines.append(f"lora_jax LoRA steps/s over PyTorch + PEFT steps/s: **{peft / lora:.2f}x**.")
    else:
        lines.append(torch_note)
    lines += ["", nf4_roofline(nf4_n, args.bandwidth_gbs, args.repeats)]
    if args.dry_run:
        lines.append(
            f"(dry run on CPU at tiny shapes: figures mean nothing; {_timing.contention()})"
        )
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main()
