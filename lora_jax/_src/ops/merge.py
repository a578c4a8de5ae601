"""merge, unmerge, combine and parameter counts on (frozen, trainable) pairs.

``frozen`` mirrors the parameter tree with ``None`` at fully trained leaves;
``trainable`` mirrors it with a :class:`LoraFactors` at adapted leaves, the
array at fully trained leaves and ``None`` elsewhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors, bare, expand_columns, lora_delta, wide_dtype
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import path_str
from lora_jax._src.core.trees import check_pair, is_node, leaves_with_paths, map_pair


def _dense(w: Any) -> Any:
    return w.dequantize() if isinstance(w, QuantizedArray) else w


def _terms(w: Any, t: LoraFactors, frozen_at: Any) -> _variant.Terms:
    a, b = t.low_rank()
    terms = _variant.Terms(base=w, a=a, b=b)
    for v in _variant.present(t):
        terms = v.terms(t, terms, frozen_at)
    return terms


def merged_weight(dense: Any, t: LoraFactors, frozen_at: Any, path: str) -> Any:
    """The dense weight of one adapted leaf: a variant's own form, else built from its terms."""
    for v in _variant.present(t):
        out = v.merged(dense, t)
        if out is not None:
            return out
    terms = _terms(dense, t, frozen_at)
    if terms.shift is not None:
        raise ValueError(
            f"'{path}': a variant adds an output shift to this weight but does not fold it into "
            f"another leaf when merging (Variant.merged_others); it cannot be merged."
        )
    wide = wide_dtype(dense.dtype, t.a.dtype)
    base = _dense(terms.base).astype(wide)
    if terms.col is not None:
        base = base * expand_columns(terms.col.astype(wide), t)
    return (base + lora_delta(bare(t, terms.a, terms.b), wide)).astype(dense.dtype)


def merge(frozen: Any, trainable: Any, *, requantize: bool = False) -> Any:
    """A plain parameter tree: ``W0 + scale * a @ b`` at adapted leaves, trained leaves filled in.

    DoRA and GLoRA leaves get their dense weights; GLoRA's bias terms are folded into the
    layer's bias leaf. Each merged weight keeps the base's dtype (the sum is formed in float32
    or wider).
    Every quantised leaf is dequantised. With ``requantize=True`` quantised leaves stay
    quantised (an adapted one is quantised again in the base's format) and
    ``(merged, errors)`` is returned, where ``errors`` maps each requantised path to the
    relative Frobenius error ``||Q(W) - W|| / ||W||`` that requantising introduced. Example:

        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
        >>> frozen, trainable = lj.split(params, [lj.LoraRule(".*kernel", rank=2)],
        ...                              key=jax.random.key(0))
        >>> t = trainable["dense"]["kernel"]  # b starts at zero; give both factors values
        >>> trainable["dense"]["kernel"] = t.with_factors(jnp.ones((4, 2)), jnp.ones((2, 3)))
        >>> lj.merge(frozen, trainable)["dense"]["kernel"][0]  # 1 + (alpha / r) * 2 = 1 + 2 * 2
        Array([5., 5., 5.], dtype=float32)
    """
    check_pair(frozen, trainable)
    errors: dict[str, jax.Array] = {}
    frozen_items = dict(leaves_with_paths(frozen))
    dense_at = lambda p: _dense(frozen_items.get(p))  # noqa: E731  (None stays None)

    def leaf(path, w, t):
        if not isinstance(t, LoraFactors):
            if w is None:
                return t
            return w if requantize else _dense(w)  # unadapted quantised leaves too
        out = merged_weight(_dense(w), t, dense_at, path)
        if requantize and isinstance(w, QuantizedArray):
            q = w.quantize_like(out)
            diff = (q.dequantize(jnp.float32) - out.astype(jnp.float32)).ravel()
            errors[path] = jnp.linalg.norm(diff) / jnp.linalg.norm(out.astype(jnp.float32))
            return q
        return out

    flat_f, treedef = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_node)
    flat_t = treedef.flatten_up_to(trainable)
    paths = [path_str(p) for p, _ in flat_f]
    out = [leaf(path, w, t) for path, (_, w), t in zip(paths, flat_f, flat_t)]
    index = {p: i for i, p in enumerate(paths)}
    for (_, w), t in zip(flat_f, flat_t):  # terms folded into other leaves (GLoRA's bias)
        if isinstance(t, LoraFactors):
            for v in _variant.present(t):
                for p, x in v.merged_others(t, _dense(w), dense_at).items():
                    out[index[p]] = x
    merged = jax.tree.unflatten(treedef, out)
    return (merged, errors) if requantize else merged


def dora_norms(frozen: Any, trainable: Any) -> Any:
    """Per-column norms ``||W0 + dW||`` of every DoRA leaf (None elsewhere), for :func:`unmerge`.

    In general: what each variant needs to unmerge a leaf (:meth:`Variant.unmerge_state`).
    """

    def leaf(w, t):
        if isinstance(t, LoraFactors):
            states = [v.unmerge_state(_dense(w), t) for v in _variant.present(t)]
            return next((x for x in states if x is not None), None)
        return None

    return map_pair(leaf, frozen, trainable)


def unmerge(merged: Any, trainable: Any, *, dora_norms: Any = None) -> Any:
    """Inverse of :func:`merge`: subtract each update and drop the fully trained leaves.

    Exact up to rounding in the base dtype (float32: ~1 ulp of ``|W0| + |delta|``).
    DoRA leaves also need the column norms that merging divided out:
    ``dora_norms=lj.dora_norms(frozen, trainable)``, computed before merging.
    """
    norms = {}
    if dora_norms is not None:
        norms = {p: n for p, n in leaves_with_paths(dora_norms) if n is not None}

    def leaf(path, w, t):
        if isinstance(t, LoraFactors):
            if tuple(w.shape) != t.shape:
                raise ValueError(
                    f"'{path}': merged weight of shape {tuple(w.shape)} does not match factors "
                    f"adapting shape {t.shape}; pass the tree returned by lj.merge."
                )
            for v in _variant.present(t):
                out = v.unmerged(w, t, norms.get(path), path)
                if out is not None:
                    return out
            wide = wide_dtype(w.dtype, t.a.dtype)
            terms = _terms(w, t, lambda _: None)
            full = w.astype(wide) - lora_delta(bare(t, terms.a, terms.b), wide)
            if terms.col is not None:
                full = full / expand_columns(terms.col.astype(wide), t)
            return full.astype(w.dtype)
        return None if t is not None else w

    paths = [p for p, _ in leaves_with_paths(trainable)]
    m_paths = [p for p, _ in leaves_with_paths(merged)]
    if len(paths) != len(m_paths):
        raise ValueError(
            f"merged tree has {len(m_paths)} leaves but trainable has {len(paths)}; "
            f"pass the tree returned by lj.merge."
        )
    for i, (mp, tp) in enumerate(zip(m_paths, paths)):
        if mp != tp:
            raise ValueError(
                f"merged tree does not match trainable: at leaf {i} merged has {mp!r} but "
                f"trainable has {tp!r}; pass the tree returned by lj.merge."
            )
    flat_m, treedef = jax.tree_util.tree_flatten_with_path(merged, is_leaf=is_node)
    flat_t = treedef.flatten_up_to(trainable)
    out = [leaf(path_str(p), w, t) for (p, w), t in zip(flat_m, flat_t)]
    index = {p: i for i, p in enumerate(paths)}
    merged_at = {path_str(p): w for p, w in flat_m}.get
    for i, t in enumerate(flat_t):  # other leaves, unmerged with the recovered W0 (GLoRA's bias)
        if isinstance(t, LoraFactors):
            for v in _variant.present(t):
                for p, x in v.unmerged_others(t, out[i], merged_at).items():
                    out[index[p]] = x
    return jax.tree.unflatten(treedef, out)


def combine(frozen: Any, trainable: Any) -> Any:
    """The frozen tree with fully trained leaves filled in (factors are not applied)."""
    return map_pair(lambda w, t: t if w is None else w, frozen, trainable)


def factor_params(t: LoraFactors) -> int:
    """Trainable scalars of one factors leaf: a, b and any magnitude/singular/GLoRA parts."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))


def count_params(tree: Any) -> int:
    """Number of scalars in a tree (factors count all their arrays; quantised arrays their
    logical size)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_node):
        if isinstance(leaf, LoraFactors):
            total += factor_params(leaf)
        elif isinstance(leaf, QuantizedArray) or hasattr(leaf, "shape"):
            total += int(np.prod(leaf.shape))
    return total
