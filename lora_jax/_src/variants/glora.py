"""GLoRA (Chavan et al., 2023, "One-for-All: Generalized LoRA for Parameter-Efficient
Fine-tuning"): a weight and its layer's bias both adapted by support tensors A-E.

In lora_jax's ``(in, out)`` layout, for a weight W0 with bias b0 (each ``*stack`` layer
separately)::

    W = W0 + W0 ⊙ A + B              A, B: (*in, *out) weight-shaped
    b = b0 + b0 ⊙ D + E + C · W0     C: (*in,), D, E: (*out,)

``⊙`` is elementwise, as in the authors' code (their ``weight * A``). B is the
rule's rank-r LoRA term (``a``, ``b`` of :class:`~lora_jax.LoraFactors`); A, C, D, E
live in :class:`GloraParts` in one of these forms:

=======  ===========================================  ======================  ==========
tensor   ``"lowrank"``                                ``"vector"``            ``"scalar"``
=======  ===========================================  ======================  ==========
A        ``scale_in (*s,*in,r) @ scale_out (*s,r,*out)``  ``scale (*s,*out)``    ``scale (*s,)``
C        ``prompt_in (*s,*in,r) @ prompt_out (*s,r)``  ``prompt (*s,*in)``     --
D        --                                           ``bias_scale (*s,*out)``  ``(*s,)``
E        --                                           ``bias_shift (*s,*out)``  ``(*s,)``
=======  ===========================================  ======================  ==========

Every low-rank product is multiplied by the rule's scale (alpha / r); with
``alpha=rank`` the forms are the paper's unscaled products. All parts start so
that the adapted layer equals the base (one half of each product, every vector
and scalar at zero). A vector or scalar A is a per-column scale of the base
term and C, D, E add a per-column shift: the engine applies them to the output
of each use, so nothing weight-shaped is formed. A low-rank A is an elementwise
product with W0 and has a weight-shaped gradient by nature (``W0 ⊙ xᵀg``): the
engine forms ``W0 ⊙ (1 + A)`` for that weight (one dense temporary per use).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.rules import is_principal_init
from lora_jax._src.variants.glora_terms import (
    implicit_terms,
    merged_bias,
    merged_weight,
    unmerged_bias,
    unmerged_weight,
)

A_FORMS = ("lowrank", "vector", "scalar", "none")
C_FORMS = ("lowrank", "vector", "none")
BIAS_FORMS = ("vector", "scalar", "none", "auto")
ARRAYS = (
    "scale",
    "scale_in",
    "scale_out",
    "prompt",
    "prompt_in",
    "prompt_out",
    "bias_scale",
    "bias_shift",
)


@dataclasses.dataclass(frozen=True)
class Glora:
    """Forms of GLoRA's support tensors for the weights a rule matches.

    The defaults are lora_jax's fixed configuration (no search): A a vector (a
    per-output-column scale of W0), B the rule's low-rank term, C none, D and E
    vectors where the layer has a bias and none where it has not.

    Example:
        >>> import lora_jax as lj
        >>> lj.LoraRule(".*/kernel", rank=4, glora=lj.Glora(a="lowrank", c="vector")).glora.a
        'lowrank'
    """

    # A (scales W0 elementwise): "lowrank", "vector", "scalar" or "none".
    a: str = "vector"
    # C (adds C·W0 to the bias, a learned input "prompt"): "lowrank", "vector" or "none".
    c: str = "none"
    # D (scales the bias): "vector", "scalar", "none"; "auto": vector if the layer has a bias.
    d: str = "auto"
    # E (shifts the bias): as D.
    e: str = "auto"
    # Name of the bias leaf beside the weight (same parent in the tree): Flax "bias".
    bias: str = "bias"

    def __post_init__(self) -> None:
        for name, allowed in (("a", A_FORMS), ("c", C_FORMS), ("d", BIAS_FORMS), ("e", BIAS_FORMS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Glora({name}={value!r}): {name} must be one of {allowed}.")
        if not isinstance(self.bias, str) or not self.bias or "/" in self.bias:
            raise ValueError(f"Glora(bias={self.bias!r}) must be the bias leaf's key, e.g. 'bias'.")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(ARRAYS),
    meta_fields=["forms", "bias_path"],
)
@dataclasses.dataclass(frozen=True)
class GloraParts:
    """GLoRA's A, C, D, E support tensors of one weight (shapes in the module doc).

    Attributes:
        forms: resolved forms of (A, C, D, E), e.g. ``("vector", "none", "vector", "vector")``.
        bias_path: "/"-joined path of the layer's bias leaf, or None (then C, D, E are none).
    """

    forms: tuple[str, str, str, str] = ("none", "none", "none", "none")
    bias_path: str | None = None
    scale: jax.Array | None = None
    scale_in: jax.Array | None = None
    scale_out: jax.Array | None = None
    prompt: jax.Array | None = None
    prompt_in: jax.Array | None = None
    prompt_out: jax.Array | None = None
    bias_scale: jax.Array | None = None
    bias_shift: jax.Array | None = None

    def arrays(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n) for n in ARRAYS if getattr(self, n) is not None}

    @property
    def has_bias_terms(self) -> bool:
        return any(f != "none" for f in self.forms[1:])


def bias_path_for(path: str, cfg: Glora) -> str:
    """The path of the bias beside the weight at ``path``: ``layer/kernel`` -> ``layer/bias``."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    return f"{parent}/{cfg.bias}" if parent else cfg.bias


def make_parts(
    cfg: Glora,
    rule: Any,
    axes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    shape: tuple[int, ...],
    key: jax.Array,
    path: str,
    bias: tuple[str, tuple[int, ...]] | None,
) -> GloraParts:
    """Initial A, C, D, E of one weight; ``bias`` is the ``(path, shape)`` of its bias leaf."""
    stack, ins, outs = axes
    s_shape = tuple(shape[i] for i in stack)
    in_shape = tuple(shape[i] for i in ins)
    col_shape = s_shape + tuple(shape[i] for i in outs)
    r, dtype = rule.rank, rule.param_dtype
    forms = [cfg.a, cfg.c, cfg.d, cfg.e]
    for i in (2, 3):
        if forms[i] == "auto":
            forms[i] = "vector" if bias is not None else "none"
    needs_bias = any(f != "none" for f in forms[1:])
    if bias is None and needs_bias:
        raise ValueError(
            f"'{path}': GLoRA's C, D and E are bias terms but there is no '{cfg.bias}' leaf "
            f"beside this weight to fold them into; use lj.Glora(c='none', d='none', "
            f"e='none') for bias-free layers, or name the bias leaf with lj.Glora(bias=...)."
        )
    if needs_bias and bias[1] != col_shape:
        raise ValueError(
            f"'{path}': its bias '{bias[0]}' has shape {bias[1]} but GLoRA needs the weight's "
            f"stacked output shape {col_shape}; set lj.Glora(bias=...) to the right leaf or "
            f"use c='none', d='none', e='none'."
        )

    def random(k, shp, fan_in):
        if rule.init == "kaiming":  # kaiming-uniform with a=sqrt(5): bound 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(k, shp, dtype, -bound, bound)
        return jax.random.normal(k, shp, dtype) / r

    shapes = part_shapes(tuple(forms), s_shape, in_shape, col_shape[len(s_shape) :], r)
    ka, kc = jax.random.split(key)
    arrays = {n: jnp.zeros(shp, dtype) for n, shp in shapes.items()}
    if "scale_in" in arrays:
        arrays["scale_in"] = random(ka, shapes["scale_in"], math.prod(in_shape))
    if "prompt_out" in arrays:
        arrays["prompt_out"] = random(kc, shapes["prompt_out"], 1)
    return GloraParts(forms=tuple(forms), bias_path=bias[0] if needs_bias else None, **arrays)


def part_shapes(
    forms: tuple[str, ...],
    stack: tuple[int, ...],
    ins: tuple[int, ...],
    outs: tuple[int, ...],
    r: int,
) -> dict[str, tuple[int, ...]]:
    """Shape of every array the resolved ``forms`` of (A, C, D, E) need."""
    shapes = {}
    a, c, d, e = forms
    if a == "lowrank":
        shapes["scale_in"], shapes["scale_out"] = stack + ins + (r,), stack + (r,) + outs
    elif a != "none":
        shapes["scale"] = stack + outs if a == "vector" else stack
    if c == "lowrank":
        shapes["prompt_in"], shapes["prompt_out"] = stack + ins + (r,), stack + (r,)
    elif c == "vector":
        shapes["prompt"] = stack + ins
    for name, form in (("bias_scale", d), ("bias_shift", e)):
        if form != "none":
            shapes[name] = stack + outs if form == "vector" else stack
    return shapes


# ----------------------------------------------------------------------------- plug-in


def _bias_for(path: str, rule: Any, leaf_at: Any) -> tuple[str, tuple[int, ...]] | None:
    """``(path, shape)`` of the bias beside a GLoRA weight, or None if it has none."""
    cfg = rule.glora
    want = bias_path_for(path, cfg)
    b, r = leaf_at(want)
    if b is None:
        return None
    if r is not None and (cfg.c, cfg.d, cfg.e) != ("none", "none", "none"):
        raise ValueError(
            f"'{path}': GLoRA's bias terms adapt '{want}', but rule {r.pattern!r} also targets "
            f"it; exclude the bias from other rules or use lj.Glora(c='none', d='none', "
            f"e='none')."
        )
    return want, tuple(b.shape)


def check_entry(g: Any, arrays: dict, a: list, b: list, ns: int, where: str) -> None:
    """A checkpoint's GLoRA forms and bias path, and that its glora_* arrays fit them."""
    ok = (
        isinstance(g, dict)
        and isinstance(g.get("forms"), list)
        and len(g["forms"]) == 4
        and all(isinstance(f, str) for f in g["forms"])
        and (g.get("bias_path") is None or isinstance(g.get("bias_path"), str))
    )
    allowed = (A_FORMS, C_FORMS, BIAS_FORMS[:-1], BIAS_FORMS[:-1])
    if not ok or not all(f in forms for f, forms in zip(g["forms"], allowed)):
        raise ValueError(f"{where}: glora {g!r} is not valid GLoRA metadata; corrupted.")
    shapes = part_shapes(
        tuple(g["forms"]), tuple(a[:ns]), tuple(a[ns:-1]), tuple(b[ns + 1 :]), a[-1]
    )
    stored = {n[6:]: tuple(info["shape"]) for n, info in arrays.items() if n.startswith("glora_")}
    if stored != shapes or (g["bias_path"] is None) == any(f != "none" for f in g["forms"][1:]):
        raise ValueError(
            f"{where}: GLoRA arrays {stored} / bias path {g['bias_path']!r} do not fit forms "
            f"{g['forms']} (expected {shapes}); corrupted metadata."
        )


class GloraVariant(_variant.Variant):
    """The plug-in hooks of GLoRA (``LoraRule(glora=...)``, parts in ``LoraFactors.glora``)."""

    name = "glora"
    title = "GLoRA"
    plain_low_rank = False

    def wants(self, rule: Any) -> bool:
        return rule.glora not in (None, False)

    def check_rule(self, rule: Any, where: str) -> None:
        if rule.glora is True:
            object.__setattr__(rule, "glora", Glora())
        elif rule.glora is False:
            object.__setattr__(rule, "glora", None)
        elif rule.glora is not None and not isinstance(rule.glora, Glora):
            raise TypeError(
                f"{where}: glora must be True, False or lj.Glora(...), got {rule.glora!r}."
            )
        if rule.glora is not None and is_principal_init(rule.init):
            raise ValueError(
                f"{where}: glora starts every support tensor at zero; init={rule.init!r} would "
                f"replace the base. Use init='gaussian' or 'kaiming'."
            )

    def rule_to_json(self, rule: Any) -> dict:
        return {"glora": None if rule.glora is None else dataclasses.asdict(rule.glora)}

    def rule_from_json(self, d: dict) -> None:
        d["glora"] = Glora(**d["glora"]) if d.get("glora") is not None else False

    def init(self, factors, base, ctx):
        bias = _bias_for(ctx.path, ctx.rule, ctx.leaf_at)
        cfg = ctx.rule.glora
        parts = make_parts(cfg, ctx.rule, ctx.axes, ctx.shape, ctx.fold("#glora"), ctx.path, bias)
        return dataclasses.replace(factors, glora=parts), base

    def present(self, t) -> bool:
        return t.glora is not None

    def arrays(self, t):
        return {f"glora_{n}": x for n, x in t.glora.arrays().items()}

    def replace(self, t, values):
        new = {n[len("glora_") :]: x for n, x in values.items()}
        return dataclasses.replace(t, glora=dataclasses.replace(t.glora, **new))

    def layout(self, t):
        """Per-column parts follow the output axes, the prompt the input axes, the low-rank
        A halves ``a`` and ``b``; scalars the stack axes. Random-init halves learn like ``a``,
        zero-init halves and the vectors/scalars like ``b`` (LoRA+)."""
        forms = t.glora.forms
        per_form = lambda form: ("stack", "out") if form == "vector" else ("stack",)  # noqa: E731
        layouts = {
            "scale": per_form(forms[0]),
            "scale_in": "a",
            "scale_out": "b",
            "prompt": ("stack", "in"),
            "prompt_in": ("stack", "in", "r"),
            "prompt_out": ("stack", "r"),
            "bias_scale": per_form(forms[2]),
            "bias_shift": per_form(forms[3]),
        }
        slow = ("scale_in", "prompt_out")
        return {
            f"glora_{n}": (layouts[n], _variant.BASE if n in slow else _variant.FAST)
            for n in t.glora.arrays()
        }

    def meta(self, t):
        return {"forms": list(t.glora.forms), "bias_path": t.glora.bias_path}

    def restore(self, t, arrays, meta):
        if meta is None:
            return t
        parts = GloraParts(
            forms=tuple(meta["forms"]),
            bias_path=meta["bias_path"],
            **{n[len("glora_") :]: x for n, x in arrays.items()},
        )
        return dataclasses.replace(t, glora=parts)

    def check_entry(self, entry: dict, where: str) -> None:
        arrays = entry["arrays"]
        if "glora" not in entry:
            if any(self.owns(n) for n in arrays):
                raise ValueError(f"{where} has glora_* arrays but no glora metadata; corrupted.")
            return
        a, b = arrays["a"]["shape"], arrays["b"]["shape"]
        check_entry(entry["glora"], arrays, a, b, len(entry["stack_axes"]), where)

    def frozen_paths(self, t):
        return (t.glora.bias_path,) if t.glora.bias_scale is not None else ()

    def terms(self, t, terms, frozen_at):
        bias = None
        if t.glora.bias_scale is not None:
            bias = frozen_at(t.glora.bias_path)
            if bias is None:
                raise ValueError(
                    f"'{t.glora.bias_path}': the GLoRA bias scale D of the weight beside it "
                    f"needs this frozen bias, which the frozen tree lacks; pass the pair "
                    f"returned by the same lj.split."
                )
        base, col, shift = implicit_terms(terms.base, t, bias)
        return dataclasses.replace(terms, base=base, col=col, shift=shift)

    def merged(self, w, t):
        return merged_weight(w, t)

    def merged_others(self, t, w, frozen_at):
        path = t.glora.bias_path
        return {path: merged_bias(frozen_at(path), w, t)} if path else {}

    def unmerged(self, merged, t, state, path):
        return unmerged_weight(merged, t)

    def unmerged_others(self, t, w0, merged_at):
        path = t.glora.bias_path
        return {path: unmerged_bias(merged_at(path), w0, t)} if path else {}


GLORA = _variant.register(GloraVariant())
