"""lora_apply: run any function of a parameter tree with adapted weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.explicit import explicit_axes
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.trees import check_pair, is_node, is_weight, leaves_with_paths
from lora_jax._src.engine import interpreter as _engine
from lora_jax._src.engine.implicit import Adapted, Deferred
from lora_jax._src.ops.merge import merge


def _dense(w: Any) -> Any:
    return w.dequantize() if isinstance(w, QuantizedArray) else w


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _abstract(x: Adapted) -> jax.ShapeDtypeStruct:
    """The type ``fn`` is traced with for one adapted weight: shape, dtype and sharding.

    The sharding is the one ``jax.jit`` would give the dense weight, so that on a mesh with
    Explicit axes (``jax.make_mesh``'s default) the traced program's types match the values
    the engine later computes from the base and the factors.
    """
    if isinstance(x.base, Deferred):  # the dequantised type, traced only where it matters
        if not explicit_axes(jax.typeof(x.base.q.codes_array)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        dense = jax.eval_shape(x.base.value)
    else:
        dense = jax.typeof(x.base)
    sharding = dense.sharding if tuple(dense.shape) == tuple(x.shape) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _implicit(path: str, w: Any, t: Any, frozen_at: Callable[[str], Any]) -> Any:
    """The engine's input for one parameter leaf: its variants' terms, kept implicit."""
    quantised = isinstance(w, QuantizedArray)
    if not isinstance(t, LoraFactors):
        if quantised:
            return Adapted(Deferred(w), None, None, (), (), 1.0, w.shape, w.dtype, path)
        return w
    a, b = t.low_rank()
    terms = _variant.Terms(base=w, a=a, b=b)
    for v in _variant.present(t):  # e.g. W = base * col + B, plus a per-column output shift
        terms = v.terms(t, terms, frozen_at)
    base = Deferred(terms.base) if isinstance(terms.base, QuantizedArray) else terms.base
    columns = t.stack_axes + t.out_axes
    return Adapted(
        base=base,
        a=terms.a,
        b=terms.b,
        a_axes=t.stack_axes + t.in_axes + (None,),
        b_axes=t.stack_axes + (None,) + t.out_axes,
        col=terms.col,
        col_axes=columns if terms.col is not None else (),
        shift=terms.shift,
        shift_axes=columns if terms.shift is not None else (),
        scale=t.scale,
        shape=tuple(w.shape),
        dtype=w.dtype,
        path=path,
        dropout=t.dropout,
    )


def lora_apply(
    fn: Callable, *, argnum: int = 0, materialize: bool = False, strict: bool = False
) -> Callable:
    """Turn ``fn(params, *args)`` into ``fn(frozen, trainable, *args, lora_rng=None)``.

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
        ``wrapped(frozen, trainable, *args, lora_rng=None, **kwargs)``; ``lora_rng`` (a PRNG
        key) enables the rules' LoRA dropout on the adapter branch (deterministic when
        omitted). Every other keyword, ``rng`` included, reaches ``fn``. Leaves of
        ``frozen`` that are not arrays (an Equinox module's functions) reach ``fn`` as they
        are, never traced. With an
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
    def wrapped(frozen: Any, trainable: Any, *args: Any, lora_rng: jax.Array | None = None, **kw):
        if not 0 <= argnum <= len(args):
            raise ValueError(
                f"lora_apply: argnum={argnum} but the call has {len(args)} positional "
                f"argument(s) after (frozen, trainable); argnum is the position of the params "
                f"among fn's arguments."
            )
        if "adapter_ids" in kw or hasattr(trainable, "lora_apply_bank"):
            # An adapter bank runs the call itself (the protocol keeps ops below multi).
            ids, axes = kw.pop("adapter_ids", None), kw.pop("adapter_in_axes", None)
            if not hasattr(trainable, "lora_apply_bank"):
                raise TypeError(
                    f"adapter_ids= needs an AdapterBank as the trainable argument, got "
                    f"{type(trainable).__name__}; build one with lj.stack_adapters([trainable, "
                    f"...])."
                )
            return trainable.lora_apply_bank(wrapped, frozen, args, kw, ids, lora_rng, axes)
        check_pair(frozen, trainable)
        call = lambda params, args, kw: fn(*args[:argnum], params, *args[argnum:], **kw)
        if materialize:
            if lora_rng is not None and any(
                isinstance(t, LoraFactors) and t.dropout > 0
                for _, t in leaves_with_paths(trainable)
            ):
                raise ValueError(
                    "LoRA dropout needs the factored engine; use materialize=False or no lora_rng."
                )
            return call(merge(frozen, trainable), args, kw)

        f_items, t_items = leaves_with_paths(frozen), leaves_with_paths(trainable)
        frozen_at = dict(f_items).get
        dense_at = lambda p: _dense(frozen_at(p))  # noqa: E731
        params_leaves = [
            t if w is None else _implicit(p, w, t, dense_at)
            for (p, w), (_, t) in zip(f_items, t_items)
        ]
        treedef = jax.tree.structure(frozen, is_leaf=is_node)
        traced_params = [i for i, x in enumerate(params_leaves) if is_weight(x)]
        dyn_leaves, dyn_tree = jax.tree.flatten((args, kw))
        dynamic = [i for i, x in enumerate(dyn_leaves) if _is_array(x)]

        def fill(leaves, where, values):
            leaves = list(leaves)
            for i, x in zip(where, values):
                leaves[i] = x
            return leaves

        def traced(param_vals, dyn_vals):
            a, k = jax.tree.unflatten(dyn_tree, fill(dyn_leaves, dynamic, dyn_vals))
            params = fill(params_leaves, traced_params, param_vals)
            return call(jax.tree.unflatten(treedef, params), a, k)

        inputs = [params_leaves[i] for i in traced_params]
        abstract = [_abstract(x) if isinstance(x, Adapted) else x for x in inputs]
        closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(
            abstract, [dyn_leaves[i] for i in dynamic]
        )
        ctx = _engine.Context(strict=strict, rng=lora_rng)
        inputs = inputs + [dyn_leaves[i] for i in dynamic]
        outs = _engine.run_closed(closed, inputs, ctx)
        outs = [ctx.fallback(o, "output") if isinstance(o, Adapted) else o for o in outs]
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped
