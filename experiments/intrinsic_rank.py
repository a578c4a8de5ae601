"""Is the fine-tuning update low-rank? Spectrum of dW = W_ft - W0 and its overlap with LoRA's.

Claims checked (Hu et al., 2021, section 7): the weight change of adaptation has a low
"intrinsic rank", and a rank-8 LoRA update lies in the directions that matter. On the
flagship task (``rank_sweep.py``'s MiniLM + Rotten Tomatoes, same recipe):

1. Fine-tune the query/value kernels fully (plus the head; everything else frozen), take
   dW = W_ft - W0 of each of the 12 query/value matrices and its singular values; report the
   share of ||dW||_F^2 held by the top 8 directions (a random Gaussian matrix of the same
   shape is the baseline).
2. Train LoRA r = 8 on the same kernels; compare the top-i left (input-side) singular
   directions of its dW with the top-j ones of the full dW by the paper's subspace
   similarity phi(A, B, i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j) in [0, 1]
   (random subspaces of a d-dim space give about max(i, j) / d).

    python experiments/intrinsic_rank.py           # RESULTS.md + intrinsic_rank.png
    python experiments/intrinsic_rank.py --smoke   # tiny random encoder, a few steps, prints
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import lora_jax as lj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rank_sweep  # noqa: E402

TOP = 8  # the LoRA rank, and the number of directions whose energy is reported


def kernels(tree: dict) -> dict[str, np.ndarray]:
    """``"layer_i/query"`` -> the (in, out) kernel, float64, of every query/value matrix."""
    out = {}
    for name, layer in tree["encoder"].items():
        for kind in ("query", "value"):
            out[f"{name}/{kind}"] = np.asarray(layer["attention"][kind]["kernel"], np.float64)
    return out


def spectrum(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors ``(in, n)`` and singular values ``(n,)`` (descending) of ``delta``."""
    u, s, _ = np.linalg.svd(delta, full_matrices=False)
    return u, s


def energy_fraction(s: np.ndarray, k: int = TOP) -> float:
    """Share of ||dW||_F^2 = sum(s^2) held by the top ``k`` singular directions."""
    e = np.square(s)
    return float(e[:k].sum() / e.sum())


def subspace_similarity(u_a: np.ndarray, u_b: np.ndarray, i: int, j: int) -> float:
    """phi(A, B, i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j) (Hu et al., eq. 4)."""
    return float(np.square(u_a[:, :i].T @ u_b[:, :j]).sum() / min(i, j))


def random_baseline(shape: tuple[int, int], k: int = TOP, seed: int = 0) -> float:
    """Top-``k`` energy share of a Gaussian matrix of ``shape``."""
    return energy_fraction(spectrum(np.random.default_rng(seed).normal(size=shape))[1], k)


def run(task: rank_sweep.Task, steps: int, batch_size: int = 32, body_lr: float = 1e-4) -> dict:
    """Train both ways; per matrix: spectra, top-8 energy, and phi(LoRA, full, i, j), i, j <= 8.

    ``body_lr`` is the peak learning rate of the fully trained query/value kernels (the head
    and the LoRA factors use the recipe's 2e-3).
    """
    w0 = kernels(task.params)
    full_rules = [lj.LoraRule(rank_sweep.QV, full=True), rank_sweep.HEAD]
    full = rank_sweep.finetune(task, full_rules, steps=steps, batch_size=batch_size,
                               body_lr=body_lr)  # fmt: skip
    lora = rank_sweep.finetune(task, rank_sweep.lora_rules(TOP), steps=steps, batch_size=batch_size)
    w_full, w_lora = kernels(full["merged"]), kernels(lora["merged"])
    out = {"full_accuracy": full["accuracy"], "lora_accuracy": lora["accuracy"], "matrices": {}}
    for name, w in w0.items():
        u_f, s_f = spectrum(w_full[name] - w)
        u_l, s_l = spectrum(w_lora[name] - w)
        phi = np.array(
            [[subspace_similarity(u_l, u_f, i, j) for j in range(1, TOP + 1)]
             for i in range(1, TOP + 1)]
        )  # fmt: skip
        out["matrices"][name] = {
            "s_full": s_f,
            "s_lora": s_l,
            "energy_full": energy_fraction(s_f),
            "energy_lora": energy_fraction(s_l),
            "phi": phi,
        }
    out["random_energy"] = random_baseline(next(iter(w0.values())).shape)
    out["dim"] = next(iter(w0.values())).shape[0]
    return out


def plot(result: dict, path: str | None = None):
    """Cumulative energy of each full-fine-tuning dW spectrum, and mean phi(8, j) vs j."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for name, m in result["matrices"].items():
        e = np.cumsum(np.square(m["s_full"])) / np.square(m["s_full"]).sum()
        color = "C0" if name.endswith("query") else "C1"
        ax1.plot(np.arange(1, len(e) + 1), e, color=color, alpha=0.6, lw=1)
    n = len(next(iter(result["matrices"].values()))["s_full"])
    rnd = np.square(spectrum(np.random.default_rng(0).normal(size=(n, n)))[1])
    ax1.plot(np.arange(1, n + 1), np.cumsum(rnd) / rnd.sum(), "k--", lw=1, label="random")
    ax1.plot([], [], color="C0", label="query dW")
    ax1.plot([], [], color="C1", label="value dW")
    ax1.axvline(TOP, color="gray", lw=0.5)
    ax1.set_xscale("log")
    ax1.set_xlabel("top-k singular directions")
    ax1.set_ylabel("share of ||dW||_F^2")
    ax1.set_title("full fine-tuning update", fontsize=9)
    ax1.legend(fontsize=7)
    j = np.arange(1, TOP + 1)
    phis = np.stack([m["phi"][TOP - 1] for m in result["matrices"].values()])
    ax2.plot(j, phis.mean(0), "o-", label="LoRA r=8 vs full dW (mean of 12)")
    ax2.fill_between(j, phis.min(0), phis.max(0), alpha=0.2)
    ax2.plot(j, j * 0 + TOP / result["dim"], "k--", lw=1, label="random subspaces")
    ax2.set_xlabel("j (top-j directions of full dW)")
    ax2.set_ylabel("phi(LoRA, full, 8, j)")
    ax2.set_ylim(0, 1)
    ax2.set_title("subspace similarity", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
        plt.close(fig)
    return fig


def report(result: dict, steps: int, batch_size: int) -> str:
    lines = [
        "| matrix | top-8 share, full dW | top-8 share, LoRA dW | phi(8, 8) | phi(1, 1) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in result["matrices"].items():
        lines.append(
            f"| {name} | {m['energy_full']:.3f} | {m['energy_lora']:.3f} "
            f"| {m['phi'][-1, -1]:.3f} | {m['phi'][0, 0]:.3f} |"
        )
    ms = result["matrices"].values()
    mean = lambda f: float(np.mean([f(m) for m in ms]))
    d = result["dim"]
    return "\n".join(lines) + (
        f"\n\nMean over the {len(result['matrices'])} matrices: top-8 share of the full "
        f"fine-tuning dW {mean(lambda m: m['energy_full']):.3f} (a {d}x{d} Gaussian matrix: "
        f"{result['random_energy']:.3f}); phi(8, 8) {mean(lambda m: m['phi'][-1, -1]):.3f} and "
        f"phi(1, 1) {mean(lambda m: m['phi'][0, 0]):.3f} (random subspaces: about "
        f"{TOP / d:.3f} and {1 / d:.4f}). Held-out accuracy: full query/value fine-tuning "
        f"{result['full_accuracy']:.3f}, LoRA r = 8 {result['lora_accuracy']:.3f}. {steps} "
        f"steps each, batch {batch_size}, one-cycle AdamW; query/value kernels at peak 1e-4 "
        "when fully trained, LoRA factors and head at 2e-3. A LoRA dW has rank <= 8, so its "
        "top-8 share is 1 by construction.\n\n![spectra](intrinsic_rank.png)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random encoder, few steps")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 100)")
    args = ap.parse_args()
    steps = args.steps or (3 if args.smoke else 100)
    t0 = time.perf_counter()
    task = rank_sweep.load_task(args.smoke, n_test=64 if args.smoke else 1000)
    batch_size = 8 if args.smoke else 32
    result = run(task, steps, batch_size=batch_size)
    body = (
        report(result, steps, batch_size)
        + f"\n\nWall time {(time.perf_counter() - t0) / 60:.1f} min."
    )
    print(body)
    if not args.smoke:
        from _results import write_section

        here = os.path.dirname(os.path.abspath(__file__))
        plot(result, os.path.join(here, "intrinsic_rank.png"))
        cmd = "python experiments/intrinsic_rank.py" + (
            f" --steps {args.steps}" if args.steps else ""
        )
        write_section("Intrinsic rank (experiments/intrinsic_rank.py)", cmd, body)


if __name__ == "__main__":
    main()
