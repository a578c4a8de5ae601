"""Quantise while loading: each selected weight becomes NF4 as soon as its tensor is read.

A loader hands :func:`quantizing_converter` to :func:`~lora_jax.models._hf.build_tree`,
which reads one tensor at a time. A selected unstacked weight is quantised on arrival;
a stacked weight (``(layers, in, out)``) is quantised one layer at a time into
preallocated ``(layers, ...)`` buffers of the quantised fields. Peak memory is thus the
quantised model plus about one full-precision tensor (and its float32 copy), never the
full-precision model.

Every layer is quantised on its own, as ``lj.quantize(params, select, stack_axes=1)``
quantises a stacked leaf, and the NF4 arithmetic does not depend on batch axes
(``pairwise_sum``, no fused multiply-adds; see ``lora_jax/_src/quant/nf4.py``), so the
result is bit-identical to quantising the fully loaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.trees import leaves_with_paths
from lora_jax._src.quant.tree import Selector, quantize_leaf, select_leaves


def _dense(w: np.ndarray, dtype: Any) -> jax.Array:
    return jnp.asarray(w, dtype)


def quantizing_converter(
    select: Selector | None,
    abstract: Any,
    dtype: Any,
    *,
    block_size: int = 64,
    double_quant: bool = True,
) -> Callable[[str, list, bool], Any]:
    """A ``build_tree`` converter casting leaves to ``dtype`` and NF4-quantising selected ones.

    Args:
        select: what :func:`lora_jax.quantize` takes (regexes, LoraRules, or a predicate,
            called with the leaf's ``jax.ShapeDtypeStruct``); None quantises nothing.
        abstract: the model's parameter tree as ShapeDtypeStructs (paths and shapes).
        dtype: cast every leaf to this dtype before quantising (None: the stored dtype).
        block_size: NF4 block size.
        double_quant: quantise the block scales too.

    Returns:
        ``convert(path, layers, stacked)`` for :func:`~lora_jax.models._hf.build_tree`.
    """
    items = leaves_with_paths(abstract)
    paths = [p for p, _ in items]
    chosen = (
        [None] * len(paths)
        if select is None
        else select_leaves(select, paths, [w for _, w in items])
    )
    selected = {p for p, rule in zip(paths, chosen) if rule is not None}

    def one(path: str, w: np.ndarray) -> Any:
        return quantize_leaf(path, _dense(w, dtype), 0, "nf4", block_size, double_quant)

    def convert(path: str, layers: list[Callable[[], np.ndarray]], stacked: bool) -> Any:
        if path not in selected:
            if not stacked:
                return _dense(layers[0](), dtype)
            first = _dense(layers[0](), dtype)
            out = np.empty((len(layers), *first.shape), first.dtype)
            out[0] = first
            del first
            for i, read in enumerate(layers[1:], start=1):
                out[i] = np.asarray(read()).astype(out.dtype)
            return jnp.asarray(out)
        if not stacked:
            return one(path, layers[0]())
        q = one(path, layers[0]())
        # The quantised fields of every layer, filled in place: (layers, *field shape).
        buffers = jax.tree.map(lambda x: np.empty((len(layers), *x.shape), x.dtype), q)
        for i, read in enumerate(layers):
            if i:
                q = one(path, read())
            jax.tree.map(lambda buf, x, i=i: buf.__setitem__(i, np.asarray(x)), buffers, q)
        return jax.tree.map(jnp.asarray, buffers)

    return convert
