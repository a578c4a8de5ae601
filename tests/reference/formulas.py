"""Float64 torch reference of every adapted weight, written from each paper's formula.

Nothing here imports lora_jax: the layout of the factors is taken from the documented
contract (``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``, ``delta W = scale * a @ b``
with ``scale = alpha / r``, ``alpha / sqrt(r)`` for rsLoRA) and every formula from its
paper. Weights are handled as per-layer matrices ``(S, IN, OUT)``: the kind's axes are
permuted to ``(stack, in, out)`` and flattened, the variant's formula is applied, and
the result is put back in the weight's own layout. Torch autograd gives the gradients.

Formulas (``⊙`` elementwise, ``s`` the scale, per stacked layer):

* LoRA (Hu et al., 2021):        ``W = W0 + s a b``
* rsLoRA (Kalajdzievski, 2023):  the same with ``s = alpha / sqrt(r)``
* DoRA (Liu et al., 2024):       ``W = m ⊙ (W0 + s a b) / ||W0 + s a b||_c``, the norm over the
  input side of each output column, detached from the graph (the paper's section 4.3)
* AdaLoRA (Zhang et al., 2023):  ``W = W0 + s P diag(lambda) Q``
* GLoRA (Chavan et al., 2023):   ``W = W0 + W0 ⊙ A + s a b``, ``bias = b0 + b0 ⊙ D + E + C W0``
  with A, C, D, E in low-rank, vector or scalar form (low-rank products times ``s``)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64


@dataclass(frozen=True)
class Layout:
    """Axes of one weight: which index stacked layers, which meet the input, which the output."""

    shape: tuple[int, ...]
    stack: tuple[int, ...]
    ins: tuple[int, ...]
    outs: tuple[int, ...]

    @property
    def perm(self) -> tuple[int, ...]:
        return self.stack + self.ins + self.outs

    def sizes(self, axes) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in axes)

    @property
    def s(self) -> int:
        return math.prod(self.sizes(self.stack))

    @property
    def n_in(self) -> int:
        return math.prod(self.sizes(self.ins))

    @property
    def n_out(self) -> int:
        return math.prod(self.sizes(self.outs))

    def to_matrices(self, w: torch.Tensor) -> torch.Tensor:
        """``(*shape)`` -> ``(S, IN, OUT)``."""
        return w.permute(self.perm).reshape(self.s, self.n_in, self.n_out)

    def from_matrices(self, m: torch.Tensor) -> torch.Tensor:
        """``(S, IN, OUT)`` -> the weight's own layout ``(*shape)``."""
        permuted = m.reshape(self.sizes(self.stack) + self.sizes(self.ins) + self.sizes(self.outs))
        inverse = [self.perm.index(i) for i in range(len(self.shape))]
        return permuted.permute(inverse)

    def a_matrix(self, a: torch.Tensor) -> torch.Tensor:
        """``a (*stack, *in, r)`` -> ``(S, IN, r)``."""
        return a.reshape(self.s, self.n_in, a.shape[-1])

    def b_matrix(self, b: torch.Tensor) -> torch.Tensor:
        """``b (*stack, r, *out)`` -> ``(S, r, OUT)``."""
        return b.reshape(self.s, b.shape[len(self.stack)], self.n_out)

    def cols(self, v: torch.Tensor) -> torch.Tensor:
        """A per-column ``(*stack, *out)`` or per-layer ``(*stack,)`` part -> ``(S, 1, OUT)``."""
        if v.dim() == len(self.stack):
            return v.reshape(self.s, 1, 1).expand(self.s, 1, self.n_out)
        return v.reshape(self.s, 1, self.n_out)

    def ins_vec(self, v: torch.Tensor) -> torch.Tensor:
        """A per-input ``(*stack, *in)`` part -> ``(S, IN)``."""
        return v.reshape(self.s, self.n_in)


def lowrank(lay: Layout, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` per layer: ``(S, IN, OUT)``."""
    return scale * torch.bmm(lay.a_matrix(a), lay.b_matrix(b))


def effective(
    lay: Layout, w0: torch.Tensor, parts: dict, variant: str, scale: float, bias0=None, glora=None
):
    """The adapted weight (the weight's layout) and bias (``(*stack, *out)``, or None).

    ``parts`` holds torch tensors named as the factors' fields: ``a``, ``b``, ``magnitude``,
    ``singular`` and GLoRA's ``scale``, ``scale_in``, ``scale_out``, ``prompt``, ``prompt_in``,
    ``prompt_out``, ``bias_scale``, ``bias_shift``; ``glora`` the forms ``(A, C, D, E)``.
    """
    W0 = lay.to_matrices(w0)
    a, b = parts["a"], parts["b"]
    if variant == "adalora":
        lam = parts["singular"].reshape(lay.s, -1, 1)
        delta = scale * torch.bmm(lay.a_matrix(a), lam * lay.b_matrix(b))
    else:
        delta = lowrank(lay, a, b, scale)
    bias = bias0
    if variant == "dora":
        full = W0 + delta
        norm = torch.linalg.vector_norm(full, dim=1, keepdim=True).detach()
        W = lay.cols(parts["magnitude"]) * full / norm
    elif variant == "glora":
        fa, fc, fd, fe = glora
        if fa == "lowrank":
            A = lowrank(lay, parts["scale_in"], parts["scale_out"], scale)
        elif fa in ("vector", "scalar"):
            A = lay.cols(parts["scale"])
        else:
            A = torch.zeros((), dtype=F64)
        W = W0 + W0 * A + delta
        if bias0 is not None:
            b0 = lay.cols(bias0)[:, 0]  # (S, OUT)
            extra = torch.zeros_like(b0)
            if fd != "none":
                extra = extra + b0 * lay.cols(parts["bias_scale"])[:, 0]
            if fe != "none":
                extra = extra + lay.cols(parts["bias_shift"])[:, 0]
            if fc == "lowrank":
                pin = parts["prompt_in"].reshape(lay.s, lay.n_in, -1)
                C = scale * torch.einsum("sir,sr->si", pin, parts["prompt_out"].reshape(lay.s, -1))
            elif fc == "vector":
                C = lay.ins_vec(parts["prompt"])
            else:
                C = None
            if C is not None:
                extra = extra + torch.einsum("si,sio->so", C, W0)
            bias = (b0 + extra).reshape(bias0.shape)
    else:
        W = W0 + delta
    return lay.from_matrices(W), bias


# ------------------------------------------------------------------ principal inits (numpy)


def pissa(w0: np.ndarray, lay: Layout, rank: int, scale: float):
    """PiSSA (Meng et al., 2024): ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r / s) V_r^T``.

    Per layer of the ``(IN, OUT)`` matrices (the residual is ``W0 - s a b``);
    returns ``(S, IN, r)``, ``(S, r, OUT)``.
    """
    mats = lay.to_matrices(torch.as_tensor(w0)).numpy()
    a, b = [], []
    for m in mats:
        u, sv, vt = np.linalg.svd(m, full_matrices=False)
        root = np.sqrt(sv[:rank] / scale)
        a.append(u[:, :rank] * root)
        b.append(root[:, None] * vt[:rank])
    return np.stack(a), np.stack(b)


def olora(w0: np.ndarray, lay: Layout, rank: int):
    """OLoRA (Buyukakyuz, 2024): ``W0^T = Q R`` (torch's ``(out, in)`` layout), ``a = R_r^T``,
    ``b = Q_r^T`` per layer; ``(S, IN, r)``, ``(S, r, OUT)``."""
    mats = lay.to_matrices(torch.as_tensor(w0)).numpy()
    a, b = [], []
    for m in mats:
        q, r = np.linalg.qr(m.T)
        a.append(r[:rank].T)
        b.append(q[:, :rank].T)
    return np.stack(a), np.stack(b)
