"""Weighted combination of adapters into one new adapter: exact concatenation or truncated SVD.

For each adapted weight, ``sum_i w_i * dW_i`` with ``dW_i = s_i * a_i @ b_i`` is

* ``"cat"``: exactly ``[a_1 .. a_n] @ [w_1 s_1 b_1; ..; w_n s_n b_n]``, rank ``r_1 + .. + r_n``;
* ``"svd"``: its best rank-``k`` approximation (Eckart-Young), found without forming the
  ``(in, out)`` matrix: with ``A = Q_a R_a`` and ``B^T = Q_b R_b`` (thin QR),
  ``A @ B = Q_a (R_a R_b^T) Q_b^T`` and only the small core ``R_a R_b^T`` is decomposed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.factors import LoraFactors, require_low_rank, wide_dtype
from lora_jax._src.core.trees import is_node, leaves_with_paths


def _cat(fs: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Concatenate factors along the rank axis, each ``b`` scaled by ``w_i * s_i`` (scale 1)."""
    first = fs[0]
    ns = len(first.stack_axes)
    wide = wide_dtype(first.a.dtype)
    a = jnp.concatenate([f.a for f in fs], axis=-1)
    b = jnp.concatenate(
        [
            (f.effective_b().astype(wide) * jnp.asarray(w * f.scale, wide)).astype(f.b.dtype)
            for f, w in zip(fs, weights)
        ],
        axis=ns,
    )
    return LoraFactors(a, b, float(a.shape[-1]), first.stack_axes, first.in_axes, first.out_axes)


def _svd(cat: LoraFactors, rank: int, path: str) -> LoraFactors:
    """Best rank-``rank`` factors of ``cat``'s update (its scale is 1), singular values split
    evenly between ``a`` and ``b``."""
    ns = len(cat.stack_axes)
    stack, r = cat.a.shape[:ns], cat.rank
    d_in = int(np.prod(cat.a.shape[ns:-1]))
    d_out = int(np.prod(cat.b.shape[ns + 1 :]))
    if not 1 <= rank <= min(r, d_in, d_out):
        raise ValueError(
            f"'{path}': rank={rank} must be in 1..min(summed rank {r}, in {d_in}, out {d_out}); "
            f"lower rank or use method='cat' to keep the exact sum."
        )
    wide = wide_dtype(cat.a.dtype)
    a = cat.a.astype(wide).reshape(stack + (d_in, r))
    bt = jnp.swapaxes(cat.b.astype(wide).reshape(stack + (r, d_out)), -1, -2)
    qa, ra = jnp.linalg.qr(a)
    qb, rb = jnp.linalg.qr(bt)
    u, s, vt = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2), full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    new_a = (qa @ u[..., :rank]) * root[..., None, :]
    new_b = root[..., :, None] * (vt[..., :rank, :] @ jnp.swapaxes(qb, -1, -2))
    new_a = new_a.reshape(cat.a.shape[:-1] + (rank,)).astype(cat.a.dtype)
    new_b = new_b.reshape(stack + (rank,) + cat.b.shape[ns + 1 :]).astype(cat.b.dtype)
    return LoraFactors(new_a, new_b, float(rank), cat.stack_axes, cat.in_axes, cat.out_axes)


def combine_adapters(
    trainables: Sequence[Any],
    weights: Sequence[float],
    *,
    method: str = "cat",
    rank: int | None = None,
) -> Any:
    """One adapter whose update is ``sum_i weights[i] * dW_i`` at every adapted weight.

    Args:
        trainables: trees from ``lj.split`` of one base with the same rules (ranks, alphas,
            rsLoRA may differ).
        weights: one float per adapter (negative weights subtract a task).
        method: ``"cat"`` (exact, rank = sum of ranks) or ``"svd"`` (best rank-``rank``
            approximation, computed from QR of the stacked factors and an SVD of the
            ``(sum r, sum r)`` core; never forms an ``(in, out)`` matrix).
        rank: target rank for ``"svd"``.

    Returns:
        A trainable tree with :class:`LoraFactors` of scale 1 (``alpha = rank``, weights
        and scales folded into ``b``); fully trained leaves become ``sum_i w_i * leaf_i``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"w": jnp.ones((6, 5))}
        >>> _, t1 = lj.split(params, lj.LoraRule("w", rank=2), key=jax.random.key(1))
        >>> _, t2 = lj.split(params, lj.LoraRule("w", rank=3), key=jax.random.key(2))
        >>> lj.combine_adapters([t1, t2], [0.5, 0.5])["w"].rank
        5
        >>> lj.combine_adapters([t1, t2], [0.5, 0.5], method="svd", rank=2)["w"].rank
        2
    """
    trainables, weights = list(trainables), [float(w) for w in weights]
    if len(weights) != len(trainables) or not trainables:
        raise ValueError(
            f"got {len(trainables)} adapters and {len(weights)} weights; give one weight per "
            f"adapter (at least one)."
        )
    if method not in ("cat", "svd") or (method == "svd") != (rank is not None):
        raise ValueError(
            f"method={method!r} with rank={rank}: use method='cat' (no rank) or "
            f"method='svd' with rank=k."
        )
    items = [leaves_with_paths(t) for t in trainables]
    paths = [p for p, _ in items[0]]
    for i, it in enumerate(items[1:], 1):
        if [p for p, _ in it] != paths:
            raise ValueError(
                f"adapter {i} has leaves {[p for p, _ in it][:3]}... but adapter 0 has "
                f"{paths[:3]}...; combine adapters made by lj.split of one base and rules."
            )
    out = []
    for j, path in enumerate(paths):
        leaves = [it[j][1] for it in items]
        first = leaves[0]
        kinds = {"None" if x is None else type(x).__name__ for x in leaves}
        kinds = {"array" if k not in ("None", "LoraFactors") else k for k in kinds}
        factors = [f for f in leaves if isinstance(f, LoraFactors)]
        shapes = {(f.stack_axes, f.in_axes, f.out_axes, f.shape) for f in factors}
        if len(kinds) != 1 or len(shapes) > 1:
            raise ValueError(
                f"'{path}': the adapters hold different things here ({sorted(kinds)}, "
                f"{len(shapes)} factor layouts); combine adapters made with the same rules."
            )
        if isinstance(first, LoraFactors):
            for f in leaves:
                require_low_rank(f, path, "combine_adapters")
            cat = _cat(leaves, weights)
            out.append(cat if method == "cat" else _svd(cat, rank, path))
        elif first is None:
            out.append(None)
        else:
            wide = wide_dtype(first.dtype)
            total = sum(x.astype(wide) * jnp.asarray(w, wide) for x, w in zip(leaves, weights))
            out.append(total.astype(first.dtype))
    treedef = jax.tree.structure(trainables[0], is_leaf=is_node)
    return jax.tree.unflatten(treedef, out)
