"""Shared first products: one ``x . [a_q | a_k | a_v]`` against three ``x . a``, one core.

A Llama-shaped causal-LM LoRA step (SmolLM2-135M's widths: hidden 576, MLP 1536, 9 heads,
3 KV heads, vocab 49152; ``--layers`` of them, random float32 weights), r=16 on q, k, v, o,
gate, up and down, batch 4 x 128, AdamW. Three jitted steps in one process pinned to one
core, stepped in turn:

  shared     the engine as shipped: q, k, v (and gate, up) share one first product
  separate   the same engine with the sharing switched off (each use its own x . a)
  floor      no LoRA: only the layers' input RMSNorm scales train (forward + activation
             gradients through every layer, no weight gradients)

    python experiments/shared_input.py             # 6 layers, 7 repeats, writes RESULTS.md
    python experiments/shared_input.py --smoke     # 2 tiny layers, prints only
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # noqa: E402

_timing.pin_one_core()  # before jax starts its threads
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import unittest.mock  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _results import write_section  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax._src.engine import siblings  # noqa: E402
from lora_jax.models import llama  # noqa: E402

TARGETS = r"layers/(attention|mlp)/\w+/kernel"  # q, k, v, o, gate, up, down


def _config(smoke: bool, layers: int, vocab: int) -> llama.LlamaConfig:
    if smoke:
        return llama.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
    return llama.LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3,
    )  # fmt: skip


def _stepper(loss_fn, train, fixed, share: bool):
    """A zero-argument closure running one AdamW step; traced with sharing on or off."""
    opt = optax.adamw(1e-3)

    def step(train, opt_state, fixed):
        loss, grads = jax.value_and_grad(loss_fn)(train, fixed)
        updates, opt_state = opt.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    state = [train, opt.init(train)]
    off = unittest.mock.patch.object(siblings, "later_uses", lambda *a, **k: [])
    with unittest.mock.patch.object(siblings, "later_uses", siblings.later_uses) if share else off:
        lowered = jax.jit(step).lower(state[0], state[1], fixed)
    compiled = lowered.compile()
    dots = compiled.as_text().count(" dot(")

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], fixed)
        return loss

    return run, dots


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=49152, help="smaller: the head weighs less")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    cfg = _config(args.smoke, args.layers, args.vocab)
    repeats = args.repeats or (2 if args.smoke else 7)
    params = llama.init(jax.random.key(0), cfg, jnp.float32)
    seq = 16 if args.smoke else 128
    tokens = jax.random.randint(jax.random.key(1), (4, seq + 1), 0, cfg.vocab_size)
    rules = [lj.LoraRule(TARGETS, rank=16, alpha=32.0, stack_axes=(0,))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(2))
    trainable = jax.tree.map(  # non-zero b: the low-rank terms carry real values
        lambda t: (
            t.with_factors(t.a, 0.01 * jnp.ones_like(t.b)) if isinstance(t, lj.LoraFactors) else t
        ),
        trainable,
        is_leaf=lambda t: isinstance(t, lj.LoraFactors),
    )

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def lora_loss(train, fixed):
        return ce(lj.lora_apply(llama.forward)(fixed, train, cfg, tokens[:, :-1]))

    def floor_loss(scale, fixed):
        layers = dict(fixed["layers"], input_layernorm={"scale": scale})
        return ce(llama.forward(dict(fixed, layers=layers), cfg, tokens[:, :-1]))

    shared, dots_shared = _stepper(lora_loss, trainable, frozen, share=True)
    separate, dots_separate = _stepper(lora_loss, trainable, frozen, share=False)
    floor, dots_floor = _stepper(
        floor_loss, params["layers"]["input_layernorm"]["scale"], params, share=True
    )
    steps = {"shared": shared, "separate": separate, "floor": floor}
    stats = _timing.interleaved(steps, repeats=repeats, steps=1 if args.smoke else 2)
    loss_shared, loss_separate = float(shared()), float(separate())
    ratio = stats["shared"].median_cpu / stats["separate"].median_cpu
    lines = [
        f"Llama-shaped step, {cfg.num_hidden_layers} layers (hidden {cfg.hidden_size}, MLP "
        f"{cfg.intermediate_size}, vocab {cfg.vocab_size}), batch 4 x {seq}, r=16 on all "
        f"seven projections, AdamW, float32; {repeats} interleaved repeats, one core.",
        "",
        *_timing.table(stats),
        "",
        f"- shared / separate, process CPU per step: **{ratio:.3f}x**; "
        f"shared / floor {stats['shared'].median_cpu / stats['floor'].median_cpu:.3f}x, "
        f"separate / floor {stats['separate'].median_cpu / stats['floor'].median_cpu:.3f}x",
        f"- dot ops in the compiled step: shared {dots_shared}, separate {dots_separate}, "
        f"floor {dots_floor}",
        f"- loss after the timed steps: shared {loss_shared:.6f}, separate {loss_separate:.6f} "
        "(same start, same data; they differ only by rounding)",
        f"- {_timing.contention()}",
    ]
    print("\n".join(lines))
    if not args.smoke:
        write_section(
            "Shared first products (experiments/shared_input.py)",
            f"python experiments/shared_input.py --layers {args.layers} --vocab {args.vocab}",
            "\n".join(lines),
        )


if __name__ == "__main__":
    main()
