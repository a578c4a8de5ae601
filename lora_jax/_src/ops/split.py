"""split: turn a parameter tree and rules into a frozen base and trainable factors."""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import LoraRule, match_rules
from lora_jax._src.core.trees import is_node, is_weight, leaves_with_paths
from lora_jax._src.ops.sharding import Override, factor_shardings

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


def make_factors(w: Any, rule: LoraRule, ctx: _variant.InitContext) -> tuple[LoraFactors, Any]:
    """Factors for one weight and its frozen base.

    ``a`` random by ``rule.init`` and ``b`` zero, with ``w`` itself as the base; then each
    variant the rule wants changes them (:meth:`Variant.init`, e.g. PiSSA/OLoRA's principal
    factors and residual base). ``ctx`` holds the leaf's path, axes and key.
    """
    axes, key, path = ctx.axes, ctx.key, ctx.path
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
    if rule.init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / r
    elif rule.init == "kaiming":  # kaiming-uniform, a=sqrt(5), fan_in = d_in: bound 1/sqrt(d_in)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    else:  # a variant's init (PiSSA/OLoRA) sets a and b
        a = jnp.zeros(a_shape, dtype)
    factors = LoraFactors(
        a=a,
        b=b,
        alpha=rule.resolved_alpha,
        stack_axes=stack,
        in_axes=ins,
        out_axes=outs,
        rslora=rule.rslora,
        dropout=float(rule.dropout),
    )
    base = w
    for v in _variant.wanted_by(rule):
        factors, base = v.init(factors, base, ctx)
    return factors, base


class LoraLayoutWarning(UserWarning):
    """``split`` assumed the ``(in, out)`` layout of a 2-D weight (no ``apply_fn=`` to read it).

    Flax's own names carry their layout, so leaves named ``kernel`` (``(in, out)``) or
    ``embedding`` (``(vocab, dim)``), NNX's ``.../kernel/value`` included, never warn.
    """


_FLAX_NAMES = ("kernel", "embedding")  # Flax's names for (in, out) kernels and (vocab, dim) tables


def _flax_named(path: str) -> bool:
    parts = path.split("/")
    if parts[-1] == "value" and len(parts) > 1:  # an NNX state's Variable
        parts = parts[:-1]
    return parts[-1] in _FLAX_NAMES


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
    assumed = [p for p in wanted if p not in inferred and ndim[p] == 2 and not _flax_named(p)]
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
    if sharded:  # factors are born with shardings derived from their base: no gather
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
    inferred = _infer(items, chosen, apply_fn, params, args, kwargs or {}, argnum)

    by_path = {path: (w, rule) for (path, w), rule in zip(items, chosen)}
    leaf_at = lambda p: by_path.get(p, (None, None))  # noqa: E731
    axes_of = {
        path: resolve_axes(path, tuple(w.shape), rule, inferred.get(path))
        for (path, w), rule in zip(items, chosen)
        if rule is not None and not rule.full
    }
    plans = {  # variants that share state across leaves (VeRA's projections) plan it here
        v.name: v.plan(
            [
                (p, tuple(w.shape), r, axes_of[p])
                for (p, w), r in zip(items, chosen)
                if p in axes_of and v.wants(r)
            ]
        )
        for v in _variant.variants()
        if any(v.wants(r) for r in chosen if r is not None and not r.full)
    }
    frozen_leaves, trainable_leaves = [], []
    for (path, w), rule in zip(items, chosen):
        if rule is None:  # frozen as it is (holes and static leaves too)
            frozen_leaves.append(w)
            trainable_leaves.append(None)
        elif rule.full:
            frozen_leaves.append(None)
            trainable_leaves.append(w)
        else:
            axes, k = axes_of[path], _leaf_key(key, path)
            fold = lambda suffix, path=path: _leaf_key(key, path + suffix)  # noqa: E731
            ctx = _variant.InitContext(path, rule, axes, tuple(w.shape), k, fold, leaf_at, plans)
            factors, base = make_factors(w, rule, ctx)
            frozen_leaves.append(base)
            trainable_leaves.append(factors)
    treedef = jax.tree.structure(params, is_leaf=is_node)
    return jax.tree.unflatten(treedef, frozen_leaves), jax.tree.unflatten(treedef, trainable_leaves)


def split_sharded(
    params: Any,
    rules: Sequence[LoraRule] | LoraRule,
    *,
    key: jax.Array,
    specs: Any = None,
    mesh: Mesh | None = None,
    overrides: Mapping[str, str | Override] | None = None,
    **split_kwargs: Any,
) -> tuple[Any, Any]:
    """:func:`lora_jax.split` for sharded parameters: factors are born sharded.

    Runs ``split`` under ``jax.jit`` with ``out_shardings`` from :func:`factor_shardings`,
    so each device creates only its shard of every factor; the frozen leaves are the
    input arrays themselves (no copy, no gather). Random values equal ``lj.split``'s.

    Args:
        params: parameter tree of ``jax.Array`` (each with a NamedSharding unless
            ``specs`` is given).
        rules, key, split_kwargs: as for :func:`lora_jax.split`.
        specs: PartitionSpecs/NamedShardings mirroring ``params``; default: the
            arrays' own shardings.
        mesh, overrides: as for :func:`factor_shardings` (``mesh`` is required when
            ``specs`` holds bare PartitionSpecs).

    Returns:
        ``(frozen, trainable)`` as :func:`lora_jax.split`, with sharded factors.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1, jax.device_count()), ("fsdp", "model"))
        >>> w = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P("fsdp", "model")))
        >>> frozen, trainable = lj.split_sharded({"w": w}, lj.LoraRule("w", rank=2),
        ...                                      key=jax.random.key(0))
        >>> trainable["w"].a.sharding.spec, trainable["w"].b.sharding.spec
        (P('fsdp', None), P(None, 'model'))
    """
    specs = params if specs is None else specs

    def run(p, k):
        return split(p, rules, key=k, **split_kwargs)

    frozen_shape, trainable_shape = jax.eval_shape(run, params, key)
    shardings = factor_shardings(specs, trainable_shape, mesh=mesh, overrides=overrides)
    for path, s in leaves_with_paths(shardings):
        if isinstance(s, PartitionSpec) or (
            isinstance(s, LoraFactors) and isinstance(s.a, PartitionSpec)
        ):
            raise ValueError(
                f"'{path}': specs are bare PartitionSpecs and no mesh is known; pass mesh=."
            )
    rules = [rules] if isinstance(rules, LoraRule) else rules
    if not any(v.changes_base for r in rules for v in _variant.wanted_by(r)):
        trainable = jax.jit(lambda p, k: run(p, k)[1], out_shardings=shardings)(params, key)
        frozen = jax.tree.map(
            lambda f, p: None if f is None else p, frozen_shape, params, is_leaf=is_node
        )
        return frozen, trainable
    # PiSSA/OLoRA replace the base by a residual: it is computed shard by shard too.
    frozen_shardings = jax.tree.map(
        lambda f, p: None if f is None else p.sharding, frozen_shape, params, is_leaf=is_node
    )
    return jax.jit(run, out_shardings=(frozen_shardings, shardings))(params, key)
