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

from lora_jax._src.core.factors import expand_columns, factor_specs, lora_delta, wide_dtype

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


def glora_biases(f_items: list, t_items: list) -> dict[str, Any]:
    """``{weight path: its dense frozen bias}`` for every GLoRA leaf that scales its bias (D)."""
    wanted = {
        t.glora.bias_path: p
        for p, t in t_items
        if getattr(t, "glora", None) is not None and t.glora.bias_scale is not None
    }
    if not wanted:
        return {}
    out = {}
    for p, w in f_items:
        if p in wanted and w is not None:
            out[wanted[p]] = w.dequantize() if hasattr(w, "dequantize") else w
    missing = set(wanted.values()) - set(out)
    if missing:
        path = sorted(missing)[0]
        raise ValueError(
            f"'{path}': its GLoRA bias scale D needs the frozen bias at "
            f"'{next(b for b, p in wanted.items() if p == path)}', which the frozen tree lacks; "
            f"pass the pair returned by the same lj.split."
        )
    return out


# ----------------------------------------------------------------------------- terms


def _columns(x: jax.Array, t: Any) -> jax.Array:
    """A vector ``(*stack, *out)`` or scalar ``(*stack,)`` part as ``(*stack, *out)``."""
    ns = len(t.stack_axes)
    if x.ndim == ns:
        col = t.shape
        x = jnp.broadcast_to(
            x.reshape(x.shape + (1,) * len(t.out_axes)),
            x.shape + tuple(col[i] for i in t.out_axes),
        )
    return x


def weight_scale(t: Any, compute: Any) -> jax.Array:
    """``A`` in the weight's layout (a low-rank A), or ``(*stack, *out)`` (vector/scalar A)."""
    g = t.glora
    if g.scale is not None:
        return _columns(g.scale.astype(compute), t)
    sub = dataclasses.replace(t, a=g.scale_in, b=g.scale_out, singular=None, glora=None)
    return lora_delta(sub, compute)


def _prompt(t: Any, compute: Any) -> jax.Array | None:
    """C as ``(*stack, *in)``, or None."""
    g = t.glora
    if g.prompt is not None:
        return g.prompt.astype(compute)
    if g.prompt_in is None:
        return None
    c = jnp.einsum(
        "...r,...r->...",
        g.prompt_in.astype(compute),
        g.prompt_out.astype(compute).reshape(
            g.prompt_out.shape[:-1] + (1,) * len(t.in_axes) + g.prompt_out.shape[-1:]
        ),
    )
    return c * jnp.asarray(t.scale, compute)


def bias_delta(w: jax.Array, t: Any, bias: jax.Array | None) -> jax.Array | None:
    """``b0 ⊙ D + E + C · W0`` as ``(*stack, *out)`` in float32 or wider, or None."""
    g = t.glora
    compute = wide_dtype(w.dtype, t.a.dtype)
    terms = []
    if g.bias_scale is not None:
        terms.append(bias.astype(compute) * _columns(g.bias_scale.astype(compute), t))
    if g.bias_shift is not None:
        terms.append(_columns(g.bias_shift.astype(compute), t))
    c = _prompt(t, compute)
    if c is not None:
        a_spec, b_spec, w_spec = factor_specs(t)
        stack = "".join(w_spec[i] for i in t.stack_axes)
        ins = "".join(w_spec[i] for i in t.in_axes)
        outs = "".join(w_spec[i] for i in t.out_axes)
        terms.append(
            jnp.einsum(
                f"{stack}{ins},{w_spec}->{stack}{outs}",
                c,
                w.astype(compute),
                precision=jax.lax.Precision.HIGHEST,
            )
        )
    return sum(terms[1:], terms[0]) if terms else None


def implicit_terms(
    w: Any, t: Any, bias: jax.Array | None
) -> tuple[Any, jax.Array | None, jax.Array | None]:
    """``(base, col, shift)`` for the engine: ``W = base * col + B`` and ``shift`` per column.

    ``w`` is the frozen weight (quantised or dense); the base stays ``w`` unless A is
    low-rank, when it is the dense ``W0 ⊙ (1 + A)`` in ``w``'s dtype.
    """
    g = t.glora
    needs_dense = g.forms[0] == "lowrank" or g.forms[1] != "none"
    dense = w.dequantize() if needs_dense and hasattr(w, "dequantize") else w
    compute = wide_dtype(w.dtype, t.a.dtype)
    base, col = w, None
    if g.forms[0] == "lowrank":
        base = (dense.astype(compute) * (1 + weight_scale(t, compute))).astype(w.dtype)
    elif g.forms[0] != "none":
        col = 1 + weight_scale(t, compute)
    return base, col, bias_delta(dense, t, bias) if g.has_bias_terms else None


def merged_weight(w: jax.Array, t: Any) -> jax.Array:
    """Dense ``W0 + W0 ⊙ A + B`` in ``w``'s dtype (summed in float32 or wider)."""
    compute = wide_dtype(w.dtype, t.a.dtype)
    w0 = w.astype(compute)
    if t.glora.forms[0] != "none":
        scale = weight_scale(t, compute)
        w0 = w0 * (1 + (scale if t.glora.forms[0] == "lowrank" else expand_columns(scale, t)))
    return (w0 + lora_delta(t, compute)).astype(w.dtype)


def unmerged_weight(merged: jax.Array, t: Any) -> jax.Array:
    """Inverse of :func:`merged_weight`: ``(W - B) / (1 + A)``."""
    compute = wide_dtype(merged.dtype, t.a.dtype)
    w0 = merged.astype(compute) - lora_delta(t, compute)
    if t.glora.forms[0] != "none":
        scale = weight_scale(t, compute)
        w0 = w0 / (1 + (scale if t.glora.forms[0] == "lowrank" else expand_columns(scale, t)))
    return w0.astype(merged.dtype)


def merged_bias(bias: jax.Array, w: jax.Array, t: Any) -> jax.Array:
    """``b0 + b0 ⊙ D + E + C · W0`` in the bias's dtype (``w`` is the original W0)."""
    delta = bias_delta(w, t, bias)
    return (bias.astype(delta.dtype) + delta).astype(bias.dtype)


def unmerged_bias(merged: jax.Array, w: jax.Array, t: Any) -> jax.Array:
    """Inverse of :func:`merged_bias`: ``(b - E - C · W0) / (1 + D)``."""
    g = t.glora
    compute = wide_dtype(merged.dtype, w.dtype, t.a.dtype)
    rest = dataclasses.replace(t, glora=dataclasses.replace(g, bias_scale=None))
    shift = bias_delta(w, rest, None)
    b = merged.astype(compute) - (0.0 if shift is None else shift)
    if g.bias_scale is not None:
        b = b / (1 + _columns(g.bias_scale.astype(compute), t))
    return b.astype(merged.dtype)
