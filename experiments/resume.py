"""Exact resume after SIGKILL: a run killed mid-training (or mid-save) and restarted from its
checkpoint directory ends bit for bit where the uninterrupted run ends.

A tiny MLP classifier with LoRA on both kernels, trained with LoRA+ AdamW on a warm-up
cosine schedule inside ``optax.apply_if_finite`` (so the optimiser state holds a
``multi_transform`` / ``MaskedNode`` tree and a schedule count), a PRNG key that noises every
batch, and a data stream whose position is saved. Layouts: ``single`` (one CPU device),
``sharded`` (8 devices, mesh ``(model=2, data=4)``, adapters sharded on ``model``), and the
``sharded`` layout on 2 processes x 4 devices with ``jax.distributed`` (``--nproc 2``), where
the ``model`` axis spans the processes so no process holds a whole ``b`` factor.

    python experiments/resume.py                      # single and sharded, one kill each
    python experiments/resume.py --nproc 2            # 2 processes, one of them killed
    python experiments/resume.py --worker ...         # one training process (the tests)

Each training process appends ``{"step", "loss"}`` (loss as ``float.hex``) to
``losses_<pid>.jsonl`` and, when it finishes, writes the SHA-256 of every adapter and
optimiser leaf to ``final_<pid>.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax as lj  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    d_in: int = 16
    d_hidden: int = 32
    n_classes: int = 8
    batch: int = 16
    rank: int = 4
    steps: int = 12
    save_every: int = 2
    lr: float = 3e-2
    seed: int = 0


RULES = [lj.LoraRule(r"(fc1|fc2)/kernel", rank=4)]
SPECS = {"fc1": {"kernel": P(None, "model")}, "fc2": {"kernel": P("model", None)}}


def init_params(cfg: Config) -> dict:
    """Host float32 parameters, identical on every process."""
    rng = np.random.default_rng(cfg.seed)
    dims = {"fc1": (cfg.d_in, cfg.d_hidden), "fc2": (cfg.d_hidden, cfg.n_classes)}
    return {
        n: {"kernel": (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)}
        for n, s in dims.items()
    }


class Batches:
    """A deterministic data stream; ``position`` (batches read) is all its state."""

    def __init__(self, cfg: Config, position: int = 0):
        self.cfg, self.position = cfg, position

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, self.position])
        self.position += 1
        x = rng.standard_normal((self.cfg.batch, self.cfg.d_in)).astype(np.float32)
        return x, (np.abs(x).argmax(-1) % self.cfg.n_classes).astype(np.int32)


def optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, 3, cfg.steps)
    adamw = lj.lora_plus(lambda lr: optax.adamw(lr, weight_decay=1e-2), schedule, ratio=4.0)
    return optax.apply_if_finite(adamw, max_consecutive_errors=3)


def loss_fn(params: dict, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    x = x + 0.05 * jax.random.normal(key, x.shape, x.dtype)  # the key matters each step
    h = jax.nn.gelu(x @ params["fc1"]["kernel"])
    logits = h @ params["fc2"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(cfg: Config):
    grad = jax.value_and_grad(lj.lora_apply(loss_fn), argnums=1)

    def step(frozen, trainable, opt_state, x, y, key):
        loss, g = grad(frozen, trainable, x, y, key)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
            updates, opt_state = optimizer(cfg).update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def setup(cfg: Config, layout: str):
    """``(frozen, trainable, opt_state, jitted step, put_batch)`` for ``layout``."""
    host, key = init_params(cfg), jax.random.key(cfg.seed)
    if layout == "single":
        frozen, trainable = lj.split(jax.device_put(host, jax.devices()[0]), RULES, key=key)
        opt_state = optimizer(cfg).init(trainable)
        return frozen, trainable, opt_state, jax.jit(make_step(cfg)), jnp.asarray
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("model", "data"))

    def put(x, spec):
        s = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    params = jax.tree.map(put, host, SPECS)
    frozen, trainable = lj.split_sharded(params, RULES, key=key)
    t_sh = lj.factor_shardings(SPECS, trainable, mesh=mesh)
    rep = NamedSharding(mesh, P())
    # moments take their factor's sharding (propagated through zeros_like), scalars replicated
    compiled = jax.jit(optimizer(cfg).init).lower(trainable).compile()
    o_sh = jax.tree.map(
        lambda s: s if isinstance(s, NamedSharding) else rep, compiled.output_shardings
    )
    opt_state = jax.jit(optimizer(cfg).init, out_shardings=o_sh)(trainable)
    f_sh = jax.tree.map(lambda x: x.sharding, frozen)
    b_sh = NamedSharding(mesh, P("data"))
    step = jax.jit(
        make_step(cfg),
        in_shardings=(f_sh, t_sh, o_sh, b_sh, b_sh, rep),
        out_shardings=(t_sh, o_sh, rep),
    )
    return frozen, trainable, opt_state, step, lambda x: put(x, P("data"))


def train(outdir: str, cfg: Config, layout: str, *, delay: float = 0.0) -> None:
    """Train ``cfg.steps`` steps, resuming from ``<outdir>/ckpt`` if it holds a checkpoint."""
    pid, out = jax.process_index(), Path(outdir)
    frozen, trainable, opt_state, step_fn, put_batch = setup(cfg, layout)
    like, opt_like = trainable, opt_state  # shapes, dtypes and shardings to restore onto
    log = open(out / f"losses_{pid}.jsonl", "a")  # noqa: SIM115
    with lj.checkpoint.AdapterCheckpointManager(out / "ckpt", max_to_keep=2) as mgr:
        if mgr.latest_step() is None:  # a new run
            step, key, data = 0, jax.random.key(cfg.seed + 1), Batches(cfg)
        else:  # resume: adapters, optimiser, step, data position and key
            trainable, opt_state, step, extra = mgr.restore_train_state(
                base=frozen, like=like, opt_like=opt_like
            )
            key, data = extra["key"], Batches(cfg, position=extra["data_position"])
        while step < cfg.steps:
            x, y = next(data)
            key, sub = jax.random.split(key)
            trainable, opt_state, loss = step_fn(
                frozen, trainable, opt_state, put_batch(x), put_batch(y), sub
            )
            step += 1
            log.write(json.dumps({"step": step, "loss": float(loss).hex()}) + "\n")
            log.flush()
            if step % cfg.save_every == 0:
                extra = {"key": key, "data_position": data.position}
                mgr.save(
                    step, trainable, rules=RULES, base=frozen, opt_state=opt_state, extra=extra
                )
            time.sleep(delay)
    digests = {
        "trainable": _digests(trainable),
        "opt_state": _digests(opt_state),
        "opt_treedef": str(jax.tree.structure(opt_state)),
    }
    (out / f"final_{pid}.json").write_text(json.dumps(digests))


def _digests(tree) -> list[str]:
    def one(x):
        x = multihost_utils.process_allgather(x, tiled=True) if not x.is_fully_addressable else x
        return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()

    return [one(x) for x in jax.tree.leaves(tree)]


def kill_inside_save(step: int) -> None:
    """SIGKILL this process once step ``step`` is written but before orbax commits it.

    Test hook on an orbax internal (``AtomicRenameTemporaryPath.finalize`` renames the
    finished temporary directory to ``<step>``): the kill lands in the background save
    thread, after every array file is written and before the rename that makes it a step.
    """
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self._final_path.name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await real(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


# ---- driving the processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    outdir: str,
    layout: str,
    *,
    nproc: int = 1,
    delay: float = 0.0,
    kill_in_save: int | None = None,
    cache: str | None = None,
):
    """Start the training process(es) of one attempt; returns their ``Popen`` objects.

    ``cache``: a JAX persistent compilation cache shared by the attempts (the restarted
    processes load the step's executable instead of compiling it again; same program).
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    port, procs = free_port(), []
    for pid in range(nproc):
        cmd = [sys.executable, __file__, "--worker", str(pid), "--nproc", str(nproc)]
        cmd += ["--port", str(port), "--outdir", outdir, "--layout", layout, "--delay", str(delay)]
        if kill_in_save is not None:
            cmd += ["--kill-in-save", str(kill_in_save)]
        log = open(Path(outdir) / f"log_{pid}.txt", "a")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def steps_logged(outdir: str, pid: int = 0) -> int:
    path = Path(outdir) / f"losses_{pid}.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def finish(procs, timeout: float = 240.0) -> None:
    """Wait for every process; raise with its log if one failed."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for pid, proc in enumerate(procs):
        if proc.returncode != 0:
            log = Path(proc.args[proc.args.index("--outdir") + 1]) / f"log_{pid}.txt"
            raise RuntimeError(f"process {pid} exited with {proc.returncode}:\n{log.read_text()}")


def kill_at_random_step(outdir: str, procs, rng: random.Random, steps: int, victim: int = 0):
    """SIGKILL ``procs[victim]`` once it has logged a random step in [3, steps - 3], then
    the others (as a scheduler restarts a whole job); returns the step it had reached."""
    target = rng.randint(3, steps - 3)
    while steps_logged(outdir, victim) < target:
        if procs[victim].poll() is not None:
            raise RuntimeError(f"process {victim} ended before step {target}")
        time.sleep(0.005)
    procs[victim].send_signal(signal.SIGKILL)
    reached = steps_logged(outdir, victim)
    time.sleep(0.5)  # the survivors run into the dead peer (or not) before the restart
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return reached


def losses(outdir: str, pid: int = 0) -> dict[int, set[str]]:
    """Every loss logged for each step (several when a step was trained twice)."""
    out: dict[int, set[str]] = {}
    for line in (Path(outdir) / f"losses_{pid}.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], set()).add(r["loss"])
    return out


def final(outdir: str, pid: int = 0) -> dict:
    return json.loads((Path(outdir) / f"final_{pid}.json").read_text())


def compare(ref: str, run: str, pid: int = 0) -> dict:
    """How the interrupted run ``run`` compares with the uninterrupted ``ref``."""
    ref_l, run_l = losses(ref, pid), losses(run, pid)
    lines = len((Path(run) / f"losses_{pid}.jsonl").read_text().splitlines())
    return {
        "steps": len(ref_l),
        "losses_equal": run_l == ref_l,  # one loss per step, the reference's, bit for bit
        "retrained_steps": lines - len(run_l),
        "final_equal": final(ref, pid) == final(run, pid),
    }


def scenario(
    layout: str,
    kills: tuple[str, ...],
    nproc: int = 1,
    seed: int = 0,
    delay: float = 0.05,
    workdir: str | None = None,
) -> dict:
    """The uninterrupted run vs one killed once per entry of ``kills`` and restarted each time.

    ``"random"`` SIGKILLs the last process at a random step, ``"in-save"`` inside the save
    of a random even step. The reference runs beside the first attempt. Directories
    are made under ``workdir`` (default: the system's temporary directory).
    """
    rng = random.Random(seed)
    ref, run, cache = (
        tempfile.mkdtemp(prefix=f"resume_{n}_", dir=workdir) for n in ("ref", "run", "jit")
    )
    ref_procs, attempts = start(ref, layout, nproc=nproc, cache=cache), []
    for kill in kills:
        before = steps_logged(run, nproc - 1)
        if kill == "random":
            procs = start(run, layout, nproc=nproc, delay=delay, cache=cache)
            reached = kill_at_random_step(run, procs, rng, Config().steps, victim=nproc - 1)
        else:
            target = 2 * rng.randint(before // 2 + 1, Config().steps // 2 - 1)
            procs = start(run, layout, nproc=nproc, kill_in_save=target, cache=cache)
            for p in procs:
                p.wait()
            reached = target
        names = sorted(p.name for p in (Path(run) / "ckpt").iterdir() if p.name[0].isdigit())
        attempts.append({"kill": kill, "at_step": reached, "step_dirs_after_kill": names})
    finish(start(run, layout, nproc=nproc, cache=cache))
    finish(ref_procs)
    result = {"layout": layout, "nproc": nproc, "attempts": attempts}
    for pid in range(nproc):
        result[f"process_{pid}"] = compare(ref, run, pid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--outdir", default=None)
    parser.add_argument("--layout", default="single", choices=["single", "sharded"])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per step")
    parser.add_argument("--kill-in-save", type=int, default=None, help="SIGKILL inside this save")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.worker is not None:
        if args.nproc > 1:
            jax.distributed.initialize(
                f"127.0.0.1:{args.port}", num_processes=args.nproc, process_id=args.worker
            )
        if args.kill_in_save is not None:
            kill_inside_save(args.kill_in_save)
        train(args.outdir, Config(), args.layout, delay=args.delay)
        return
    if args.nproc > 1:
        runs = [scenario("sharded", ("random",), nproc=args.nproc, seed=args.seed)]
    else:
        runs = [
            scenario("single", ("in-save", "random"), seed=args.seed),
            scenario("sharded", ("random",), seed=args.seed),
        ]
    for r in runs:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
