"""Memory of fine-tuning LLaMA-shaped models: full bf16, LoRA on a bf16 base, QLoRA on NF4.

Every tree is abstract (``jax.eval_shape``): nothing is allocated, the byte counts are exact
from shapes and dtypes (``lj.memory_report``). LoRA/QLoRA use r = 64, alpha = 16 on every
linear layer of the blocks (q, k, v, o, gate, up, down), as in the QLoRA paper; QLoRA
stores those kernels as NF4 with double quantisation (block 64), embeddings, norms and the
LM head stay bf16. Also times NF4 quantisation of one 4096 x 4096 matrix.

    python experiments/qlora_memory.py            # writes its section of experiments/RESULTS.md
    python experiments/qlora_memory.py --smoke    # tiny shapes, prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _results import RESULTS, write_section  # noqa: E402
from _timing import median_seconds  # noqa: E402

import lora_jax as lj  # noqa: E402

TITLE = "QLoRA memory (experiments/qlora_memory.py)"
GIB = 2**30
BUDGET_GIB = 48  # a 48 GB GPU (A6000 / A40 / L40S: 48 GiB of device memory)


@dataclasses.dataclass(frozen=True)
class Llama:
    name: str
    d: int  # hidden size
    ffn: int  # MLP intermediate size
    layers: int
    heads: int
    vocab: int = 32000


MODELS = [
    Llama("7B", 4096, 11008, 32, 32),
    Llama("13B", 5120, 13824, 40, 40),
    Llama("33B", 6656, 17920, 60, 52),
    Llama("65B", 8192, 22016, 80, 64),
]
SMOKE = [Llama("tiny", 64, 128, 2, 4, vocab=256), Llama("small", 128, 256, 3, 4, vocab=512)]
LINEAR = r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
RULES = [lj.LoraRule(LINEAR, rank=64, alpha=16, stack_axes=(0,))]


def init_params(m: Llama) -> dict:
    """A LLaMA parameter tree in bf16; layers stacked on a leading axis (scan layout)."""
    L, d, f, bf16 = m.layers, m.d, m.ffn, jnp.bfloat16
    zeros = lambda *s: jnp.zeros(s, bf16)
    return {
        "embed": {"embedding": zeros(m.vocab, d)},
        "layers": {
            "attn": {k: {"kernel": zeros(L, d, d)} for k in ("q", "k", "v", "o")},
            "mlp": {
                "gate": {"kernel": zeros(L, d, f)},
                "up": {"kernel": zeros(L, d, f)},
                "down": {"kernel": zeros(L, f, d)},
            },
            "attn_norm": {"scale": zeros(L, d)},
            "mlp_norm": {"scale": zeros(L, d)},
        },
        "norm": {"scale": zeros(d)},
        "lm_head": {"kernel": zeros(d, m.vocab)},
    }


def adam_state(trainable):
    """Adam moments in float32 whatever the parameter dtype (optax follows the params)."""
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
    return jax.eval_shape(optax.adam(1e-4).init, f32)


def activation_bytes(m: Llama, batch: int, seq: int, nf4: bool) -> int:
    """Estimate with activation checkpointing at every block boundary, bf16 activations.

    Kept: one (batch, seq, d) input per layer; live while one block is recomputed and
    differentiated: s*b*d*(34 + 5*heads*s/d) bytes (Korthikanti et al., 2022, 16-bit);
    float32 logits and their gradient: 2 * 4*b*s*vocab; with an NF4 base, one dequantised
    bf16 weight (the largest, d x ffn) for the matmul being computed.
    """
    b, s, d = batch, seq, m.d
    kept = m.layers * b * s * d * 2
    block = s * b * d * (34 + 5 * m.heads * s / d)
    logits = 2 * 4 * b * s * m.vocab
    return int(kept + block + logits + (2 * d * m.ffn if nf4 else 0))


def reports(m: Llama) -> dict[str, lj.MemoryReport]:
    params = jax.eval_shape(lambda: init_params(m))
    none = jax.tree.map(lambda x: None, params)
    full = lj.memory_report(none, params, optimizer_state=adam_state(params))
    frozen, trainable = jax.eval_shape(lambda p: lj.split(p, RULES, key=jax.random.key(0)), params)
    opt = adam_state(trainable)
    lora = lj.memory_report(frozen, trainable, optimizer_state=opt)
    frozen_q = jax.eval_shape(lambda f: lj.quantize(f, RULES), frozen)
    qlora = lj.memory_report(frozen_q, trainable, optimizer_state=opt)
    return {"full bf16 fine-tuning": full, "LoRA, bf16 base": lora, "QLoRA, NF4 base": qlora}


def memory_table(models, batch: int, seq: int, unit: int) -> tuple[str, dict]:
    lines = [
        "| model | method | frozen base | trainable params | trainable + grads + Adam | "
        "state total | + activations | fits 48 GiB |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    totals = {}
    for m in models:
        for method, r in reports(m).items():
            act = activation_bytes(m, batch, seq, nf4="NF4" in method)
            rest = r.trainable_bytes + r.gradient_bytes + r.optimizer_bytes
            total = r.total_bytes + act
            totals[(m.name, method)] = total
            fits = "yes" if total <= BUDGET_GIB * GIB else "no"
            lines.append(
                f"| {m.name} | {method} | {r.frozen_bytes / unit:.2f} | "
                f"{r.trainable_params / 1e6:,.1f} M | {rest / unit:.2f} | "
                f"{r.total_bytes / unit:.2f} | {total / unit:.2f} | {fits} |"
            )
    return "\n".join(lines), totals


def throughput(n: int, repeats: int) -> str:
    """Median wall time of jitted NF4 quantisation and dequantisation of an n x n bf16 matrix."""
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    quant = jax.jit(lj.quantize_nf4)
    deq = jax.jit(lambda q: q.dequantize())

    tq = median_seconds(quant, w, repeats=repeats)
    td = median_seconds(deq, quant(w), repeats=repeats)
    device = jax.devices()[0].device_kind
    if jax.devices()[0].platform == "cpu":
        device = f"CPU ({os.cpu_count()} cores, shared)"
    weights = n * n / 1e6
    return (
        f"NF4 throughput, {n} x {n} bf16 matrix on {device} (jit, median of {repeats} runs): "
        f"quantise (double quant) {tq * 1e3:.1f} ms = {weights / tq:.0f} M weights/s; "
        f"dequantise to bf16 {td * 1e3:.1f} ms = {weights / td:.0f} M weights/s."
    )


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; print, write nothing")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="RESULTS.md to update")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args(argv)
    models = SMOKE if args.smoke else MODELS
    unit, unit_name = (2**20, "MiB") if args.smoke else (GIB, "GiB")
    table, totals = memory_table(models, args.batch, args.seq, unit)
    n, repeats = (256, 3) if args.smoke else (4096, 7)
    big = models[-1].name
    q65 = totals[(big, "QLoRA, NF4 base")] / GIB
    f65 = totals[(big, "full bf16 fine-tuning")] / GIB
    verdict = "fits" if q65 <= BUDGET_GIB else "does not fit"
    body = f"""{table}

Sizes in {unit_name}, exact from shapes and dtypes (`lj.memory_report` on `jax.eval_shape` trees;
nothing allocated). LLaMA shapes (untied LM head), layers stacked. Full
fine-tuning: bf16 weights and gradients, float32 Adam moments (12 bytes/parameter; an fp32
master copy would add 4). LoRA and QLoRA: r = 64, alpha = 16 on q, k, v, o, gate, up, down
of every layer (QLoRA paper); float32 factors, float32 gradients and Adam moments.
QLoRA base: those kernels in NF4 with double quantisation (4.127 bits/weight), embeddings,
norms and LM head bf16. Activations: batch {args.batch} x {args.seq} tokens, checkpointing at
every block boundary, bf16 activations, float32 logits (see `activation_bytes`).

**{big} QLoRA {verdict} in {BUDGET_GIB} GiB: {q65:.2f} GiB** including activations
(full bf16 fine-tuning would need {f65:.2f} GiB); allocator and XLA workspace must fit in
the remaining {BUDGET_GIB - q65:.2f} GiB. Larger batches or sequences add
activation memory roughly linearly; paged optimisers (as in the QLoRA paper) are not modelled.

{throughput(n, repeats)}
"""
    print(body)
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if out is not None:
        cmd = "python experiments/qlora_memory.py" + (" --smoke" if args.smoke else "")
        write_section(TITLE, cmd, body, out)
    return body


if __name__ == "__main__":
    main()
