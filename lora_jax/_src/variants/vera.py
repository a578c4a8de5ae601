"""VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation").

A VeRA leaf (``LoraRule(..., rank=r, variant=lj.Vera())``) keeps LoRA's two factors frozen
and random, shared by every adapted weight, and trains two scaling vectors per weight::

    delta W = A_s diag(lambda_d) B_s diag(lambda_b)       (lora_jax's (in, out) layout)

with ``A_s (in, r)``, ``B_s (r, out)`` slices of one pair of shared projections ``A (r,
max_in)``, ``B (max_out, r)`` (PEFT's ``vera_A``, ``vera_B``: ``A_s = A[:, :in]^T``, ``B_s =
B[:out]^T``), ``lambda_d (*stack, r)`` and ``lambda_b (*stack, *out)``. There is no alpha
(the scale is 1). At initialisation ``lambda_b = 0`` (the layer equals the base) and
``lambda_d = d_initial``; the projections are kaiming-uniform, ``U(-sqrt(6 / fan_in),
sqrt(6 / fan_in))`` with ``fan_in`` = max_in for A and r for B, drawn from ``seed`` with
numpy (PEFT draws them with torch, so the same seed gives other numbers: PEFT adapters are
read with their saved projections, ``save_projection=True``).

The projections are :class:`Projection` objects: frozen constants held as static pytree
data, so they have no gradient, no optimiser state and no parameter count, and checkpoints
store them beside the vectors. The engine sees ``a = A_s`` and ``b = diag(lambda_d) B_s
diag(lambda_b)`` (rank-r products only; no ``in x out`` array is formed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors

SHARED = ("base_model.vera_A", "base_model.vera_B")  # PEFT's keys of the projections


@dataclasses.dataclass(frozen=True)
class Vera:
    """VeRA's settings for the weights a rule matches (``LoraRule(..., variant=lj.Vera())``).

    Example:
        >>> import lora_jax as lj
        >>> lj.LoraRule(".*/kernel", rank=16, variant=lj.Vera(seed=1)).variant.d_initial
        0.1
    """

    # Seed of the shared projections (PEFT's projection_prng_key).
    seed: int = 0
    # Initial value of every lambda_d entry (PEFT's d_initial).
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Vera(seed={self.seed!r}) must be an int >= 0.")
        if not (isinstance(self.d_initial, int | float) and math.isfinite(self.d_initial)):
            raise ValueError(f"Vera(d_initial={self.d_initial!r}) must be a finite number.")


@jax.tree_util.register_pytree_node_class
class Projection:
    """A frozen array held as static pytree data (no leaf): one of VeRA's shared factors.

    ``matrix`` is one layer's slice, ``(*in, r)`` or ``(r, *out)``; ``shape`` adds the
    weight's stack axes in front (every stacked layer uses the same slice). Equal slices
    compare and hash equal (by content), so a jitted step compiles once for them.
    """

    def __init__(self, matrix: np.ndarray, shape: tuple[int, ...]):
        self.matrix = np.asarray(matrix)
        self.shape = tuple(int(d) for d in shape)
        digest = hashlib.sha256(np.ascontiguousarray(self.matrix).tobytes())
        self._key = (digest.hexdigest(), self.matrix.shape, self.matrix.dtype.str, self.shape)

    dtype = property(lambda self: self.matrix.dtype)
    ndim = property(lambda self: len(self.shape))

    def value(self, dtype: Any = None) -> jax.Array:
        """The factor as an array of ``shape`` (a broadcast over the stack axes)."""
        return jnp.broadcast_to(jnp.asarray(self.matrix, dtype), self.shape)

    def astype(self, dtype: Any) -> jax.Array:
        return self.value(dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.broadcast_to(self.matrix, self.shape).astype(dtype or self.dtype)

    def tree_flatten(self):
        return (), self

    @classmethod
    def tree_unflatten(cls, aux: Projection, children: Any) -> Projection:
        return aux

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Projection) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Projection(shape={self.shape}, dtype={self.dtype})"


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["lambda_d", "lambda_b"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class VeraParts:
    """VeRA's trainable vectors of one weight: ``lambda_d (*stack, r)``, ``lambda_b (*stack,
    *out)``."""

    lambda_d: Any
    lambda_b: Any


def projections(seed: int, r: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared ``A (r, d_in)`` and ``B (d_out, r)`` (torch layout), kaiming-uniform from ``seed``."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-math.sqrt(6.0 / d_in), math.sqrt(6.0 / d_in), (r, d_in))
    b = rng.uniform(-math.sqrt(6.0 / r), math.sqrt(6.0 / r), (d_out, r))
    return a.astype(np.float32), b.astype(np.float32)


def _sides(shape: tuple[int, ...], axes: Any) -> tuple[tuple, tuple, tuple]:
    stack, ins, outs = axes
    return (
        tuple(shape[i] for i in stack),
        tuple(shape[i] for i in ins),
        tuple(shape[i] for i in outs),
    )


def slices(a_full: np.ndarray, b_full: np.ndarray, s_shape, in_shape, out_shape, dtype):
    """One weight's :class:`Projection` pair from the shared ``A (r, >=in)``, ``B (>=out, r)``."""
    r, d_in, d_out = a_full.shape[0], math.prod(in_shape), math.prod(out_shape)
    a = np.asarray(a_full[:, :d_in].T.reshape(in_shape + (r,)), dtype)
    b = np.asarray(b_full[:d_out].T.reshape((r,) + out_shape), dtype)
    return Projection(a, s_shape + a.shape), Projection(b, s_shape + b.shape)


class VeraVariant(_variant.Variant):
    """The plug-in hooks of VeRA (everything VeRA is, outside this module, is these)."""

    name = "vera"
    title = "VeRA"
    config_type = Vera
    parts_type = VeraParts
    plain_low_rank = False
    static_factors = True
    peft = "own"
    peft_types = ("VERA",)

    def check_rule(self, rule: Any, where: str) -> None:
        if not self.wants(rule):
            return
        for name, bad in (
            ("alpha", rule.alpha is not None),
            ("rslora", rule.rslora),
            ("init", rule.init != "gaussian"),
        ):
            if bad:
                raise ValueError(
                    f"{where}: VeRA's factors are frozen random projections with scale 1; drop "
                    f"{name}={getattr(rule, name)!r} (set only rank, dropout, param_dtype)."
                )

    def plan(self, leaves):
        """One pair of projections per (seed, rank) over all its weights, sized to the largest."""
        sizes: dict[tuple[int, int], list[int]] = {}
        for _, shape, rule, axes in leaves:
            _, ins, outs = _sides(shape, axes)
            d = sizes.setdefault((rule.variant.seed, rule.rank), [0, 0])
            d[0], d[1] = max(d[0], math.prod(ins)), max(d[1], math.prod(outs))
        return {key: projections(key[0], key[1], *d) for key, d in sizes.items()}

    def init(self, factors, base, ctx):
        rule = ctx.rule
        a_full, b_full = ctx.plans[self.name][(rule.variant.seed, rule.rank)]
        s_shape, ins, outs = _sides(ctx.shape, ctx.axes)
        a, b = slices(a_full, b_full, s_shape, ins, outs, rule.param_dtype)
        parts = VeraParts(
            lambda_d=jnp.full(s_shape + (rule.rank,), rule.variant.d_initial, rule.param_dtype),
            lambda_b=jnp.zeros(s_shape + outs, rule.param_dtype),
        )
        return dataclasses.replace(factors, a=a, b=b, alpha=float(rule.rank), variant=parts), base

    def arrays(self, t):
        p = t.variant
        return {
            "a": t.a.value(),
            "b": t.b.value(),
            "vera_lambda_d": p.lambda_d,
            "vera_lambda_b": p.lambda_b,
        }

    def replace(self, t, values):
        parts = VeraParts(values["vera_lambda_d"], values["vera_lambda_b"])
        return dataclasses.replace(t, variant=parts)

    def layout(self, t):
        return {
            "vera_lambda_d": (("stack", "r"), _variant.BASE),  # like AdaLoRA's singular
            "vera_lambda_b": (("stack", "out"), _variant.FAST),
        }

    def restore(self, t, arrays, meta):
        ns = len(t.stack_axes)
        first = (0,) * ns  # every stacked layer holds the same slice
        a = Projection(np.asarray(t.a)[first], tuple(t.a.shape))
        b = Projection(np.asarray(t.b)[first], tuple(t.b.shape))
        parts = VeraParts(arrays["vera_lambda_d"], arrays["vera_lambda_b"])
        return dataclasses.replace(t, a=a, b=b, variant=parts)

    def check_entry(self, entry: dict, where: str) -> None:
        arrays = entry["arrays"]
        names = {n for n in arrays if self.owns(n)}
        if not names:
            return
        a, b = arrays["a"]["shape"], arrays["b"]["shape"]
        ns = len(entry["stack_axes"])
        want = {"vera_lambda_d": a[:ns] + [a[-1]], "vera_lambda_b": b[:ns] + b[ns + 1 :]}
        got = {n: list(arrays[n]["shape"]) for n in names}
        if got != want:
            raise ValueError(
                f"{where}: VeRA arrays {got} do not fit a {a}, b {b} (expected {want}); corrupted "
                f"metadata."
            )

    def low_rank(self, t, a, b):
        p, ns = t.variant, len(t.stack_axes)
        b = b.value()
        d = p.lambda_d.reshape(p.lambda_d.shape + (1,) * len(t.out_axes)).astype(b.dtype)
        lb = p.lambda_b.astype(b.dtype)
        return a.value(), d * b * lb.reshape(lb.shape[:ns] + (1,) + lb.shape[ns:])

    # --- PEFT: VeraConfig, <module>.vera_lambda_d (r,), .vera_lambda_b (out,), vera_A, vera_B
    def peft_tensors(self, t, layer):
        """One torch module's tensors: ``{suffix: array}``."""
        p = t.variant
        d, lb = np.asarray(p.lambda_d), np.asarray(p.lambda_b)
        if layer is not None:
            d, lb = d[layer], lb[layer]
        return {"vera_lambda_d": d, "vera_lambda_b": lb.reshape(-1)}

    def peft_config(self, config: dict, leaves: list) -> tuple[dict, dict]:
        """``(shared tensors, VeraConfig dict)`` from the LoRA config and every VeRA leaf."""
        mats = [
            (
                np.asarray(t.a.matrix).reshape(-1, t.rank).T,
                np.asarray(t.b.matrix).reshape(t.rank, -1).T,
            )
            for t in leaves
        ]
        a_full = max((a for a, _ in mats), key=lambda x: x.shape[1])
        b_full = max((b for _, b in mats), key=lambda x: x.shape[0])
        for a, b in mats:
            if not (
                np.array_equal(a, a_full[:, : a.shape[1]])
                and np.array_equal(b, b_full[: b.shape[0]])
            ):
                raise ValueError(
                    "VeRA factors of this tree do not share one pair of projections (PEFT has one "
                    "vera_A, vera_B per adapter); split them with one lj.Vera(seed=...) and rank."
                )
        keep = ("task_type", "base_model_name_or_path", "target_modules", "modules_to_save")
        vera = {k: config[k] for k in (*keep, "fan_in_fan_out")}
        vera.update(
            peft_type="VERA",
            r=int(a_full.shape[0]),
            projection_prng_key=0,
            save_projection=True,
            vera_dropout=config["lora_dropout"],
            d_initial=0.1,
            bias="none",
            init_weights=True,
            inference_mode=True,
        )
        return dict(zip(SHARED, (a_full, b_full))), vera

    def peft_check_config(self, config: dict, path: str) -> None:
        r = config.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{path}: r={r!r} must be a positive int; fix the config.")
        if not config.get("save_projection", True):
            raise ValueError(
                f"{path}: save_projection=False: the projections would come from torch's random "
                f"generator; re-save the adapter with VeraConfig(save_projection=True)."
            )
        drop = config.get("vera_dropout", 0.0)
        if not (isinstance(drop, int | float) and 0 <= drop < 1):
            raise ValueError(f"{path}: vera_dropout={drop!r} must be a number in [0, 1).")

    def peft_read(self, tensors, consumed, config, key_prefix, path, w_shape, layer, out_in=False):
        """One torch module's VeRA arrays (with the shared projections), or None."""
        kd, kb = key_prefix + "vera_lambda_d", key_prefix + "vera_lambda_b"
        if kd not in tensors:
            return None
        if out_in:
            raise ValueError(
                f"'{path}': VeRA adapters load into (in, out) kernels only, and the key map "
                f"stores this weight (out, in) (layout 'linear_out_in', as Equinox does); load "
                f"the model with (in, out) kernels (a Flax model) or use a LoRA adapter."
            )
        missing = [k for k in (kb, *SHARED) if k not in tensors]
        if missing:
            raise ValueError(f"VeRA adapter has '{kd}' but no {missing}; the file is incomplete.")
        consumed.update((kd, kb, *SHARED))
        (a_full, b_full), r = (tensors[k] for k in SHARED), config["r"]
        d, lb = tensors[kd], tensors[kb]
        d_out = lb.size
        k = next((i for i in range(1, len(w_shape)) if math.prod(w_shape[i:]) == d_out), None)
        where = f"'{path}'" + ("" if layer is None else f" layer {layer}")
        if (
            d.shape != (r,)
            or lb.ndim != 1
            or k is None
            or a_full.shape[0] != r
            or b_full.shape[1] != r
            or a_full.shape[1] < math.prod(w_shape[:k])
            or b_full.shape[0] < d_out
        ):
            raise ValueError(
                f"'{kd}' {d.shape}, '{kb}' {lb.shape}, vera_A {a_full.shape} and vera_B "
                f"{b_full.shape} do not fit the base weight {where} of shape {w_shape} with "
                f"r={r}: expected ({r},), (out,), ({r}, >= in), (>= out, {r})."
            )
        return {
            "k": k,
            "lambda_d": d,
            "lambda_b": lb.reshape(w_shape[k:]),
            "A": a_full,
            "B": b_full,
        }

    def peft_assemble(self, found, stacked, shape, config, path):
        """The LoraFactors of one leaf from its modules' :meth:`peft_read` results."""
        present = [f for f in found if f is not None]
        if not present:
            return None
        f0, ns = present[0], int(stacked)
        k = f0["k"]
        if stacked:  # layers the adapter misses get lambda = 0: no update there
            lam = lambda n: np.stack([np.zeros_like(f0[n]) if f is None else f[n] for f in found])  # noqa: E731
            d, lb = lam("lambda_d"), lam("lambda_b")
        else:
            d, lb = f0["lambda_d"], f0["lambda_b"]
        s_shape = tuple(shape[:ns])
        a, b = slices(
            f0["A"], f0["B"], s_shape, tuple(shape[ns : ns + k]), tuple(shape[ns + k :]), d.dtype
        )
        return LoraFactors(
            a=a,
            b=b,
            alpha=float(config["r"]),
            stack_axes=tuple(range(ns)),
            in_axes=tuple(range(ns, ns + k)),
            out_axes=tuple(range(ns + k, len(shape))),
            dropout=float(config.get("vera_dropout", 0.0)),
            variant=VeraParts(jnp.asarray(d), jnp.asarray(lb)),
        )


VERA = _variant.register(VeraVariant())
