"""Trace cost of lora_apply: a 32-layer unrolled 7B-shaped Llama grad step, abstractly.

Times ``jax.make_jaxpr`` of ``value_and_grad`` of the loss (no FLOPs, no real 7B arrays:
every parameter is a ``jax.ShapeDtypeStruct``) for the plain model and for
``lora_apply`` (rank 16 on q/k/v/o/gate/up/down), interleaved, and reports the median
ratio, the equation counts of both programs and the engine's Python time per adapted use.

    python experiments/trace_time.py            # 32 layers (7B shapes), 5 repeats
    python experiments/trace_time.py --smoke    # 2 layers, small shapes, 2 repeats
    python experiments/trace_time.py --layers 8 # 7B shapes, fewer layers (quicker)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

import lora_jax as lj
from lora_jax.models import _llama_blocks as blocks
from lora_jax.models import llama

TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def _config(smoke: bool, layers: int) -> llama.LlamaConfig:
    if smoke:
        return llama.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4,
        )  # fmt: skip
    return llama.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32,
    )  # fmt: skip


def _unrolled_params(cfg: llama.LlamaConfig) -> dict:
    """The stacked tree of llama.init unstacked into one dict per layer (abstract)."""
    stacked = jax.eval_shape(lambda k: llama.init(k, cfg, jnp.bfloat16), jax.random.key(0))
    layer = lambda: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), stacked)
    out = {k: v for k, v in stacked.items() if k != "layers"}
    out["layers"] = [layer()["layers"] for _ in range(cfg.num_hidden_layers)]
    return out


def _loss(cfg: llama.LlamaConfig):
    def loss(params, ids):
        b, s = ids.shape
        h = jnp.take(params["embed_tokens"]["embedding"], ids, axis=0).reshape(b * s, -1)
        cos, sin = blocks.rope_tables(cfg, jnp.arange(s))
        visible = jnp.tril(jnp.ones((s, s), bool))[None]
        bias = jnp.broadcast_to(
            jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None], (b, 1, 1, s, s)
        )
        for p in params["layers"]:  # unrolled: one traced copy per layer
            q, k, v = blocks.attention_qkv(h, p, cos, sin, cfg, b)
            h = blocks.layer_output(h, blocks.attend(q, k, v, bias), p, cfg)
        logits = h @ params["lm_head"]["kernel"]
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    return loss


def _count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jcore.jaxprs_in_params(eqn.params):
            n += _count(sub)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=32, help="unrolled layers (7B has 32)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    cfg = _config(args.smoke, args.layers)
    repeats = args.repeats or (2 if args.smoke else 5)
    params = _unrolled_params(cfg)
    rules = [lj.LoraRule(TARGETS, rank=16)]
    frozen, trainable = _abstract_split(params, rules)
    ids = jax.ShapeDtypeStruct((1, 128 if not args.smoke else 16), jnp.int32)
    loss = _loss(cfg)
    plain = jax.value_and_grad(loss)
    lora = jax.value_and_grad(lambda t, f, x: lj.lora_apply(loss)(f, t, x))
    n_uses = 7 * cfg.num_hidden_layers
    times = {"plain": [], "lora": []}
    counts = {}
    for _ in range(repeats):
        for name in ("plain", "lora"):
            t0 = time.process_time()
            # A fresh function each time: make_jaxpr caches traces by function identity.
            if name == "plain":
                closed = jax.make_jaxpr(lambda p, x: plain(p, x))(params, ids)
            else:
                closed = jax.make_jaxpr(lambda t, f, x: lora(t, f, x))(trainable, frozen, ids)
            times[name].append(time.process_time() - t0)
            counts[name] = _count(closed.jaxpr)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} repeats={repeats}")
    print(f"plain trace: {med['plain']:.3f} s CPU, {counts['plain']} equations")
    print(f"lora_apply trace: {med['lora']:.3f} s CPU, {counts['lora']} equations")
    print(f"ratio: {med['lora'] / med['plain']:.2f}x")
    print(f"extra per adapted use: {(med['lora'] - med['plain']) / n_uses * 1e3:.2f} ms")


def _abstract_split(params, rules):
    """Abstract (frozen, trainable) of a 7B tree without allocating it."""
    return jax.eval_shape(
        lambda: lj.split(
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params),
            rules,
            key=jax.random.key(1),
        )
    )


if __name__ == "__main__":
    main()
