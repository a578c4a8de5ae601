"""Training steps per second of the demo's LoRA step against PyTorch + PEFT, one thread each.

Same workload on both sides: all-MiniLM-L6-v2, LoRA r=8 alpha 16 on query and value plus a
trained 2-way head on the mean-pooled output, a batch of 32 real sentences padded to 64
tokens, AdamW, no dropout. The two steps run in turn inside one process (so they see the
same machine load); each repeat times a block of steps and the medians are compared.

    python experiments/peft_speed.py            # writes RESULTS.md
    python experiments/peft_speed.py --smoke    # tiny, for the tests
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import data  # noqa: E402
from _results import write_section  # noqa: E402
from demo import make_step  # noqa: E402

import lora_jax as lj  # noqa: E402
from lora_jax.models import bert  # noqa: E402

TITLE = "Demo speed vs PEFT (experiments/peft_speed.py)"


def batch(size: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``size`` held-out sentences padded to exactly ``length`` tokens, with their labels."""
    split = data.rotten_tomatoes(seed=0, n_test=size)
    ids = data.encode(data.tokenizer(length), split.test_texts)
    input_ids, mask = data.pad(ids, buckets=(length,))
    return input_ids, mask, split.test_labels


def jax_stepper(rank: int, lr: float, input_ids, mask, labels):
    """A closure running one jitted lora_jax step (the demo's) and blocking on it."""
    params, cfg = bert.load(data.model_dir())
    params = {**params, **bert.init_classifier(jax.random.key(1), cfg, 2)}
    rules = [
        lj.LoraRule(r".*/(query|value)/kernel", rank=rank, alpha=2.0 * rank, init="kaiming"),
        lj.LoraRule(r"classifier/.*", full=True),
    ]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    opt = optax.adamw(lr, weight_decay=0.01)
    step = make_step(cfg, opt)
    state = [trainable, opt.init(trainable)]

    def run():
        state[0], state[1], loss, _ = step(state[0], state[1], frozen, input_ids, mask, labels)
        return float(loss)

    return run


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


def measure(steppers: dict, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each stepper, one block of ``steps`` per repeat, in turn."""
    for run in steppers.values():  # compile / warm up
        run()
        run()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(repeats):
        for name, run in steppers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny batch, one short repeat")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    size, length, repeats, steps = (4, 16, 2, 1) if args.smoke else (32, 64, 7, 5)
    rank, lr = 8, 2e-4
    input_ids, mask, labels = batch(size, length)
    steppers = {
        "lora_jax": jax_stepper(rank, lr, input_ids, mask, labels),
        "PyTorch + PEFT": torch_stepper(rank, lr, input_ids, mask, labels),
    }
    times = measure(steppers, repeats, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["PyTorch + PEFT"] / med["lora_jax"]
    lines = [
        "| | s/step (median) | steps/s | min..max s/step |",
        "|---|---:|---:|---:|",
        *(
            f"| {k} | {med[k]:.3f} | {1 / med[k]:.2f} | {min(v):.3f}..{max(v):.3f} |"
            for k, v in times.items()
        ),
        "",
        f"lora_jax steps/s over PyTorch + PEFT steps/s: **{ratio:.2f}x**",
        f"Workload: all-MiniLM-L6-v2, LoRA r={rank} alpha {2 * rank} on query/value + 2-way head "
        f"on the mean-pooled output, batch {size} x {length} tokens, AdamW, no dropout; one "
        f"thread each (torch.set_num_threads(1), XLA_FLAGS={os.environ['XLA_FLAGS']!r}); "
        f"{repeats} repeats of {steps} steps, stepped in turn in one process; "
        f"torch {torch.__version__}.",
    ]
    print("\n".join(lines))
    if not args.smoke:
        write_section(TITLE, "python experiments/peft_speed.py", "\n".join(lines))
    return {"median": med, "ratio": ratio}


if __name__ == "__main__":
    main()
