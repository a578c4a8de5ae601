"""Weight kinds for the reference suite: the same layer written for JAX and for float64 torch.

Each kind has a JAX function of the parameter tree (what lora_jax adapts) and a torch
function of the effective weight and bias (what the formulas in :mod:`formulas` give),
plus the axes the factors must use. Inputs are scaled so that pre-activations are about
N(0, 0.4^2) and the tanh outputs stay out of saturation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from formulas import Layout
from jax import lax


@dataclass(frozen=True)
class Kind:
    name: str
    layout: Layout
    has_bias: bool
    jax_fn: Callable  # (params {"w", "bias"?} or {"layers": {...}}, x) -> output
    torch_fn: Callable  # (w, bias, x) -> output
    make_input: Callable[[np.random.Generator], np.ndarray]
    nested: bool = False  # params under "layers" (stacked)

    def rule_axes(self) -> dict:
        if self.layout.stack:
            return {"stack_axes": self.layout.stack}
        return {"in_axes": self.layout.ins}

    @property
    def path(self) -> str:
        return "layers/w" if self.nested else "w"


def _dense_jax(p, x):
    return jnp.tanh(x @ p["w"] + p["bias"])


def _dense_torch(w, bias, x):
    return torch.tanh(x @ w + bias)


def _general_jax(p, x):
    return jnp.tanh(jnp.einsum("btij,ijkl->btkl", x, p["w"]) + p["bias"])


def _general_torch(w, bias, x):
    return torch.tanh(torch.einsum("btij,ijkl->btkl", x, w) + bias)


def _conv_jax(p, img):
    y = lax.conv_general_dilated(
        img, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.tanh(y + p["bias"])


def _conv_torch(w, bias, img):
    y = F.conv2d(img.permute(0, 3, 1, 2), w.permute(3, 2, 0, 1), padding=1)
    return torch.tanh(y.permute(0, 2, 3, 1) + bias)


def _embed_jax(p, ids):
    return jnp.tanh(jnp.take(p["w"], ids, axis=0))


def _embed_torch(w, bias, ids):
    return torch.tanh(w[torch.as_tensor(ids)])


def _stacked_jax(p, x):
    def layer(h, lp):
        return jnp.tanh(h @ lp["w"] + lp["bias"]), None

    h, _ = lax.scan(layer, x, p["layers"])
    return h


def _stacked_torch(w, bias, x):
    h = x
    for i in range(w.shape[0]):
        h = torch.tanh(h @ w[i] + bias[i])
    return h


def _normal(shape, std):
    return lambda rng: (rng.standard_normal(shape) * std).astype(np.float32)


KINDS = [
    Kind("dense", Layout((8, 6), (), (0,), (1,)), True, _dense_jax, _dense_torch,
         _normal((2, 4, 8), 0.4)),
    Kind("dense_general", Layout((2, 3, 4, 5), (), (0, 1), (2, 3)), True, _general_jax,
         _general_torch, _normal((2, 3, 2, 3), 0.4)),
    Kind("conv", Layout((3, 3, 4, 5), (), (0, 1, 2), (3,)), True, _conv_jax, _conv_torch,
         _normal((2, 5, 5, 4), 0.4)),
    Kind("embedding", Layout((20, 6), (), (0,), (1,)), False, _embed_jax, _embed_torch,
         lambda rng: rng.integers(0, 20, (2, 5)).astype(np.int32)),
    Kind("stacked_scan", Layout((3, 8, 8), (0,), (1,), (2,)), True, _stacked_jax,
         _stacked_torch, _normal((2, 4, 8), 0.4), nested=True),
]  # fmt: skip
