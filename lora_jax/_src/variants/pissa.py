"""PiSSA and OLoRA initialisations: the factors start at a principal part of W0.

Both move part of the pretrained weight into the trainable factors and leave the rest
as the frozen base, so ``W0 = residual + scale * a @ b`` at initialisation:

* PiSSA (Meng et al., 2024, "Principal Singular values and Singular vectors Adaptation"):
  with ``W0 = U S V^T`` (``W0`` as an ``(in, out)`` matrix), ``a = U_r sqrt(S_r / scale)``,
  ``b = sqrt(S_r / scale) V_r^T``, so ``scale * a @ b`` is the top-r part. ``pissa_niter_<n>``
  takes ``U_r, S_r, V_r`` from a randomised SVD (Halko et al., 2011) with ``n`` power
  iterations, as PEFT's ``init_lora_weights="pissa_niter_<n>"`` does with ``torch.svd_lowrank``.
* OLoRA (Buyukakyuz, 2024): with the QR decomposition ``W0^T = Q R`` (torch layout
  ``(out, in)``), ``a = R_r^T``, ``b = Q_r^T`` and the residual ``W0 - scale * a @ b``
  (PEFT's ``olora_init``: no division by the scale).

Stacked weights ``(*stack, ...)`` are decomposed per layer; weights with several input
or output axes are flattened to ``(prod(in), prod(out))`` matrices first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors, lora_delta, wide_dtype
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import _PISSA_NITER, is_principal_init
from lora_jax._src.core.trees import is_node, leaves_with_paths

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def weight_matrix(w: jax.Array, axes: Axes) -> jax.Array:
    """``w`` as per-layer matrices ``(*stack, prod(in), prod(out))`` in float32 (or float64)."""
    stack, ins, outs = axes
    shape = tuple(w.shape)
    perm = stack + ins + outs
    d_in = math.prod(shape[i] for i in ins)
    d_out = math.prod(shape[i] for i in outs)
    mat = jnp.transpose(w, perm).astype(wide_dtype(w.dtype))
    return mat.reshape(tuple(shape[i] for i in stack) + (d_in, d_out))


def randomized_svd(
    mat: jax.Array, rank: int, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-``rank`` SVD ``(U (..., m, r), S (..., r), Vt (..., r, n))`` of ``mat (..., m, n)``.

    Halko et al. (2011), Algorithm 4.4 with ``niter`` power iterations and no oversampling,
    the scheme of ``torch.svd_lowrank(mat, q=rank, niter=niter)``.
    """
    hi = jax.lax.Precision.HIGHEST
    mt = jnp.swapaxes(mat, -1, -2)
    probe = jax.random.normal(key, mat.shape[:-2] + (mat.shape[-1], rank), mat.dtype)
    q, _ = jnp.linalg.qr(jnp.matmul(mat, probe, precision=hi))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(jnp.matmul(mt, q, precision=hi))
        q, _ = jnp.linalg.qr(jnp.matmul(mat, q, precision=hi))
    u, s, vt = jnp.linalg.svd(jnp.matmul(jnp.swapaxes(q, -1, -2), mat, precision=hi), False)
    return jnp.matmul(q, u, precision=hi), s, vt


def pissa_factors(
    mat: jax.Array, rank: int, scale: float, init: str, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """PiSSA's ``a (..., in, r)`` and ``b (..., r, out)`` of ``mat (..., in, out)``."""
    m = _PISSA_NITER.fullmatch(init)
    if m is None:
        u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
    else:
        u, s, vt = randomized_svd(mat, rank, int(m.group(1)), key)
    root = jnp.sqrt(s[..., :rank] / jnp.asarray(scale, s.dtype))
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def olora_factors(mat: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's ``a = R_r^T (..., in, r)`` and ``b = Q_r^T (..., r, out)`` from ``qr(mat^T)``."""
    q, r = jnp.linalg.qr(jnp.swapaxes(mat, -1, -2))
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


def check_finite_weight(w: jax.Array, init: str, path: str) -> None:
    """Refuse a concrete base weight holding NaN/Inf: its SVD/QR, hence the factors, are NaN.

    Under ``jit``/``eval_shape`` the values are unknown and the check is skipped.
    """
    if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array | np.ndarray):
        return
    bad = int(np.size(w) - np.count_nonzero(np.isfinite(np.asarray(w, np.float32))))
    if bad:
        raise ValueError(
            f"'{path}': init={init!r} factors the base weight (shape {tuple(w.shape)}, "
            f"{w.dtype}), but it holds {bad} NaN/Inf value(s), so the factors would be NaN. "
            f"Fix the weight, or use init='gaussian' for it."
        )


def principal_factors(
    w: jax.Array,
    init: str,
    rank: int,
    scale: float,
    axes: Axes,
    key: jax.Array,
    path: str = "<weight>",
) -> tuple[jax.Array, jax.Array]:
    """``a (*stack, *in, r)`` and ``b (*stack, r, *out)`` (float32 or wider) of ``w``.

    Raises:
        ValueError: a concrete ``w`` holds NaN/Inf (the error names ``path``).
    """
    check_finite_weight(w, init, path)
    stack, ins, outs = axes
    shape = tuple(w.shape)
    mat = weight_matrix(w, axes)
    if init == "olora":
        a, b = olora_factors(mat, rank)
    else:
        a, b = pissa_factors(mat, rank, scale, init, key)
    s_shape = tuple(shape[i] for i in stack)
    a = a.reshape(s_shape + tuple(shape[i] for i in ins) + (rank,))
    b = b.reshape(s_shape + (rank,) + tuple(shape[i] for i in outs))
    return a, b


class Principal(_variant.Variant):
    """The plug-in hooks: ``init="pissa"``/``"olora"`` start the factors at a principal part
    of W0 and make the residual the frozen base (nothing is added to the factors)."""

    name = "pissa"
    title = "PiSSA/OLoRA"
    exclusive = False
    changes_base = True

    def wants(self, rule: Any) -> bool:
        return is_principal_init(rule.init)

    def init(self, factors, base, ctx):
        if isinstance(base, QuantizedArray):
            raise TypeError(
                f"'{ctx.path}' is quantised but init={ctx.rule.init!r} replaces the base by the "
                f"residual W0 - scale * a @ b; split the float weights, then lj.quantize the "
                f"frozen tree."
            )
        rule = ctx.rule
        a, b = principal_factors(
            base, rule.init, rule.rank, rule.scale, ctx.axes, ctx.key, path=ctx.path
        )
        factors = factors.with_factors(a.astype(rule.param_dtype), b.astype(rule.param_dtype))
        wide = wide_dtype(base.dtype, rule.param_dtype)  # W0 = residual + scale * a @ b
        return factors, (base.astype(wide) - lora_delta(factors, wide)).astype(base.dtype)


PRINCIPAL = _variant.register(Principal())


def principal_to_lora(initial: Any, trainable: Any) -> Any:
    """A trained PiSSA/OLoRA adapter as an adapter for the ORIGINAL weights (rank ``2r``).

    Training moved ``W = residual + scale * a @ b`` away from ``W0 = residual + scale * a0 @ b0``,
    so ``W = W0 + scale * [a, -a0] @ [b; b0]``: factors of rank ``2r`` with ``alpha`` doubled
    (``sqrt(2)`` times with rsLoRA) to keep the scale. This is PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``; the result can be
    exported with :func:`lora_jax.peft.save_pretrained` and applied to the unmodified base.
    DoRA magnitudes carry over unchanged (the column norms are the same). Leaves whose
    initial ``b`` is zero (ordinary inits) are returned as they are.

    Args:
        initial: the trainable tree returned by :func:`lora_jax.split` (before training).
        trainable: the same tree after training.

    Returns:
        A trainable tree to use with the original parameters in place of the residual base.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, lora_jax as lj
        >>> w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
        >>> frozen, t0 = lj.split({"w": w}, lj.LoraRule("w", rank=2, init="pissa"),
        ...                       key=jax.random.key(0))
        >>> t1 = jax.tree.map(lambda x: 1.1 * x, t0)  # "training"
        >>> plain = lj.principal_to_lora(t0, t1)
        >>> plain["w"].rank
        4
        >>> bool(jnp.allclose(lj.merge({"w": w}, plain)["w"], lj.merge(frozen, t1)["w"], atol=1e-5))
        True
    """
    initial_leaves = dict(leaves_with_paths(initial))
    flat, treedef = jax.tree.flatten(trainable, is_leaf=is_node)
    paths = [p for p, _ in leaves_with_paths(trainable)]
    if sorted(paths) != sorted(initial_leaves):
        raise ValueError(
            "initial and trainable have different leaves; pass the trainable tree returned by "
            "lj.split before training and the same tree after training."
        )
    out = []
    for path, t in zip(paths, flat):
        t0 = initial_leaves[path]
        if not isinstance(t, LoraFactors):
            out.append(t)
            continue
        if not isinstance(t0, LoraFactors) or t0.a.shape != t.a.shape or t0.b.shape != t.b.shape:
            raise ValueError(
                f"'{path}': the initial leaf is not factors of the same shapes as the trained "
                f"a{tuple(t.a.shape)}, b{tuple(t.b.shape)}; pass the tree from the same lj.split."
            )
        if t.singular is not None:
            raise ValueError(f"'{path}': AdaLoRA factors have no PiSSA/OLoRA initial part.")
        if not np.any(np.asarray(t0.b)):
            out.append(t)
            continue
        ns = len(t.stack_axes)
        a = jnp.concatenate([t.a, -t0.a.astype(t.a.dtype)], axis=-1)
        b = jnp.concatenate([t.b, t0.b.astype(t.b.dtype)], axis=ns)
        alpha = t.alpha * (math.sqrt(2.0) if t.rslora else 2.0)
        out.append(dataclasses.replace(t, a=a, b=b, alpha=alpha))
    return jax.tree.unflatten(treedef, out)
