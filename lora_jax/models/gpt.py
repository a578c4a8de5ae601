"""A small decoder-only transformer LM as a plain function of a params dict (benchmarks, tests).

Layers are stacked on a leading axis and run with ``lax.scan``; activations are
flattened to ``(batch * seq, d)`` before every matmul, which is what XLA:CPU runs
fastest. Kernels are Flax-style ``(in, out)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from ._explicit import lookup, reshape_rows


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 8192
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 4
    max_len: int = 128


BENCH = Config()  # the benchmark workload of experiments/bench_step.py (21.0M parameters)
LORA_TARGETS = r"layers/(attn/(q|k|v|o)|mlp/(fc1|fc2))/kernel"


def init(key: jax.Array, cfg: Config, dtype=jnp.float32) -> dict:
    """Parameters: embeddings, stacked layers ``(n_layers, ...)``, final norm and LM head."""
    ks = iter(jax.random.split(key, 16))
    d, f, n = cfg.d_model, cfg.d_ff, cfg.n_layers
    dense = lambda i, o: jax.random.normal(next(ks), (n, i, o), dtype) / jnp.sqrt(i).astype(dtype)
    norm = lambda: {"scale": jnp.ones((n, d), dtype), "bias": jnp.zeros((n, d), dtype)}
    return {
        "embed": {"embedding": jax.random.normal(next(ks), (cfg.vocab, d), dtype) * 0.02},
        "pos": {"embedding": jax.random.normal(next(ks), (cfg.max_len, d), dtype) * 0.02},
        "layers": {
            "ln1": norm(),
            "attn": {k: {"kernel": dense(d, d)} for k in ("q", "k", "v", "o")},
            "ln2": norm(),
            "mlp": {"fc1": {"kernel": dense(d, f)}, "fc2": {"kernel": dense(f, d)}},
        },
        "ln_f": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
        "head": {"kernel": jax.random.normal(next(ks), (d, cfg.vocab), dtype) / jnp.sqrt(d)},
    }


def _norm(x: jax.Array, p: dict) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def forward(params: dict, cfg: Config, tokens: jax.Array, bias: jax.Array | None = None):
    """Logits ``(batch, seq, vocab)`` for int tokens ``(batch, seq)``.

    ``bias`` (d_model,) is added after the embedding: the only trainable leaf of the
    benchmarks' "floor" step.
    """
    b, t = tokens.shape
    d, h = cfg.d_model, cfg.n_heads
    x = lookup(params["embed"]["embedding"], tokens) + params["pos"]["embedding"][:t]
    if bias is not None:
        x = x + bias
    x = reshape_rows(x, b * t, d)
    mask = jnp.tril(jnp.ones((t, t), bool))

    def layer(x, p):
        y = _norm(x, p["ln1"])
        heads = lambda z: reshape_rows(z, b, t, h, d // h).transpose(0, 2, 1, 3)  # noqa: E731
        # Scale q (b*t*d values) rather than the scores (b*h*t*t values).
        q = heads((y @ p["attn"]["q"]["kernel"]) * jnp.asarray((d // h) ** -0.5, y.dtype))
        k, v = (heads(y @ p["attn"][n]["kernel"]) for n in ("k", "v"))
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
        x = x + reshape_rows(o.transpose(0, 2, 1, 3), b * t, d) @ p["attn"]["o"]["kernel"]
        y = _norm(x, p["ln2"])
        y = jax.nn.gelu(y @ p["mlp"]["fc1"]["kernel"]) @ p["mlp"]["fc2"]["kernel"]
        return x + y, None

    x, _ = lax.scan(layer, x, params["layers"])
    x = _norm(x, params["ln_f"])
    return reshape_rows(x @ params["head"]["kernel"], b, t, cfg.vocab)


def loss(params: dict, cfg: Config, tokens: jax.Array, bias: jax.Array | None = None):
    """Mean next-token cross-entropy."""
    logits = forward(params, cfg, tokens[:, :-1], bias)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
