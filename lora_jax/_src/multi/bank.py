"""AdapterBank: many adapters for one base, stacked so a batch can mix them.

Slot ``0`` is always the base model (zero factors, the ``base`` tree's fully
trained leaves); adapters occupy slots ``1..``. Every adapted leaf holds

=========  ==================================  ==========================================
field      shape                               meaning
=========  ==================================  ==========================================
``a``      ``(slots, *stack, *in_axes, R)``    input-side factors, zero-padded to rank R
``b``      ``(slots, *stack, R, *out_axes)``   output-side factors, zero-padded rows
``scale``  ``(slots,)``                        each adapter's alpha / r (an array)
=========  ==================================  ==========================================

and fully trained leaves are stacked to ``(slots, *shape)``. Ranks and scales
live in array data, so loading an adapter of any rank <= R or alpha into a slot
never changes a traced shape and never recompiles a step. Padded rank columns are
exact zeros: they add ``0 * x`` terms only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lora_jax._src.core.explicit import explicit_spec
from lora_jax._src.core.factors import LoraFactors, require_low_rank
from lora_jax._src.core.trees import check_pair, leaves_with_paths


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b", "scale"],
    meta_fields=["stack_axes", "in_axes", "out_axes"],
)
@dataclasses.dataclass(frozen=True)
class BankFactors:
    """The factors of one adapted weight for every slot of a bank (shapes in the module doc)."""

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    stack_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    def select(self, idx: Any) -> LoraFactors:
        """Slot ``idx``'s factors with its scale folded into ``b`` (``alpha = R``: scale 1).

        A traced ``idx`` outside ``0..slots-1`` selects NaN factors (see :func:`take_slot`).
        """
        b = take_slot(self.b, idx)
        b = (b.astype(jnp.float32) * take_slot(self.scale, idx).astype(jnp.float32)).astype(b.dtype)
        r = self.a.shape[-1]
        a = take_slot(self.a, idx)
        return LoraFactors(a, b, float(r), self.stack_axes, self.in_axes, self.out_axes)


def take_slot(x: jax.Array, idx: Any) -> jax.Array:
    """``x[idx]`` along the slot axis, where an id outside ``0..slots-1`` gives NaN.

    Eagerly, :func:`apply_bank` refuses such ids; under ``jit`` they cannot be checked
    without a host sync, so instead of clamping to the last slot (the wrong adapter,
    silently) the example gets NaN factors and hence NaN outputs (integer leaves: the
    dtype's fill value, as ``jnp.take(mode="fill")``). Negative ids do not wrap around.
    """
    idx = jnp.asarray(idx)
    idx = jnp.where(idx < 0, x.shape[0], idx)
    spec = explicit_spec(x)
    if spec is not None:  # on an Explicit mesh the slot's factors keep their own sharding
        return x.at[idx].get(mode="fill", out_sharding=PartitionSpec(*spec[1:]))
    return jnp.take(x, idx, axis=0, mode="fill")


def _is_leaf(x: Any) -> bool:
    return x is None or isinstance(x, BankFactors | LoraFactors)


def _pad_rank(t: LoraFactors, rank: int) -> tuple[jax.Array, jax.Array]:
    extra = rank - t.rank
    ns = len(t.stack_axes)
    a = jnp.pad(t.a, [(0, 0)] * (t.a.ndim - 1) + [(0, extra)])
    b = jnp.pad(t.effective_b(), [(0, 0)] * ns + [(0, extra)] + [(0, 0)] * (t.b.ndim - ns - 1))
    return a, b


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tree"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """Adapters for one base, one per slot (slot 0: the base model). A pytree.

    Attributes:
        tree: mirrors the parameter tree: :class:`BankFactors` at adapted leaves,
            ``(slots, *shape)`` arrays at fully trained leaves, ``None`` elsewhere.
    """

    tree: Any

    def _leaves(self) -> list[Any]:
        return jax.tree.leaves(self.tree, is_leaf=_is_leaf)

    @property
    def num_slots(self) -> int:
        """Slots including slot 0 (the base)."""
        leaf = next(x for x in self._leaves() if x is not None)
        return (leaf.a if isinstance(leaf, BankFactors) else leaf).shape[0]

    @property
    def max_rank(self) -> int:
        """The padded rank R every slot's factors are stored at (0 if nothing is adapted)."""
        ranks = [x.a.shape[-1] for x in self._leaves() if isinstance(x, BankFactors)]
        return max(ranks, default=0)

    def select(self, idx: Any) -> Any:
        """Slot ``idx`` as a trainable tree for ``lj.lora_apply``/``lj.merge``/``lj.unmerge``.

        ``idx`` may be traced. Factors come back padded to rank R with the adapter's scale
        folded into ``b`` (``alpha = R``), which represents the same update.
        """
        pick = lambda x: x.select(idx) if isinstance(x, BankFactors) else take_slot(x, idx)
        return jax.tree.map(lambda x: None if x is None else pick(x), self.tree, is_leaf=_is_leaf)

    def set(self, slot: int, trainable: Any) -> AdapterBank:
        """A new bank with ``trainable`` loaded into ``slot`` (1 <= slot < num_slots).

        Its ranks may be anything up to :attr:`max_rank` and its alphas anything: shapes
        do not change, so a step compiled for this bank is reused.
        """
        if not 1 <= slot < self.num_slots:
            raise ValueError(
                f"slot={slot} is outside 1..{self.num_slots - 1}; slot 0 is the base model and "
                f"cannot be written. Build the bank with more slots (stack_adapters(slots=...))."
            )
        paths = [p for p, _ in leaves_with_paths(jax.eval_shape(self.select, 0))]
        new = _stack_leaves(paths, [trainable], self.max_rank, [f"the adapter for slot {slot}"])
        olds = self._leaves()
        written = [
            None if old is None else _write(old, slot, one, path)
            for old, one, path in zip(olds, new, paths)
        ]
        tree = jax.tree.unflatten(jax.tree.structure(self.tree, is_leaf=_is_leaf), written)
        return AdapterBank(tree)

    def clear(self, slot: int) -> AdapterBank:
        """A new bank whose ``slot`` holds no adapter (zero factors, slot 0's trained leaves)."""
        return self.set(slot, self.select(0))

    def lora_apply_bank(self, apply, frozen, args, kw, adapter_ids, rng, in_axes) -> Any:
        """``lj.lora_apply``'s entry point for a bank (see :func:`apply_bank`)."""
        return apply_bank(apply, frozen, self, args, kw, adapter_ids, rng, in_axes)


def _write(old: Any, slot: int, one: Any, path: str) -> Any:
    """``old`` with slot ``slot`` replaced by the single-slot stack ``one`` (checked to fit)."""
    if isinstance(old, BankFactors):
        axes = (one.stack_axes, one.in_axes, one.out_axes)
        if (
            axes != (old.stack_axes, old.in_axes, old.out_axes)
            or one.a.shape[1:] != old.a.shape[1:]
            or one.b.shape[1:] != old.b.shape[1:]
            or one.a.dtype != old.a.dtype
        ):
            raise ValueError(
                f"'{path}': factors a{one.a.shape[1:]}, b{one.b.shape[1:]} ({one.a.dtype}, "
                f"axes {axes}) do not fit the bank's a{old.a.shape[1:]}, b{old.b.shape[1:]} "
                f"({old.a.dtype}); the adapter was made for another base or other rules."
            )
        return dataclasses.replace(
            old,
            a=old.a.at[slot].set(one.a[0]),
            b=old.b.at[slot].set(one.b[0]),
            scale=old.scale.at[slot].set(one.scale[0]),
        )
    if one.shape[1:] != old.shape[1:]:
        raise ValueError(f"'{path}': trained leaf shape {one.shape[1:]} != {old.shape[1:]}.")
    return old.at[slot].set(one[0].astype(old.dtype))


def _stack_leaves(
    paths: list[str], trainables: Sequence[Any], rank: int, names: Sequence[str]
) -> list[Any]:
    """Stack each leaf of ``trainables`` (checked to have ``paths`` and matching kinds)."""
    per = []
    for name, t in zip(names, trainables):
        items = leaves_with_paths(t)
        have = [p for p, _ in items]
        if have != paths:
            got, want = next((a, b) for a, b in zip(have + [None], paths + [None]) if a != b)
            raise ValueError(
                f"{name} has leaf {got!r} where {want!r} was expected; every adapter must "
                f"come from lj.split of the same base with the same rules."
            )
        per.append([x for _, x in items])
    return [_stack_one(path, [leaves[j] for leaves in per], rank) for j, path in enumerate(paths)]


def _stack_one(path: str, leaves: list[Any], rank: int) -> Any:
    kind = lambda x: "None" if x is None else "factors" if _is_factors(x) else "array"
    kinds = {kind(x) for x in leaves}
    if len(kinds) > 1:
        raise ValueError(
            f"'{path}': adapters disagree on this leaf (kinds {sorted(kinds)}); use the same "
            f"rules (and full=True leaves) for every adapter."
        )
    first = leaves[0]
    if first is None:
        return None
    if not _is_factors(first):
        for x in leaves:
            if tuple(x.shape) != tuple(first.shape):
                raise ValueError(
                    f"'{path}': trained leaf shape {tuple(x.shape)} != {tuple(first.shape)}."
                )
        return jnp.stack([jnp.asarray(x).astype(first.dtype) for x in leaves])
    axes = (first.stack_axes, first.in_axes, first.out_axes)
    for x in leaves:
        require_low_rank(x, path, "stack_adapters")
        if (x.stack_axes, x.in_axes, x.out_axes) != axes or x.shape != first.shape:
            raise ValueError(
                f"'{path}': factors adapt shape {x.shape} along (stack, in, out)="
                f"{(x.stack_axes, x.in_axes, x.out_axes)}, others adapt {first.shape} along "
                f"{axes}; adapters in one bank must adapt each weight the same way."
            )
        if x.rank > rank:
            raise ValueError(
                f"'{path}': rank {x.rank} is larger than the bank's rank {rank}; build the "
                f"bank with stack_adapters(..., max_rank={x.rank}) or higher."
            )
        if x.a.dtype != first.a.dtype or x.b.dtype != first.a.dtype:
            raise ValueError(
                f"'{path}': factors are {x.a.dtype}/{x.b.dtype} but others are "
                f"{first.a.dtype}; cast every adapter's factors to one dtype."
            )
    padded = [_pad_rank(x, rank) for x in leaves]
    return BankFactors(
        a=jnp.stack([a for a, _ in padded]),
        b=jnp.stack([b for _, b in padded]),
        scale=jnp.asarray([x.scale for x in leaves], jnp.float32),
        stack_axes=first.stack_axes,
        in_axes=first.in_axes,
        out_axes=first.out_axes,
    )


def stack_adapters(
    trainables: Sequence[Any],
    *,
    base: Any = None,
    slots: int | None = None,
    max_rank: int | None = None,
) -> AdapterBank:
    """Stack trainable trees of one base into an :class:`AdapterBank`.

    Adapter ``i`` goes to slot ``i + 1``; slot 0 is the base model (zero factors).

    Args:
        trainables: trees from ``lj.split`` of the same base with the same rules (their
            ranks, alphas and rsLoRA settings may differ).
        base: a trainable tree whose fully trained leaves are slot 0's (and the empty
            slots'), e.g. the tree ``lj.split`` returned before training; needed only when
            the adapters train some leaves fully.
        slots: total slots, at least ``len(trainables) + 1``; spare ones start empty.
        max_rank: rank R to pad to (default: the largest rank present); leave room here
            to load bigger adapters later without recompiling.

    Returns:
        The bank; pass it to ``lj.lora_apply(fn)(frozen, bank, *args, adapter_ids=ids)``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"w": jnp.ones((4, 3))}
        >>> _, t1 = lj.split(params, lj.LoraRule("w", rank=1), key=jax.random.key(1))
        >>> _, t2 = lj.split(params, lj.LoraRule("w", rank=2), key=jax.random.key(2))
        >>> bank = lj.stack_adapters([t1, t2], slots=4)
        >>> bank.num_slots, bank.max_rank, bank.tree["w"].a.shape
        (4, 2, (4, 4, 2))
    """
    trainables = list(trainables)
    if not trainables:
        raise ValueError("stack_adapters needs at least one trainable tree.")
    n = len(trainables) + 1
    slots = n if slots is None else slots
    if slots < n:
        raise ValueError(
            f"slots={slots} cannot hold {len(trainables)} adapters plus the base slot 0; "
            f"use slots>={n}."
        )
    ref = leaves_with_paths(trainables[0])
    paths = [p for p, _ in ref]
    ranks = [x.rank for t in trainables for _, x in leaves_with_paths(t) if _is_factors(x)]
    rank = max(ranks, default=0) if max_rank is None else max_rank
    full = [p for p, x in ref if x is not None and not _is_factors(x)]
    if full and base is None:
        raise ValueError(
            f"the adapters train {full[0]!r} fully, so slot 0 needs its base value: pass "
            f"base= (the trainable tree lj.split returned before training)."
        )
    empty = jax.tree.map(
        lambda x: (
            dataclasses.replace(x, a=jnp.zeros_like(x.a), b=jnp.zeros_like(x.b))
            if _is_factors(x)
            else x
        ),
        trainables[0] if base is None else base,
        is_leaf=_is_leaf,
    )
    everyone = [empty] + trainables + [empty] * (slots - n)
    names = ["base"] + [f"adapter {i}" for i in range(len(trainables))]
    leaves = _stack_leaves(paths, everyone, rank, names + ["base"] * (slots - n))
    treedef = jax.tree.structure(trainables[0], is_leaf=_is_leaf)
    return AdapterBank(jax.tree.unflatten(treedef, leaves))


def _is_factors(x: Any) -> bool:
    return isinstance(x, LoraFactors)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def apply_bank(
    apply: Callable,
    frozen: Any,
    bank: Any,
    args: tuple,
    kw: dict,
    adapter_ids: Any,
    rng: jax.Array | None,
    in_axes: Sequence[int | None] | None,
) -> Any:
    """``apply(frozen, trainable, *args, **kw)`` with each example using its own slot.

    Called by ``lj.lora_apply`` when ``adapter_ids=`` is given or ``trainable`` is a bank.
    A scalar id runs the whole batch with one slot. Ids shaped ``(batch,)`` run
    ``jax.vmap`` over the batch axis (``in_axes``: one entry per positional argument,
    default 0 for arguments holding arrays): each example sees a batch of 1 (its axis
    is kept with size 1) and the slot's factors, gathered per example. The frozen base is
    not batched, so each base matmul runs once for the whole batch and only the low-rank
    terms are per example. Outputs drop the size-1 axis 0 added per example. When every
    id is the same slot (checked at run time under ``jit``, with ``lax.cond``), the batch
    runs as one call with that slot's factors instead: no per-example gathers or batched
    rank-r products (1.06x a merged model per token instead of 1.15x,
    ``experiments/bank_throughput.py``). Both paths give the same outputs when ``fn``
    treats examples independently; one that mixes them (batch statistics) sees the whole
    batch on the one-slot path and a batch of 1 otherwise. Under an outer ``jax.vmap``
    that batches the ids, ``lax.cond`` runs both paths.

    Ids outside ``0..slots-1`` raise when they are concrete; traced ids (under ``jit``)
    that fall outside give that example NaN outputs (:func:`take_slot`), never another
    slot's adapter.
    """
    if not isinstance(bank, AdapterBank):
        raise TypeError(
            f"adapter_ids= needs an AdapterBank as the trainable argument, got "
            f"{type(bank).__name__}; build one with lj.stack_adapters([trainable, ...])."
        )
    if adapter_ids is None:
        raise ValueError(
            "the trainable argument is an AdapterBank: pass adapter_ids= (a slot per "
            "example, or one scalar slot for the whole batch; slot 0 is the base)."
        )
    if rng is not None:
        raise ValueError(
            "an AdapterBank runs without LoRA dropout, so lora_rng= has no use here; drop it "
            "(train each adapter with its own trainable tree to use dropout)."
        )
    check_pair(frozen, jax.eval_shape(bank.select, 0))
    ids = jnp.asarray(adapter_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 1:
        raise ValueError(
            f"adapter_ids must be integer slots, a scalar or shaped (batch,); got shape "
            f"{ids.shape} and dtype {ids.dtype}."
        )
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= bank.num_slots)]
        if bad.size:
            raise ValueError(
                f"adapter_ids has slot {int(bad[0])} but the bank has slots 0..."
                f"{bank.num_slots - 1}; load the adapter with bank.set(slot, trainable)."
            )
    whole_batch = lambda slot: apply(frozen, bank.select(slot), *args, **kw)
    if ids.ndim == 0:
        return whole_batch(ids)

    axes = [0 if any(_is_array(x) for x in jax.tree.leaves(a)) else None for a in args]
    if in_axes is not None:
        if len(in_axes) != len(args):
            raise ValueError(
                f"adapter_in_axes={tuple(in_axes)} has {len(in_axes)} entries but fn got "
                f"{len(args)} positional arguments; give one axis (or None) per argument."
            )
        axes = list(in_axes)
    batched = [i for i, ax in enumerate(axes) if ax is not None]
    sizes = {
        (i, x.shape[axes[i]]) for i in batched for x in jax.tree.leaves(args[i]) if _is_array(x)
    }
    if {s for _, s in sizes} != {ids.shape[0]}:
        raise ValueError(
            f"adapter_ids has shape {ids.shape} but the batched arguments have batch sizes "
            f"{sorted(sizes)} (argument, size); give one slot per example along each "
            f"argument's batch axis (adapter_in_axes=...)."
        )
    dyn = [args[i] for i in batched]

    def one(idx, dyn_one):
        full = list(args)
        for i, a in zip(batched, dyn_one):
            full[i] = jax.tree.map(lambda x, ax=axes[i]: jnp.expand_dims(x, ax), a)
        out = apply(frozen, bank.select(idx), *full, **kw)
        return jax.tree.map(lambda y: y[0] if y.ndim and y.shape[0] == 1 else y, out)

    per_example = lambda: jax.vmap(one, in_axes=(0, [axes[i] for i in batched]))(ids, dyn)
    # min/max, not ids[0]: a reduction also works on ids sharded over an Explicit mesh axis.
    lowest = jnp.min(ids)
    one_slot = lowest == jnp.max(ids)
    whole = lambda: whole_batch(lowest)
    if not isinstance(ids, jax.core.Tracer):
        return whole() if bool(one_slot) else per_example()
    try:
        return jax.lax.cond(one_slot, whole, per_example)
    except TypeError:  # the paths' outputs differ (fn drops the batch axis): per example only
        return per_example()
