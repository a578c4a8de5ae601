"""The variant plug-in point: the hooks every LoRA variant registers, and the loops over them.

A variant (DoRA, AdaLoRA, GLoRA, PiSSA/OLoRA, rsLoRA, VeRA, or one written outside the
library) is a :class:`Variant` subclass registered with :func:`register`. split, merge,
``lora_apply``, factor shardings, checkpoints, LoRA+ labels and summary never test a
variant's fields: they call these hooks on every registered variant, in registration
order. Every hook's default is "this variant adds nothing", so a variant overrides only
what it changes.

The weight of an adapted leaf is written as :class:`Terms`::

    W = base * col + scale * a @ b        (col per output column, or None)
    y = x . W + shift                     (shift per output column, or None)

Each variant present on a leaf refines the terms in turn (AdaLoRA and VeRA rescale
``b``; DoRA sets ``col`` and folds it into ``b``; GLoRA scales the base and adds
``shift``). The engine applies the terms without forming ``W``; merge forms it.

A variant's own arrays live either in :class:`~lora_jax.LoraFactors` fields of the
built-ins (``magnitude``, ``singular``, ``glora``) or, for any other variant, in
``LoraFactors.variant``: a registered pytree of its arrays (its "parts"), chosen by
``LoraRule(..., variant=config)`` where ``config`` is the variant's config object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

Axes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (stack, in, out)
# Layout of one variant array, for shardings: "a" / "b" (as the factor of that name) or a
# tuple of "stack", "in", "out", "r" (the weight's axes of that side, in order; r: rank).
Layout = str | tuple[str, ...]
BASE, FAST = "base", "fast"  # LoRA+ groups: lr and ratio * lr


@dataclasses.dataclass
class Terms:
    """One weight's implicit form ``W = base * col + scale * a @ b`` plus an output ``shift``.

    ``base`` is the frozen weight (dense or quantised); ``a (*stack, *in, r)``,
    ``b (*stack, r, *out)``; ``col`` and ``shift`` are ``(*stack, *out)`` or None.
    """

    base: Any
    a: Any
    b: Any
    col: Any = None
    shift: Any = None


@dataclasses.dataclass(frozen=True)
class InitContext:
    """What :meth:`Variant.init` may use when split creates one leaf's factors.

    Attributes:
        path: the leaf's "/"-joined path.
        rule: the LoraRule that matched it.
        axes: ``(stack_axes, in_axes, out_axes)``.
        shape: the weight's shape.
        key: the leaf's PRNG key (the one split's default init uses).
        fold: ``fold(suffix)`` a PRNG key of its own for ``path + suffix``.
        leaf_at: ``leaf_at(path) -> (leaf, rule or None)`` of any parameter (or ``(None,
            None)``), e.g. the bias beside a weight.
        plans: ``{variant name: what its plan returned}`` for this split.
    """

    path: str
    rule: Any
    axes: Axes
    shape: tuple[int, ...]
    key: Any
    fold: Callable[[str], Any]
    leaf_at: Callable[[str], tuple[Any, Any]]
    plans: dict = dataclasses.field(default_factory=dict)


class Variant:
    """Base class of a variant: override the hooks that the variant changes."""

    name: str = ""
    title: str = ""  # as written in messages, e.g. "DoRA"
    # The config class a rule carries in ``LoraRule.variant`` (None for the built-ins that
    # have their own LoraRule field) and the parts class in ``LoraFactors.variant``.
    config_type: type | None = None
    parts_type: type | None = None
    # Owns the form of the weight: cannot be combined with another exclusive variant.
    exclusive: bool = True
    # The update is ``scale * a @ b`` on an unchanged base, with ``a``, ``b`` trainable
    # arrays (what adapter banks and combinations need).
    plain_low_rank: bool = True
    # ``a`` and ``b`` are frozen constants (not pytree leaves): shardings and labels skip them.
    static_factors: bool = False
    # Replaces the frozen base at split (PiSSA/OLoRA's residual).
    changes_base: bool = False
    # "lora": rides on PEFT's LoRA tuner (extra keys and config fields there); "own": its
    # own PEFT tuner (every peft_* hook below); None: no PEFT format.
    peft: str | None = None

    # --- rules
    def wants(self, rule: Any) -> bool:
        """Whether ``rule`` asks for this variant."""
        return self.config_type is not None and isinstance(
            getattr(rule, "variant", None), self.config_type
        )

    def check_rule(self, rule: Any, where: str) -> None:
        """Validate (and normalise, with ``object.__setattr__``) a rule that wants it."""

    def rule_to_json(self, rule: Any) -> dict:
        """JSON-able replacements of the rule fields this variant owns."""
        return {}

    def rule_from_json(self, d: dict) -> None:
        """Inverse of :meth:`rule_to_json`, in place on the rule's field dict."""

    # --- split
    def plan(self, leaves: list[tuple[str, tuple[int, ...], Any, Axes]]) -> Any:
        """Once per split, before any factors: ``(path, shape, rule, axes)`` of its leaves."""
        return None

    def init(self, factors: Any, base: Any, ctx: InitContext) -> tuple[Any, Any]:
        """The leaf's factors and frozen base once this variant is added."""
        return factors, base

    # --- the arrays it adds
    def present(self, t: Any) -> bool:
        """Whether factors ``t`` carry this variant."""
        return self.parts_type is not None and isinstance(t.variant, self.parts_type)

    def arrays(self, t: Any) -> dict[str, Any]:
        """Its arrays of ``t`` by checkpoint name (may also override ``"a"``, ``"b"``)."""
        return {}

    def replace(self, t: Any, values: dict[str, Any]) -> Any:
        """``t`` with the arrays named as in :meth:`arrays` replaced by ``values``
        (arrays, shardings or labels)."""
        return t

    def layout(self, t: Any) -> dict[str, tuple[Layout, str]]:
        """``{name: (layout, LoRA+ group)}`` of every array in :meth:`arrays`."""
        return {}

    def owns(self, name: str) -> bool:
        """Whether a stored array name (checkpoints) belongs to this variant."""
        return name.startswith(self.name + "_")

    def meta(self, t: Any) -> dict | None:
        """JSON-able static data a checkpoint needs to rebuild ``t`` (None: nothing)."""
        return None

    def restore(self, t: Any, arrays: dict[str, Any], meta: dict | None) -> Any:
        """``t`` (plain factors) with this variant's ``arrays`` and ``meta`` put back."""
        return t

    def check_entry(self, entry: dict, where: str) -> None:
        """Validate a checkpoint entry's stored arrays/meta for this variant (raise)."""

    # --- math
    def low_rank(self, t: Any, a: Any, b: Any) -> tuple[Any, Any]:
        """The low-rank pair with this variant's refinement (e.g. ``b`` rescaled)."""
        return a, b

    def terms(self, t: Any, terms: Terms, frozen_at: Callable[[str], Any]) -> Terms:
        """Refine a leaf's implicit terms; ``frozen_at(path)`` is another frozen leaf (dense)."""
        return terms

    def frozen_paths(self, t: Any) -> tuple[str, ...]:
        """Other frozen leaves that :meth:`terms` reads (e.g. the layer's bias)."""
        return ()

    def merged(self, w: Any, t: Any) -> Any:
        """Dense merged weight (``w``'s dtype), or None to let merge build it from the terms."""
        return None

    def merged_others(self, t: Any, w: Any, frozen_at: Callable[[str], Any]) -> dict:
        """``{path: merged leaf}`` of other leaves merging folds this leaf into (GLoRA bias)."""
        return {}

    def unmerge_state(self, w: Any, t: Any) -> Any:
        """What unmerging this leaf needs that merging loses (computed before merging)."""
        return None

    def unmerged(self, merged: Any, t: Any, state: Any, path: str) -> Any:
        """W0 from the merged weight, or None for the generic ``(W - scale a @ b) / col``."""
        return None

    def unmerged_others(self, t: Any, w0: Any, merged_at: Callable[[str], Any]) -> dict:
        """``{path: unmerged leaf}`` of other leaves (inverse of :meth:`merged_others`)."""
        return {}

    # --- PEFT. Both kinds: the ``peft_types`` it reads, its keys of one torch module, its
    # config, its config checks. peft == "lora": the LoRA reader and writer call
    # peft_uses/peft_refine and the attributes below around their own A/B keys.
    # peft == "own": peft_read/peft_assemble replace the LoRA reader.
    peft_types: tuple[str, ...] = ()  # ``peft_type`` values it reads ("own": all of them)
    peft_setting: str = ""  # the config setting that switches it on, for messages
    peft_pair: tuple[str, str] | None = None  # key suffixes of A and B when it is used
    peft_embedding: bool = True  # PEFT's embedding LoRA layer carries it
    peft_zero_fill: bool = True  # a stacked layer the adapter misses may get zero arrays
    peft_own_fields: tuple[str, ...] = ()  # config fields it checks instead of the LoRA checks

    def peft_tensors(self, t: Any, layer: int | None) -> dict:
        """``{key suffix: array}`` of one torch module (``layer`` of a stacked leaf); for
        peft == "lora", the keys it adds beside ``lora_A``/``lora_B``."""
        return {}

    def peft_config(self, config: dict, leaves: list) -> tuple[dict, dict]:
        """``(shared tensors by key, adapter config)`` from the LoRA writer's config and the
        factors of every leaf this variant wrote."""
        return {}, config

    def peft_check_config(self, config: dict, path: str) -> None:
        """Validate the fields it owns in a read ``adapter_config.json`` (raise)."""

    def peft_uses(self, config: dict) -> bool:
        """peft == "lora": whether a read LoRA ``adapter_config.json`` switches it on."""
        return False

    def peft_refine(self, m: PeftModule, tensors: dict, consumed: set, config: dict) -> PeftModule:
        """peft == "lora": one module as read, with its keys (``m.key_prefix + suffix``)
        added to ``m.arrays`` and marked consumed; runs before the shapes are checked."""
        return m

    def peft_read(
        self, tensors, consumed, config, key_prefix, path, w_shape, layer, out_in=False
    ) -> Any:
        """peft == "own": one torch module's arrays (keys ``key_prefix + suffix``), or None.

        ``out_in``: the base weight is stored ``(out, in)`` (key map layout ``linear_out_in``).
        """
        raise NotImplementedError

    def peft_assemble(self, found: list, stacked: bool, shape: tuple, config: dict, path: str):
        """peft == "own": the factors of one leaf from its modules' :meth:`peft_read` results."""
        raise NotImplementedError


@dataclasses.dataclass
class PeftModule:
    """One torch module of a PEFT LoRA adapter as the LoRA reader holds it.

    ``a (r, in)`` and ``b (out, r)`` are PEFT's ``lora_A`` and ``lora_B``; ``r`` and
    ``alpha`` come from the config; ``arrays`` are the variants' own arrays of this module
    by checkpoint name (e.g. ``magnitude (out,)``), put into the factors by
    :meth:`Variant.restore`.
    """

    module: str  # the torch module's name, e.g. "bert.encoder.layer.0.attention.self.query"
    key_prefix: str  # its keys' prefix: "base_model.model.<module>."
    a: Any
    b: Any
    r: int
    alpha: float
    arrays: dict = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add ``variant`` to the registry (replacing one of the same name). Returns it."""
    if not isinstance(variant, Variant) or not variant.name:
        raise TypeError(f"register() needs a named Variant instance, got {variant!r}.")
    _REGISTRY[variant.name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove the variant called ``name`` (a no-op if there is none)."""
    _REGISTRY.pop(name, None)


def variants() -> tuple[Variant, ...]:
    """Every registered variant, in registration order."""
    return tuple(_REGISTRY.values())


def get(name: str) -> Variant:
    if name not in _REGISTRY:
        raise ValueError(f"no variant {name!r} is registered; known: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def wanted_by(rule: Any) -> list[Variant]:
    return [v for v in _REGISTRY.values() if v.wants(rule)]


def present(t: Any) -> Iterator[Variant]:
    """The registered variants that factors ``t`` carry."""
    return (v for v in _REGISTRY.values() if v.present(t))


def for_config(config: Any) -> Variant | None:
    return next((v for v in _REGISTRY.values() if v.config_type is type(config)), None)


def for_peft_type(peft_type: Any) -> Variant | None:
    """The variant with its own PEFT tuner that reads adapters of ``peft_type``, if any."""
    return next(
        (v for v in _REGISTRY.values() if v.peft == "own" and peft_type in v.peft_types), None
    )


def on_peft_lora() -> list[Variant]:
    """The variants that ride on PEFT's LoRA tuner (``peft == "lora"``)."""
    return [v for v in _REGISTRY.values() if v.peft == "lora"]


def factor_arrays(t: Any) -> dict[str, Any]:
    """Every array of factors ``t`` by checkpoint name: ``a``, ``b`` and each variant's."""
    out = {"a": t.a, "b": t.b}
    for v in present(t):
        out.update(v.arrays(t))
    return out


def low_rank(t: Any) -> tuple[Any, Any]:
    """``(a, b)`` of ``t`` with every present variant's refinement."""
    a, b = t.a, t.b
    for v in present(t):
        a, b = v.low_rank(t, a, b)
    return a, b


def restore_arrays(t: Any, arrays: dict[str, Any], metas: dict | None = None) -> Any:
    """``t`` (plain factors) with each variant's ``arrays`` (by checkpoint name) and its
    ``metas[name]`` put back, through :meth:`Variant.restore`."""
    metas = metas or {}
    for v in _REGISTRY.values():
        own = {n: x for n, x in arrays.items() if v.owns(n)}
        if own or v.name in metas:
            t = v.restore(t, own, metas.get(v.name))
    return t


def config_to_json(config: Any) -> dict | None:
    """``LoraRule.variant`` as JSON: ``{"name": ..., **fields}`` (None stays None)."""
    if config is None:
        return None
    v = for_config(config)
    return {"name": v.name, **dataclasses.asdict(config)}


def config_from_json(d: dict | None) -> Any:
    if d is None:
        return None
    d = dict(d)
    return get(d.pop("name")).config_type(**d)
