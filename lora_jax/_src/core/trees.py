"""Walking (frozen, trainable) pairs: leaf predicate, paths, and the pair check.

``frozen`` mirrors the parameter tree with ``None`` at fully trained leaves;
``trainable`` mirrors it with a :class:`LoraFactors` at adapted leaves, the
array at fully trained leaves and ``None`` elsewhere.

Any pytree works (dicts, NamedTuples, Flax ``nnx.State`` and NNX modules, linen
``Partitioned`` boxes, Equinox modules, custom nodes): ``None`` is walked as a leaf
so the frozen and trainable trees keep the parameter tree's exact structure.
A ``None`` the user's tree already had (a bias-free layer, an ``eqx.partition``
hole) is ``None`` in both trees, a fully trained leaf only in ``frozen``; leaves
that are not arrays (an Equinox module's activation function, a Python number)
are *static*: kept in ``frozen`` as they are and never traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import path_str


def is_node(x: Any) -> bool:
    """Leaves of a frozen/trainable tree: None holes, factors and quantised arrays."""
    return x is None or isinstance(x, LoraFactors | QuantizedArray)


def is_weight(x: Any) -> bool:
    """Array-like leaves (arrays, quantised arrays, ShapeDtypeStructs): what can be traced."""
    return x is not None and hasattr(x, "shape") and hasattr(x, "dtype")


def is_static(x: Any) -> bool:
    """Leaves that are neither holes nor arrays: carried along untouched, never traced."""
    return x is not None and not is_weight(x) and not isinstance(x, LoraFactors)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
    return [(path_str(p), leaf) for p, leaf in flat]


def check_pair(frozen: Any, trainable: Any) -> None:
    """Raise if ``trainable`` does not fit ``frozen``, naming the first differing path."""
    for name, tree in (("frozen", frozen), ("trainable", trainable)):
        if tree is None:
            raise ValueError(f"{name} is None; pass the (frozen, trainable) pair from lj.split.")
    f_items = leaves_with_paths(frozen)
    t_items = leaves_with_paths(trainable)
    f_paths = [p for p, _ in f_items]
    t_paths = [p for p, _ in t_items]
    if f_paths != t_paths:
        for i, (fp, tp) in enumerate(zip(f_paths + [None], t_paths + [None])):
            if fp != tp:
                raise ValueError(
                    f"trainable tree does not match frozen tree: at leaf {i} frozen has "
                    f"{fp!r} but trainable has {tp!r}; pass the pair returned by the same "
                    f"lj.split call."
                )
    for path, (_, w), (_, t) in zip(f_paths, f_items, t_items):
        if isinstance(t, LoraFactors):
            if w is None:
                raise ValueError(f"'{path}': trainable has factors but frozen has no weight.")
            if not jnp.issubdtype(w.dtype, jnp.floating):
                raise TypeError(
                    f"'{path}': the base is {w.dtype} but has factors; only floating-point "
                    f"weights can be adapted (cast the base or drop these factors)."
                )
            if tuple(w.shape) != t.shape:
                raise ValueError(
                    f"'{path}': factors a{tuple(t.a.shape)}, b{tuple(t.b.shape)} adapt a "
                    f"weight of shape {t.shape}, but the frozen weight has shape "
                    f"{tuple(w.shape)}; the adapter was made for a different base."
                )
            if jnp.dtype(t.a.dtype).itemsize > max(jnp.dtype(w.dtype).itemsize, 4):
                raise ValueError(
                    f"'{path}': factors are {t.a.dtype} but the base is {w.dtype}; applying "
                    f"them would upcast the base. Use param_dtype=float32 (or the base dtype)."
                )
        elif t is not None and w is not None:
            raise ValueError(
                f"'{path}': trainable holds a fully trained array but frozen also holds one; "
                f"frozen must have None where a leaf is trained fully."
            )


def map_pair(fn: Callable[[Any, Any], Any], frozen: Any, trainable: Any) -> Any:
    """``fn(frozen_leaf, trainable_leaf)`` over the pair's leaves, keeping frozen's structure."""
    return jax.tree.map(fn, frozen, trainable, is_leaf=is_node)
