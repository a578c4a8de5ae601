"""Trainable parameters and adapter size of LoRA on LLaMA-shaped models (nothing allocated).

Claim checked (Hu et al., 2021, sections 4 and 4.2): a rank-r update of a d x k matrix trains
r(d + k) parameters instead of dk, so adapting the attention projections of a multi-billion
parameter model trains > 100x fewer parameters and the adapter fits in < 100 MB.

Every count comes from ``lj.split`` + ``lj.summary`` run under ``jax.eval_shape`` on
``ShapeDtypeStruct`` trees with the LLaMA-7B/13B/65B shapes (Touvron et al., 2023) and a
GPT-3 175B-shaped tree (Brown et al., 2020): no weight is allocated, so the script runs in
seconds.

    python experiments/param_table.py           # writes the table to RESULTS.md
    python experiments/param_table.py --smoke   # 4096x4096 and LLaMA-7B only, prints
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

import lora_jax as lj
from lora_jax.models import llama

LLAMA = {
    "LLaMA-7B": llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "LLaMA-13B": llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "LLaMA-65B": llama.LlamaConfig(
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
    ),
}

_ATT = "layers/attention/{}/kernel"
TARGETS = {
    "q,v": _ATT.format("(q_proj|v_proj)"),
    "q,k,v,o": _ATT.format("(q_proj|k_proj|v_proj|o_proj)"),
    "all linear": r"layers/(attention/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel",
}
MB = 1e6  # bytes; the adapter stores r(d + k) values per adapted matrix


def gpt3_175b() -> dict:
    """Abstract GPT-3 175B weights: 96 layers, d_model 12288, MLP 4d, vocab 50257."""
    n, d = 96, 12288
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    return {
        "embed": {"embedding": sds(50257, d)},
        "layers": {
            "attn": {k: {"kernel": sds(n, d, d)} for k in ("q", "k", "v", "o")},
            "mlp": {"fc1": {"kernel": sds(n, d, 4 * d)}, "fc2": {"kernel": sds(n, 4 * d, d)}},
        },
    }


def abstract_summary(params: dict, pattern: str, rank: int) -> lj.LoraSummary:
    """``lj.summary`` of ``lj.split(params, LoraRule(pattern, rank))`` without allocating."""
    stack = (0,) if pattern.startswith("layers/") else ()
    rule = lj.LoraRule(pattern, rank=rank, stack_axes=stack, param_dtype=jnp.bfloat16)
    split = functools.partial(lj.split, rules=[rule])
    frozen, trainable = jax.eval_shape(lambda p, k: split(p, key=k), params, jax.random.key(0))
    return lj.summary(frozen, trainable)


def single_matrix(d: int = 4096, k: int = 4096, rank: int = 8) -> lj.LoraSummary:
    return abstract_summary({"w": jax.ShapeDtypeStruct((d, k), jnp.bfloat16)}, "w", rank)


def table(smoke: bool) -> tuple[str, list[dict]]:
    """The markdown table and its rows as dicts (model, targets, rank, trainable, total, ...)."""
    models = {
        name: jax.eval_shape(
            functools.partial(llama.init, config=cfg, dtype=jnp.bfloat16), jax.random.key(0)
        )
        for name, cfg in LLAMA.items()
    }
    models["GPT-3 175B"] = gpt3_175b()
    names = ["LLaMA-7B"] if smoke else list(models)
    rows = []
    for name in names:
        targets = TARGETS if name.startswith("LLaMA") else {"q,v": "layers/attn/(q|v)/kernel"}
        ranks = (4, 8, 64) if name.startswith("GPT") else (8, 64)
        for target, pattern in targets.items():
            for rank in ranks:
                s = abstract_summary(models[name], pattern, rank)
                rows.append(
                    dict(
                        model=name,
                        targets=target,
                        rank=rank,
                        trainable=s.trainable_params,
                        total=s.total_params,
                        reduction=s.reduction,
                        mb_bf16=2 * s.trainable_params / MB,
                        mb_fp32=4 * s.trainable_params / MB,
                    )
                )
    lines = [
        "| model | params | LoRA on | r | trainable | reduction | adapter bf16 (MB) | fp32 (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['total'] / 1e9:.2f}B | {r['targets']} | {r['rank']} "
            f"| {r['trainable']:,} | {r['reduction']:,.0f}x | {r['mb_bf16']:.1f} "
            f"| {r['mb_fp32']:.1f} |"
        )
    return "\n".join(lines), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="one model; print only")
    args = ap.parse_args()
    one = single_matrix()
    row = one.rows[0]
    head = (
        f"One 4096 x 4096 matrix, r = 8: {one.trainable_params:,} trainable vs "
        f"{row.base:,} ({row.base / one.trainable_params:.0f}x fewer)."
    )
    body, rows = table(args.smoke)
    qv = [r for r in rows if r["model"] != "GPT-3 175B" and r["targets"] in ("q,v", "q,k,v,o")]
    fewer = sum(r["reduction"] > 100 for r in qv)
    small = [r for r in qv if r["mb_bf16"] < 100]
    verdict = (
        f"Attention-only LoRA (q,v or q,k,v,o; r = 8 and 64) on LLaMA: reduction "
        f"{min(r['reduction'] for r in qv):,.1f}x to {max(r['reduction'] for r in qv):,.0f}x "
        f"(> 100x in {fewer} of {len(qv)} rows); adapter {min(r['mb_bf16'] for r in qv):.1f} to "
        f"{max(r['mb_bf16'] for r in qv):.1f} MB in bf16 (< 100 MB in {len(small)} of {len(qv)} "
        f"rows, all r = 8 rows among them). Both parts of the claim hold together "
        f"for {sum(r['reduction'] > 100 for r in small)} of {len(qv)} rows."
    )
    text = (
        f"{head}\n\n{body}\n\n{verdict}\n\n"
        "Reduction = all parameters of the model / trainable. MB = 10^6 bytes of factors "
        "(2 bytes per value in bf16, 4 in fp32). 'all linear' = q, k, v, o, gate, up, down of "
        "every layer (not the embedding or LM head). Counts from `lj.split` + `lj.summary` "
        "under `jax.eval_shape` on ShapeDtypeStruct trees. GPT-3 175B with r = 4 on q,v is "
        "the paper's setting for its '350 GB to 35 MB' checkpoint claim (section 4.2)."
    )
    print(text)
    if not args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _results import write_section

        write_section(
            "Parameter counts (experiments/param_table.py)",
            "python experiments/param_table.py",
            text,
        )


if __name__ == "__main__":
    main()
