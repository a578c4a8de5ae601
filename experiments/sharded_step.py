"""Reference LoRA training step for a small decoder-only LM on a ('data', 'fsdp', 'model') mesh.

Layouts: ``data`` (pure data parallel), ``fsdp`` (base and factors sharded on 'fsdp'),
``tp`` (Megatron tensor parallel: q, k, v, fc1 column-parallel, o, fc2 row-parallel),
``fsdp_tp`` (both, with "column"/"row" factor overrides), plus the same step under
``jax.pmap`` with ``lax.pmean`` of the adapter gradients, and the step on 2 processes x 4
CPU devices with ``jax.distributed`` (``--launch``). The tests import this file.

    python experiments/sharded_step.py --layout fsdp_tp --steps 3
    python experiments/sharded_step.py --launch --outdir /tmp/lora_mp
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
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
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lora_jax as lj  # noqa: E402

AXES = ("data", "fsdp", "model")
# mesh shape (data, fsdp, model) on 8 devices for each layout
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (2, 1, 4), "fsdp_tp": (2, 2, 2)}
COLUMN, ROW = ("q", "k", "v", "fc1"), ("o", "fc2")
BATCH_SPEC = P(("data", "fsdp"))


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    seq: int = 16
    batch: int = 8  # global batch
    rank: int = 4
    lr: float = 1e-2


def rules(cfg: Config) -> list[lj.LoraRule]:
    """LoRA on q, k, v, o and both MLP kernels."""
    return [
        lj.LoraRule(r"layer_\d+/attn/(q|k|v|o)/kernel", rank=cfg.rank),
        lj.LoraRule(r"layer_\d+/mlp/(fc1|fc2)/kernel", rank=cfg.rank),
    ]


def init_params(cfg: Config, seed: int = 0) -> dict:
    """Host (numpy float32) parameters: identical on every process."""
    rng = np.random.default_rng(seed)

    def dense(d_in, d_out):
        return {"kernel": (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)}

    d, f = cfg.d_model, cfg.d_ff
    params = {
        "embed": {"embedding": (0.02 * rng.standard_normal((cfg.vocab, d))).astype(np.float32)},
        "ln_f": {"scale": np.ones(d, np.float32)},
        "head": dense(d, cfg.vocab),
    }
    for i in range(cfg.n_layers):
        params[f"layer_{i}"] = {
            "ln1": {"scale": np.ones(d, np.float32)},
            "ln2": {"scale": np.ones(d, np.float32)},
            "attn": {n: dense(d, d) for n in ("q", "k", "v", "o")},
            "mlp": {"fc1": dense(d, f), "fc2": dense(f, d)},
        }
    return params


def _rms(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def forward(params: dict, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Logits ``(batch, seq, vocab)`` of a pre-norm causal transformer."""
    b, t = tokens.shape
    h, dh = cfg.n_heads, cfg.d_model // cfg.n_heads
    x = params["embed"]["embedding"][tokens]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(cfg.n_layers):
        p = params[f"layer_{i}"]
        y = _rms(x, p["ln1"]["scale"])
        q, k, v = ((y @ p["attn"][n]["kernel"]).reshape(b, t, h, dh) for n in ("q", "k", "v"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(dh))
        s = jnp.where(mask, s, jnp.float32(-1e9))
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, -1)
        x = x + att @ p["attn"]["o"]["kernel"]
        y = _rms(x, p["ln2"]["scale"])
        x = x + jax.nn.gelu(y @ p["mlp"]["fc1"]["kernel"]) @ p["mlp"]["fc2"]["kernel"]
    return _rms(x, params["ln_f"]["scale"]) @ params["head"]["kernel"]


def loss_fn(params: dict, tokens: jax.Array, cfg: Config) -> jax.Array:
    """Mean next-token cross-entropy; ``tokens`` is ``(batch, seq + 1)`` int32."""
    logits = forward(params, tokens[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def optimizer(cfg: Config) -> optax.GradientTransformation:
    return optax.adamw(cfg.lr, weight_decay=1e-2)


def lora_loss(frozen, trainable, tokens, cfg: Config, materialize: bool = False) -> jax.Array:
    return lj.lora_apply(loss_fn, materialize=materialize)(frozen, trainable, tokens, cfg)


def train_step(
    frozen,
    trainable,
    opt_state,
    tokens,
    cfg: Config,
    pmean_axis: str | None = None,
    materialize: bool = False,
):
    """One AdamW step on the adapters; returns ``(trainable, opt_state, loss)``.

    ``materialize`` runs the model on ``W0 + scale * a @ b`` (lora_apply's reference mode)
    instead of the factored ``x @ W0 + scale * (x @ a) @ b``.
    """
    grad_fn = jax.value_and_grad(lora_loss, argnums=1)
    loss, grads = grad_fn(frozen, trainable, tokens, cfg, materialize)
    if pmean_axis is not None:
        loss, grads = jax.lax.pmean((loss, grads), pmean_axis)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
        updates, opt_state = optimizer(cfg).update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def tokens_for(cfg: Config, step: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + step)
    return rng.integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1), dtype=np.int32)


def make_mesh(layout: str, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(MESHES[layout]), AXES)


def param_specs(params: dict, layout: str) -> dict:
    """PartitionSpecs mirroring ``params`` for a layout (norm scales replicated)."""

    def spec(path, x):
        names = [getattr(k, "key", None) for k in path]
        if x.ndim < 2:
            return P()
        if layout == "data":
            return P()
        if layout == "fsdp":
            return P("fsdp")
        tp = "fsdp" if layout == "fsdp_tp" else None
        if any(n in COLUMN for n in names) or "head" in names:
            return P(tp, "model")
        if any(n in ROW for n in names):
            return P("model", tp)
        return P(tp)  # embedding

    return jax.tree_util.tree_map_with_path(spec, params)


def overrides(layout: str) -> dict | None:
    """Megatron factor layouts: replicate the factor side that the base shards on 'fsdp'."""
    if layout != "fsdp_tp":
        return None
    return {r".*/(q|k|v|fc1)/kernel": "column", r".*/(o|fc2)/kernel": "row"}


def place(params: dict, specs: dict, mesh: Mesh) -> dict:
    """Global arrays from host values (works when devices span several processes)."""

    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, params, specs)


def opt_shardings(cfg: Config, trainable, trainable_sh, replicated):
    state = jax.eval_shape(optimizer(cfg).init, trainable)
    return optax.tree_map_params(
        optimizer(cfg),
        lambda _, s: s,
        state,
        trainable_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: x is None,
    )


@dataclasses.dataclass
class Setup:
    frozen: dict
    trainable: dict
    opt_state: object
    step: object  # jitted (frozen, trainable, opt_state, tokens) -> (trainable, opt_state, loss)
    batch_sharding: NamedSharding
    trainable_sharding: dict


def setup_sharded(cfg: Config, layout: str, mesh: Mesh | None = None, seed: int = 0) -> Setup:
    """Place params for ``layout``, split with sharded factors and jit the step."""
    mesh = make_mesh(layout) if mesh is None else mesh
    host = init_params(cfg, seed)
    specs = param_specs(host, layout)
    params = place(host, specs, mesh)
    frozen, trainable = lj.split_sharded(
        params, rules(cfg), key=jax.random.key(seed), overrides=overrides(layout)
    )
    replicated = NamedSharding(mesh, P())
    t_sh = lj.factor_shardings(specs, trainable, mesh=mesh, overrides=overrides(layout))
    o_sh = opt_shardings(cfg, trainable, t_sh, replicated)
    opt_state = jax.jit(optimizer(cfg).init, out_shardings=o_sh)(trainable)
    f_sh = jax.tree.map(lambda x: x.sharding, frozen)
    b_sh = NamedSharding(mesh, BATCH_SPEC)
    step = jax.jit(
        lambda f, t, o, x: train_step(f, t, o, x, cfg),
        in_shardings=(f_sh, t_sh, o_sh, b_sh),
        out_shardings=(t_sh, o_sh, replicated),
        donate_argnums=(1, 2),
    )
    return Setup(frozen, trainable, opt_state, step, b_sh, t_sh)


def run_sharded(cfg: Config, layout: str, steps: int = 3) -> tuple[list[float], dict]:
    """Losses and final adapters of ``steps`` steps in ``layout`` on all local devices."""
    s = setup_sharded(cfg, layout)
    trainable, opt_state, losses = s.trainable, s.opt_state, []
    for i in range(steps):
        tokens = jax.device_put(tokens_for(cfg, i), s.batch_sharding)
        trainable, opt_state, loss = s.step(s.frozen, trainable, opt_state, tokens)
        losses.append(float(loss))
    return losses, trainable


def run_single(cfg: Config, steps: int = 3) -> tuple[list[float], dict]:
    """The reference: the same steps on one device, no sharding."""
    device = jax.devices()[0]
    params = jax.device_put(init_params(cfg), device)
    frozen, trainable = lj.split(params, rules(cfg), key=jax.random.key(0))
    opt_state = optimizer(cfg).init(trainable)
    step = jax.jit(lambda f, t, o, x: train_step(f, t, o, x, cfg))
    losses = []
    for i in range(steps):
        tokens = jax.device_put(tokens_for(cfg, i), device)
        trainable, opt_state, loss = step(frozen, trainable, opt_state, tokens)
        losses.append(float(loss))
    return losses, trainable


def run_pmap(cfg: Config, steps: int = 3) -> tuple[list[float], dict]:
    """The same step under ``jax.pmap``: replicated adapters, ``lax.pmean`` of gradients."""
    n = jax.local_device_count()
    frozen, trainable = lj.split(init_params(cfg), rules(cfg), key=jax.random.key(0))
    opt_state = optimizer(cfg).init(trainable)
    step = jax.pmap(
        lambda f, t, o, x: train_step(f, t, o, x, cfg, pmean_axis="batch"),
        axis_name="batch",
        in_axes=(None, None, None, 0),
        out_axes=None,
    )
    losses = []
    for i in range(steps):
        tokens = tokens_for(cfg, i).reshape(n, cfg.batch // n, cfg.seq + 1)
        trainable, opt_state, loss = step(frozen, trainable, opt_state, tokens)
        losses.append(float(loss))
    return losses, trainable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    outdir: str,
    n_processes: int = 2,
    devices_per_process: int = 4,
    steps: int = 3,
    layout: str = "fsdp_tp",
    timeout: float = 240.0,
) -> list[dict]:
    """Run :func:`worker` as ``n_processes`` local processes; return each one's results.

    Every process is killed if they have not all finished within ``timeout`` seconds.
    """
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs, logs = [], []
    for pid in range(n_processes):
        log = open(Path(outdir) / f"log_{pid}.txt", "w")  # noqa: SIM115
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            str(pid),
            "--nproc",
            str(n_processes),
            "--port",
            str(port),
            "--outdir",
            outdir,
            "--steps",
            str(steps),
            "--layout",
            layout,
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    results = []
    for pid, proc in enumerate(procs):
        text = (Path(outdir) / f"log_{pid}.txt").read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"process {pid} exited with {proc.returncode}:\n{text[-3000:]}")
        results.append(json.loads((Path(outdir) / f"result_{pid}.json").read_text()))
    return results


def worker(pid: int, nproc: int, port: int, outdir: str, steps: int, layout: str) -> None:
    """One process of the multi-process run: train, merge and save from global arrays."""
    from jax.experimental import multihost_utils

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    cfg = Config()
    mesh = make_mesh(layout)  # jax.devices() lists process 0's devices first: 'data' = process
    s = setup_sharded(cfg, layout, mesh)
    rows = cfg.batch // nproc
    trainable, opt_state, losses = s.trainable, s.opt_state, []
    for i in range(steps):
        local = tokens_for(cfg, i)[pid * rows : (pid + 1) * rows]
        tokens = jax.make_array_from_process_local_data(s.batch_sharding, local)
        trainable, opt_state, loss = s.step(s.frozen, trainable, opt_state, tokens)
        losses.append(float(loss))

    merged = jax.jit(lj.merge)(s.frozen, trainable)
    path = "layer_1/attn/q/kernel"
    w0, t = s.frozen["layer_1"]["attn"]["q"]["kernel"], trainable["layer_1"]["attn"]["q"]["kernel"]
    m = merged["layer_1"]["attn"]["q"]["kernel"]
    w0_h, a_h, b_h, m_h = (
        np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)
        for x in (w0, t.a, t.b, m)
    )
    merge_err = float(np.abs(m_h - (w0_h + t.scale * a_h @ b_h)).max())

    ckpt = Path(outdir) / "adapters"
    save_adapters(ckpt, trainable, cfg, s.frozen)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        trainable,
    )
    restored = restore_adapters(ckpt, abstract)
    same = jax.tree.map(
        lambda x, y: bool(
            np.array_equal(
                multihost_utils.process_allgather(x, tiled=True), np.asarray(y.addressable_data(0))
            )
        ),
        trainable,
        restored,
    )
    result = {
        "losses": losses,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "fully_addressable": bool(t.a.is_fully_addressable),
        "merged_spec": str(m.sharding.spec),
        "base_spec": str(w0.sharding.spec),
        "merge_max_abs_err": merge_err,
        "merge_checked": path,
        "restored_equal": all(jax.tree.leaves(same)),
    }
    (Path(outdir) / f"result_{pid}.json").write_text(json.dumps(result))
    jax.distributed.shutdown()


def save_adapters(path: Path, trainable, cfg: Config, frozen) -> None:
    """:func:`lora_jax.save_adapters` from every process (each writes its own shards)."""
    lj.save_adapters(Path(path).absolute(), trainable, rules=rules(cfg), base=frozen)


def restore_adapters(path: Path, like):
    """:func:`lora_jax.load_adapters` onto ``like``'s shapes and shardings (ShapeDtypeStructs)."""
    return lj.load_adapters(Path(path).absolute(), like=like)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="fsdp_tp", choices=[*MESHES, "pmap"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--launch", action="store_true", help="2 processes x 4 CPU devices")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.nproc, args.port, args.outdir, args.steps, args.layout)
        return
    cfg = Config()
    ref, _ = run_single(cfg, args.steps)
    if args.launch:
        outdir = args.outdir or tempfile.mkdtemp(prefix="lora_mp_")
        Path(outdir).mkdir(parents=True, exist_ok=True)
        results = launch(outdir, args.nproc, 8 // args.nproc, args.steps, args.layout)
        losses = results[0]["losses"]
        print(json.dumps(results[0], indent=1))
    elif args.layout == "pmap":
        losses, _ = run_pmap(cfg, args.steps)
    else:
        losses, _ = run_sharded(cfg, args.layout, args.steps)
    print(f"{args.layout}: losses {losses}")
    print(f"single device: losses {ref}")
    print(f"max |diff| {max(abs(a - b) for a, b in zip(losses, ref)):.2e}")


if __name__ == "__main__":
    main()
