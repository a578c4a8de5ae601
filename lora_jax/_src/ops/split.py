"""split: turn a parameter tree and rules into a frozen base and trainable factors."""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.factors import LoraFactors, column_norm, lora_delta, wide_dtype
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import LoraRule, is_principal_init, match_rules
from lora_jax._src.core.trees import is_node, is_weight, leaves_with_paths
from lora_jax._src.variants.glora import bias_path_for, make_parts
from lora_jax._src.variants.pissa import principal_factors

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (stack, in, out)


def _normalise(axes: tuple[int, ...], ndim: int, path: str, name: str) -> tuple[int, ...]:
    out = []
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ValueError(f"'{path}': {name}={axes} has axis {ax} out of range for {ndim} dims.")
        out.append(ax % ndim)
    return tuple(out)


def resolve_axes(path: str, shape: tuple[int, ...], rule: LoraRule, inferred: Axes | None) -> Axes:
    """Decide (stack_axes, in_axes, out_axes) of one weight from its rule or the inferred use."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"'{path}' has shape {shape}: LoRA needs a weight of at least 2 dims; "
            f"use LoraRule(..., full=True) to train it fully or exclude it."
        )
    stack = None if rule.stack_axes is None else _normalise(rule.stack_axes, ndim, path, "stack")
    ins = None if rule.in_axes is None else _normalise(rule.in_axes, ndim, path, "in_axes")
    if ins is None and stack is None and inferred is not None:
        stack, ins = inferred[0], inferred[1]
    if stack is None:
        stack = inferred[0] if inferred is not None and ins is None else ()
    if ins is None:
        rest = [i for i in range(ndim) if i not in stack]
        if len(rest) == 2:
            ins = (rest[0],)
        elif inferred is not None:
            ins = inferred[1]
        else:
            raise ValueError(
                f"'{path}' has shape {shape} ({ndim} dims, stack_axes={stack}): which axes "
                f"are contracted with the input is ambiguous. Set LoraRule(in_axes=..., "
                f"stack_axes=...) or pass apply_fn= and args= to lj.split to infer them."
            )
    if stack != tuple(range(len(stack))):
        raise ValueError(f"'{path}': stack_axes={stack} must be the leading axes of {shape}.")
    if set(stack) & set(ins) or len(set(ins)) != len(ins):
        raise ValueError(f"'{path}': in_axes={ins} overlap stack_axes={stack} or repeat.")
    outs = tuple(i for i in range(ndim) if i not in stack and i not in ins)
    if not ins or not outs:
        raise ValueError(
            f"'{path}' with shape {shape}: in_axes={ins} leave no output axis; the in and out "
            f"sides must each have at least one axis."
        )
    return stack, ins, outs


def _check_key(key: Any) -> None:
    ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not ok:
        raise TypeError(f"split: key={key!r} is not a PRNG key; pass key=jax.random.key(seed).")


def _is_sharded(w: Any) -> bool:
    sharding = getattr(w, "sharding", None) if isinstance(w, jax.Array) else None
    return isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def make_factors(
    w: Any, rule: LoraRule, axes: Axes, key: jax.Array, path: str
) -> tuple[LoraFactors, Any]:
    """Factors for one weight and its frozen base.

    ``a`` random by ``rule.init`` and ``b`` zero, with ``w`` itself as the base; for
    PiSSA/OLoRA inits the principal factors and the residual ``w - scale * a @ b``.
    """
    stack, ins, outs = axes
    shape = tuple(w.shape)
    d_in = int(np.prod([shape[i] for i in ins]))
    d_out = int(np.prod([shape[i] for i in outs]))
    r = rule.rank
    if r > min(d_in, d_out):
        raise ValueError(
            f"rank={r} is larger than min(in, out)=min({d_in}, {d_out}) for '{path}' with "
            f"shape {shape} (in_axes={ins}); lower rank or exclude this weight."
        )
    s_shape = tuple(shape[i] for i in stack)
    a_shape = s_shape + tuple(shape[i] for i in ins) + (r,)
    b_shape = s_shape + (r,) + tuple(shape[i] for i in outs)
    dtype = rule.param_dtype
    b = jnp.zeros(b_shape, dtype)
    singular = None
    if rule.adalora:  # PEFT's AdaLoRA init: P, Q ~ N(0, 0.02^2), lambda = 0
        ka, kb = jax.random.split(key)
        a = 0.02 * jax.random.normal(ka, a_shape, dtype)
        b = 0.02 * jax.random.normal(kb, b_shape, dtype)
        singular = jnp.zeros(s_shape + (r,), dtype)
    elif is_principal_init(rule.init):
        a, b = principal_factors(w, rule.init, r, rule.scale, axes, key)
        a, b = a.astype(dtype), b.astype(dtype)
    elif rule.init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / r
    else:  # kaiming-uniform with a=sqrt(5), fan_in = d_in: bound 1/sqrt(d_in)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    factors = LoraFactors(
        a=a,
        b=b,
        alpha=rule.resolved_alpha,
        stack_axes=stack,
        in_axes=ins,
        out_axes=outs,
        rslora=rule.rslora,
        dropout=float(rule.dropout),
        singular=singular,
    )
    base = w
    if is_principal_init(rule.init):  # W0 = residual + scale * a @ b
        wide = wide_dtype(w.dtype, dtype)
        base = (w.astype(wide) - lora_delta(factors, wide)).astype(w.dtype)
    if rule.dora:  # magnitude starts at ||W0|| per column, so W starts at W0
        dense = base.dequantize() if isinstance(base, QuantizedArray) else base
        magnitude = column_norm(dense, factors).astype(dtype)
        factors = dataclasses.replace(factors, magnitude=magnitude)
    return factors, base


def _glora_bias(
    path: str, rule: LoraRule, leaves: dict[str, tuple[Any, LoraRule | None]]
) -> tuple[str, tuple[int, ...]] | None:
    """``(path, shape)`` of the bias beside a GLoRA weight, or None if it has none.

    ``leaves`` maps every parameter path to its leaf and the rule that matched it.
    """
    cfg = rule.glora
    want = bias_path_for(path, cfg)
    b, r = leaves.get(want, (None, None))
    if b is None:
        return None
    if r is not None and (cfg.c, cfg.d, cfg.e) != ("none", "none", "none"):
        raise ValueError(
            f"'{path}': GLoRA's bias terms adapt '{want}', but rule {r.pattern!r} also targets "
            f"it; exclude the bias from other rules or use lj.Glora(c='none', d='none', "
            f"e='none')."
        )
    return want, tuple(b.shape)


class LoraLayoutWarning(UserWarning):
    """``split`` assumed the ``(in, out)`` layout of a 2-D weight (no ``apply_fn=`` to read it)."""


def _infer(
    items: list[tuple[str, Any]],
    chosen: list[LoraRule | None],
    apply_fn: Callable | None,
    params: Any,
    args: Sequence[Any],
    kwargs: dict,
    argnum: int,
) -> dict[str, Axes]:
    """Axes of the adapted weights whose rule leaves them open, read from ``apply_fn``.

    Every such weight is looked up (2-D ones too: an ``(out, in)`` weight such as
    ``eqx.nn.Linear.weight`` is contracted on axis 1). A 2-D weight that ``apply_fn`` never
    contracts, or every 2-D weight when there is no ``apply_fn``, is assumed ``(in, out)``,
    and one :class:`LoraLayoutWarning` lists them.
    """
    ndim = {
        p: len(w.shape)
        for (p, w), r in zip(items, chosen)
        if r is not None
        and not r.full
        and r.in_axes is None
        and (len(w.shape) > 2 or r.stack_axes is None)
    }
    wanted = list(ndim)
    inferred: dict[str, Axes] = {}
    if apply_fn is not None and wanted:
        from lora_jax._src.engine.infer import infer_axes  # the engine sits above this module

        two_d = [p for p, n in ndim.items() if n == 2]
        inferred = infer_axes(apply_fn, params, wanted, args, kwargs, argnum, optional=two_d)
        for p in two_d:  # a batched first use (no single in and out axis) says nothing here
            if p in inferred and (inferred[p][0] or len(inferred[p][1]) != 1):
                del inferred[p]
    assumed = [p for p in wanted if p not in inferred and ndim[p] == 2]
    if assumed:
        shown = ", ".join(repr(p) for p in assumed[:4]) + (", ..." if len(assumed) > 4 else "")
        why = "apply_fn never contracts them" if apply_fn is not None else "no apply_fn= was given"
        warnings.warn(
            f"split assumed the (in, out) layout (in_axes=(0,)) for {len(assumed)} 2-D "
            f"weight(s) {shown} because {why}. Pass apply_fn= and args= to read each weight's "
            f"layout from its first use, or set LoraRule(in_axes=(0,)) for (in, out) kernels "
            f"(Flax) or in_axes=(1,) for (out, in) weights (Equinox, torch layout).",
            LoraLayoutWarning,
            stacklevel=3,
        )
    return inferred


def split(
    params: Any,
    rules: Sequence[LoraRule] | LoraRule,
    *,
    key: jax.Array,
    apply_fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    argnum: int = 0,
) -> tuple[Any, Any]:
    """Split ``params`` into a frozen base and trainable factors/leaves.

    Args:
        params: any pytree of arrays (or quantised arrays, or ShapeDtypeStructs under
            ``jax.eval_shape``): dicts, NamedTuples, ``nnx.State`` or an NNX module, linen
            ``Partitioned`` boxes, an Equinox module or ``eqx.partition`` half. ``None``
            leaves stay ``None`` in both returned trees; leaves that are not arrays
            (functions, Python numbers) stay in ``frozen`` untouched.
        rules: LoraRules; the first whose pattern fully matches a leaf's path wins.
        key: PRNG key; each leaf folds in a hash of its path.
        apply_fn, args, kwargs, argnum: optional function ``apply_fn(*args[:argnum], params,
            *args[argnum:], **kwargs)`` traced abstractly (no FLOPs) to read the input and
            stack axes of every adapted weight whose rule leaves them open from its first
            contraction: a Flax kernel ``(in, out)`` gets ``in_axes=(0,)``, an Equinox or
            torch-layout weight ``(out, in)`` ``in_axes=(1,)``. Without it a 2-D weight is
            assumed ``(in, out)`` (with a :class:`LoraLayoutWarning`) and weights of 3 or
            more dims need their rule's ``in_axes``/``stack_axes``.

    Returns:
        ``(frozen, trainable)``, both with the structure of ``params``: ``frozen`` has
        ``None`` at fully trained leaves; ``trainable`` has :class:`LoraFactors` at
        adapted leaves, the array at fully trained ones, ``None`` elsewhere. When the
        parameters are sharded over several devices, each factor is created directly
        with the sharding derived from its base (:func:`lora_jax.factor_shardings`).

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"q": {"kernel": jnp.zeros((16, 8))}, "head": {"kernel": jnp.zeros((8, 2))}}
        >>> rules = [lj.LoraRule("q/kernel", rank=2), lj.LoraRule("head/.*", full=True)]
        >>> frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
        >>> trainable["q"]["kernel"].a.shape, trainable["q"]["kernel"].b.shape
        ((16, 2), (2, 8))
        >>> frozen["head"]["kernel"] is None
        True
    """
    items = leaves_with_paths(params)
    if all(w is None for _, w in items):
        raise ValueError("params is an empty tree; nothing to adapt.")
    _check_key(key)
    sharded = [w.sharding for _, w in items if _is_sharded(w)]
    if sharded:
        # Factors are born with shardings derived from their base: no gather to one device.
        from lora_jax._src.ops.sharding import split_sharded

        return split_sharded(
            params,
            rules,
            key=key,
            mesh=sharded[0].mesh,
            apply_fn=apply_fn,
            args=args,
            kwargs=kwargs,
            argnum=argnum,
        )
    # None holes are never matched; static leaves are, so that targeting one is an error.
    targets = [(p, w) for p, w in items if w is not None]
    picked = dict(zip([p for p, _ in targets], match_rules([p for p, _ in targets], rules)))
    chosen = [picked.get(p) for p, _ in items]
    for (path, w), rule in zip(items, chosen):
        if rule is not None and not is_weight(w):
            raise TypeError(
                f"'{path}' is a {type(w).__name__}, not an array, but rule {rule.pattern!r} "
                f"targets it; narrow the pattern, or convert the parameters with "
                f"jax.tree.map(jnp.asarray, params)."
            )
        if rule is not None and not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(
                f"'{path}' has dtype {w.dtype} but rule {rule.pattern!r} targets it; only "
                f"floating-point weights can be adapted or trained. Narrow the pattern."
            )
        if rule is not None and rule.full and isinstance(w, QuantizedArray):
            raise TypeError(f"'{path}' is quantised and cannot be trained fully.")
        if rule is not None and is_principal_init(rule.init) and isinstance(w, QuantizedArray):
            raise TypeError(
                f"'{path}' is quantised but init={rule.init!r} replaces the base by the residual "
                f"W0 - scale * a @ b; split the float weights, then lj.quantize the frozen tree."
            )
    inferred = _infer(items, chosen, apply_fn, params, args, kwargs or {}, argnum)

    by_path = {path: (w, rule) for (path, w), rule in zip(items, chosen)}
    frozen_leaves, trainable_leaves = [], []
    for (path, w), rule in zip(items, chosen):
        if rule is None:  # frozen as it is (holes and static leaves too)
            frozen_leaves.append(w)
            trainable_leaves.append(None)
        elif rule.full:
            frozen_leaves.append(None)
            trainable_leaves.append(w)
        else:
            axes = resolve_axes(path, tuple(w.shape), rule, inferred.get(path))
            factors, base = make_factors(w, rule, axes, _leaf_key(key, path), path)
            if rule.glora is not None:
                bias = _glora_bias(path, rule, by_path)
                parts = make_parts(
                    rule.glora,
                    rule,
                    axes,
                    tuple(w.shape),
                    _leaf_key(key, path + "#glora"),
                    path,
                    bias,
                )
                factors = dataclasses.replace(factors, glora=parts)
            frozen_leaves.append(base)
            trainable_leaves.append(factors)
    treedef = jax.tree.structure(params, is_leaf=is_node)
    return jax.tree.unflatten(treedef, frozen_leaves), jax.tree.unflatten(treedef, trainable_leaves)
