"""lora_apply: run any function of a parameter tree with adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax._src.core.factors import LoraFactors, column_norm
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.trees import check_pair, is_node, leaves_with_paths
from lora_jax._src.engine import interpreter as _engine
from lora_jax._src.engine.implicit import Adapted, Deferred
from lora_jax._src.multi import bank as _bank
from lora_jax._src.ops.merge import merge
from lora_jax._src.variants.glora import glora_biases, implicit_terms


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _implicit(path: str, w: Any, t: Any, bias: Any = None) -> Any:
    """The engine's input for one parameter leaf (``bias``: a GLoRA layer's bias leaf)."""
    quantised = isinstance(w, QuantizedArray)
    if not isinstance(t, LoraFactors):
        if quantised:
            return Adapted(Deferred(w), None, None, (), (), 1.0, w.shape, w.dtype, path)
        return w
    b, col, shift, base = t.effective_b(), None, None, Deferred(w) if quantised else w
    if t.glora is not None:
        # GLoRA: W = base * col + B, plus a per-column shift (its bias terms).
        base, col, shift = implicit_terms(w, t, bias)
        if isinstance(base, QuantizedArray):
            base = Deferred(base)
    elif t.magnitude is not None:
        # DoRA: W = m * (W0 + dW) / ||W0 + dW||; the norm is a constant in the backward pass.
        norm = jax.lax.stop_gradient(column_norm(w.dequantize() if quantised else w, t))
        col = t.magnitude.astype(norm.dtype) / norm
        ns = len(t.stack_axes)
        b = b * col.reshape(col.shape[:ns] + (1,) + col.shape[ns:]).astype(b.dtype)
    columns = t.stack_axes + t.out_axes
    return Adapted(
        base=base,
        a=t.a,
        b=b,
        a_axes=t.stack_axes + t.in_axes + (None,),
        b_axes=t.stack_axes + (None,) + t.out_axes,
        col=col,
        col_axes=columns if col is not None else (),
        shift=shift,
        shift_axes=columns if shift is not None else (),
        scale=t.scale,
        shape=tuple(w.shape),
        dtype=w.dtype,
        path=path,
        dropout=t.dropout,
    )


def lora_apply(
    fn: Callable, *, argnum: int = 0, materialize: bool = False, strict: bool = False
) -> Callable:
    """Turn ``fn(params, *args)`` into ``fn(frozen, trainable, *args, rng=None)``.

    By default (factored mode) each call traces ``fn`` (once per compilation when the
    call sits inside ``jax.jit``, as a training step does) and re-runs it with
    every adapted weight kept implicit: each use computes ``x @ W0 + scale * ((x @ a) @ b)``
    (and the matching forms for einsums, convolutions, embedding lookups, scanned stacks
    and quantised bases), so ``W0 + scale * a @ b`` is never formed and no gradient of a
    weight's full shape exists. A use that cannot be factored is materialised at that point
    only, with a :class:`LoraMaterializeWarning` naming the path and operation
    (``strict=True`` raises :class:`LoraFactoringError` instead). ``materialize=True``
    rebuilds every effective weight first: the reference oracle.

    Args:
        fn: a function taking the parameter tree at position ``argnum``.
        argnum: position of the parameter tree among ``fn``'s arguments.
        materialize: rebuild ``W0 + scale * a @ b`` before calling ``fn``.
        strict: raise instead of materialising an unfactorable use.

    Returns:
        ``wrapped(frozen, trainable, *args, rng=None, **kwargs)``; ``rng`` enables the
        rules' LoRA dropout on the adapter branch (deterministic when omitted). With an
        :class:`AdapterBank` as ``trainable``, ``adapter_ids=`` picks a slot per example
        (see :func:`lora_jax.stack_adapters`).

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"w": jnp.ones((3, 2))}
        >>> frozen, trainable = lj.split(params, [lj.LoraRule("w", rank=1)], key=jax.random.key(0))
        >>> trainable["w"] = trainable["w"].with_factors(jnp.ones((3, 1)), jnp.ones((1, 2)))
        >>> apply = lj.lora_apply(lambda p, x: x @ p["w"])
        >>> apply(frozen, trainable, jnp.ones((1, 3)))  # 3 + (alpha / r) * 3 = 3 + 2 * 3
        Array([[9., 9.]], dtype=float32)
    """

    if not callable(fn):
        raise TypeError(f"lora_apply: fn={fn!r} is not callable; pass the model's apply function.")

    @functools.wraps(fn)
    def wrapped(frozen: Any, trainable: Any, *args: Any, rng: jax.Array | None = None, **kw):
        if not 0 <= argnum <= len(args):
            raise ValueError(
                f"lora_apply: argnum={argnum} but the call has {len(args)} positional "
                f"argument(s) after (frozen, trainable); argnum is the position of the params "
                f"among fn's arguments."
            )
        if "adapter_ids" in kw or isinstance(trainable, _bank.AdapterBank):
            ids, axes = kw.pop("adapter_ids", None), kw.pop("adapter_in_axes", None)
            return _bank.apply_bank(wrapped, frozen, trainable, args, kw, ids, rng, axes)
        check_pair(frozen, trainable)
        call = lambda params, args, kw: fn(*args[:argnum], params, *args[argnum:], **kw)
        if materialize:
            if rng is not None and any(
                isinstance(t, LoraFactors) and t.dropout > 0
                for _, t in leaves_with_paths(trainable)
            ):
                raise ValueError(
                    "LoRA dropout needs the factored engine; use materialize=False or no rng."
                )
            return call(merge(frozen, trainable), args, kw)

        f_items, t_items = leaves_with_paths(frozen), leaves_with_paths(trainable)
        biases = glora_biases(f_items, t_items)
        params_leaves = [
            t if w is None else _implicit(p, w, t, biases.get(p))
            for (p, w), (_, t) in zip(f_items, t_items)
        ]
        treedef = jax.tree.structure(frozen, is_leaf=is_node)
        dyn_leaves, dyn_tree = jax.tree.flatten((args, kw))
        dynamic = [i for i, x in enumerate(dyn_leaves) if _is_array(x)]

        def traced(param_vals, dyn_vals):
            leaves = list(dyn_leaves)
            for i, x in zip(dynamic, dyn_vals):
                leaves[i] = x
            a, k = jax.tree.unflatten(dyn_tree, leaves)
            return call(jax.tree.unflatten(treedef, param_vals), a, k)

        abstract = [
            jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, Adapted) else x
            for x in params_leaves
        ]
        closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(
            abstract, [dyn_leaves[i] for i in dynamic]
        )
        ctx = _engine.Context(strict=strict, rng=rng)
        inputs = params_leaves + [dyn_leaves[i] for i in dynamic]
        outs = _engine.run_closed(closed, inputs, ctx)
        outs = [ctx.fallback(o, "output") if isinstance(o, Adapted) else o for o in outs]
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped
