"""Tree-level quantisation of a frozen base, and an exact memory report for a fine-tuning setup."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.nbytes import array_bytes, tree_bytes
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import LoraRule
from lora_jax._src.core.trees import is_node, leaves_with_paths
from lora_jax._src.quant.int4 import quantize_int4
from lora_jax._src.quant.nf4 import quantize_nf4

FORMATS = ("nf4", "int4")
Selector = str | LoraRule | Sequence[str | LoraRule] | Callable[[str, Any], bool]


def select_leaves(
    select: Selector, paths: list[str], leaves: list[Any]
) -> list[LoraRule | str | None]:
    """The rule (or True marker) selecting each leaf, None where none does."""
    if callable(select) and not isinstance(select, LoraRule):
        return ["" if select(p, w) else None for p, w in zip(paths, leaves)]
    if not isinstance(select, str | LoraRule | list | tuple):
        raise TypeError(
            f"quantize: select must be regex strings, LoraRules or a predicate(path, leaf), "
            f"got {type(select).__name__}."
        )
    items = [select] if isinstance(select, str | LoraRule) else list(select)
    patterns = []
    for item in items:
        pattern = item.pattern if isinstance(item, LoraRule) else item
        if not isinstance(pattern, str):
            raise TypeError(
                f"quantize: select must be regex strings, LoraRules or a predicate(path, leaf), "
                f"got {type(item).__name__}."
            )
        try:
            patterns.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(
                f"quantize: select pattern {pattern!r} is not a valid regex ({e})."
            ) from None
    chosen, used = [], [False] * len(items)
    for path in paths:
        for i, regex in enumerate(patterns):
            if regex.fullmatch(path):
                chosen.append(items[i])
                used[i] = True
                break
        else:
            chosen.append(None)
    unused = [patterns[i].pattern for i, u in enumerate(used) if not u]
    if unused:
        sample = ", ".join(repr(p) for p in paths[:6])
        raise ValueError(
            f"quantize: pattern(s) {unused} matched no leaf (re.fullmatch on '/'-joined paths "
            f"such as {sample}); fix the pattern or drop it."
        )
    return chosen


def _stack_count(stack_axes: Any, chosen: Any, path: str, w: Any) -> int:
    if stack_axes is None:
        axes = chosen.stack_axes if isinstance(chosen, LoraRule) else None
        return 0 if axes is None else len(axes)
    k = stack_axes(path, w) if callable(stack_axes) else stack_axes
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"quantize: stack_axes for '{path}' is {k!r}; expected an int >= 0.")
    return k


def quantize_leaf(
    path: str, w: Any, stack_count: int, format: str, block_size: int, double_quant: bool
) -> QuantizedArray:
    """One selected leaf of :func:`quantize` (its checks and errors named by ``path``)."""
    if isinstance(w, QuantizedArray | LoraFactors):
        raise TypeError(
            f"quantize: '{path}' is already a {type(w).__name__}; narrow the selection "
            f"to dense weights."
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"quantize: '{path}' has dtype {w.dtype}; only float weights can be quantised. "
            f"Narrow the selection."
        )
    k = stack_count
    if len(w.shape) - k < 2:
        raise ValueError(
            f"quantize: '{path}' has shape {tuple(w.shape)} with stack_axes={k}: only "
            f"matrices (2 or more dims per layer) are quantised; exclude biases and norms."
        )
    try:
        if format == "nf4":
            return quantize_nf4(w, block_size=block_size, double_quant=double_quant, stack_axes=k)
        return quantize_int4(w, block_size=block_size, stack_axes=k)
    except (TypeError, ValueError) as e:
        raise type(e)(f"'{path}': {e}") from e


def quantize(
    frozen: Any,
    select: Selector,
    *,
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    stack_axes: int | Callable[[str, Any], int] | None = None,
) -> Any:
    """Replace the selected leaves of a frozen tree by quantised arrays.

    Args:
        frozen: a parameter or frozen tree (arrays, ``None`` holes, or ShapeDtypeStructs
            under ``jax.eval_shape``).
        select: regex pattern(s) matched with ``re.fullmatch`` on "/"-joined paths (first
            match wins; a pattern matching nothing raises), :class:`LoraRule` s (their
            patterns), or a ``predicate(path, leaf) -> bool``. ``None`` leaves are skipped.
        format: ``"nf4"`` (:func:`quantize_nf4`) or ``"int4"`` (:func:`quantize_int4`).
        block_size: elements per scale block.
        double_quant: quantise NF4 scales too (NF4 only).
        stack_axes: leading axes indexing stacked layers (``(L, in, out)`` kernels: 1), as
            an int or ``fn(path, leaf) -> int``; by default a matching LoraRule's
            ``stack_axes`` count, else 0.

    Returns:
        ``frozen`` with each selected leaf replaced by an ``NF4Array`` / ``Int4Array``.

    Example:
        >>> import jax.numpy as jnp, lora_jax as lj
        >>> params = {"q": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)}}
        >>> qp = lj.quantize(params, r".*/kernel")
        >>> type(qp["q"]["kernel"]).__name__, qp["q"]["bias"].shape
        ('NF4Array', (64,))
    """
    if format not in FORMATS:
        raise ValueError(f"quantize: format={format!r} is not one of {FORMATS}.")
    items = leaves_with_paths(frozen)
    paths = [p for p, _ in items]
    leaves = [w for _, w in items]
    chosen = select_leaves(select, paths, leaves)
    out, count = [], 0
    for path, w, rule in zip(paths, leaves, chosen):
        if rule is None or w is None:
            out.append(w)
            continue
        k = _stack_count(stack_axes, rule, path, w)
        out.append(quantize_leaf(path, w, k, format, block_size, double_quant))
        count += 1
    if count == 0:
        raise ValueError("quantize: the selection picked no weight (only None leaves or none).")
    treedef = jax.tree.structure(frozen, is_leaf=is_node)
    return jax.tree.unflatten(treedef, out)


def _size(b: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:9.2f} {unit}"
    return f"{b:9d} B  "


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Exact bytes of a fine-tuning setup's persistent state (activations excluded)."""

    frozen_bytes: int  # the whole frozen base, quantised arrays by their packed fields
    quantized_bytes: int  # the part of frozen_bytes held by quantised arrays
    quantized_params: int  # logical weights stored quantised
    frozen_params: int  # logical weights in the frozen base
    trainable_bytes: int  # factors and fully trained leaves
    trainable_params: int
    gradient_bytes: int  # one gradient per trainable leaf, in its dtype
    optimizer_bytes: int  # every array in the optimiser state

    @property
    def total_bytes(self) -> int:
        return self.frozen_bytes + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def quantized_bits_per_weight(self) -> float | None:
        if not self.quantized_params:
            return None
        return 8 * self.quantized_bytes / self.quantized_params

    def __str__(self) -> str:
        bits = self.quantized_bits_per_weight
        quant = (
            ""
            if bits is None
            else (f"  ({self.quantized_params:,} weights quantised at {bits:.3f} bits)")
        )
        rows = [
            ("frozen base", self.frozen_bytes, f"{self.frozen_params:,} params{quant}"),
            ("trainable", self.trainable_bytes, f"{self.trainable_params:,} params"),
            ("gradients", self.gradient_bytes, ""),
            ("optimizer state", self.optimizer_bytes, ""),
            ("total", self.total_bytes, "activations not included"),
        ]
        return "\n".join(f"{name:<16}{_size(b)}  {note}".rstrip() for name, b, note in rows)


def memory_report(
    frozen: Any, trainable: Any = None, *, optimizer_state: Any = None
) -> MemoryReport:
    """Exact memory of the frozen base, the trainable leaves, their gradients and optimiser state.

    Works on concrete arrays and on abstract trees from ``jax.eval_shape`` alike.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}
        >>> rules = [lj.LoraRule("w", rank=64)]
        >>> frozen, trainable = jax.eval_shape(
        ...     lambda p: lj.split(p, rules, key=jax.random.key(0)), params)
        >>> frozen = jax.eval_shape(lambda f: lj.quantize(f, "w"), frozen)
        >>> opt = jax.eval_shape(optax.adam(1e-4).init, trainable)
        >>> r = lj.memory_report(frozen, trainable, optimizer_state=opt)
        >>> round(r.quantized_bits_per_weight, 3), r.trainable_bytes, r.optimizer_bytes
        (4.127, 2097152, 4194308)
    """
    frozen_bytes = quantized_bytes = quantized_params = frozen_params = 0
    for _, w in leaves_with_paths(frozen):
        if w is None or not hasattr(w, "shape"):
            continue
        b = tree_bytes(w) if isinstance(w, QuantizedArray) else array_bytes(w)
        frozen_bytes += b
        frozen_params += math.prod(w.shape)
        if isinstance(w, QuantizedArray):
            quantized_bytes += b
            quantized_params += math.prod(w.shape)
    trainable_params = 0
    for _, t in leaves_with_paths(trainable):
        if isinstance(t, LoraFactors):
            trainable_params += math.prod(t.a.shape) + math.prod(t.b.shape)
        elif t is not None:
            trainable_params += math.prod(t.shape)
    trainable_bytes = tree_bytes(trainable)
    return MemoryReport(
        frozen_bytes=frozen_bytes,
        quantized_bytes=quantized_bytes,
        quantized_params=quantized_params,
        frozen_params=frozen_params,
        trainable_bytes=trainable_bytes,
        trainable_params=trainable_params,
        gradient_bytes=trainable_bytes,
        optimizer_bytes=tree_bytes(optimizer_state),
    )
