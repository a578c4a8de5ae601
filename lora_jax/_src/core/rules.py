"""LoraRule and rule matching: which parameter leaves get factors, and how.

A parameter's path is the "/"-joined key path of its leaf, e.g.
``params/encoder/layer_0/attention/query/kernel``. Each rule's pattern is
matched with :func:`re.fullmatch`; the first rule that matches a leaf wins.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant

INITS = ("gaussian", "kaiming", "pissa", "pissa_niter_<n>", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def is_principal_init(init: str) -> bool:
    """Whether ``init`` moves part of W0 into the factors (PiSSA, OLoRA): the base changes."""
    return init in ("pissa", "olora") or _PISSA_NITER.fullmatch(init) is not None


@dataclasses.dataclass(frozen=True)
class LoraRule:
    """How the leaves whose path matches ``pattern`` are adapted.

    Attributes:
        pattern: regex matched with :func:`re.fullmatch` against each leaf's "/"-joined
            path (``params/layer_0/query/kernel``; NNX state paths end in ``/value``).
            The first rule that matches a leaf wins; a rule that matches nothing raises.
        rank: LoRA rank ``r`` (required unless ``full=True``).
        alpha: scale numerator, ``delta W = (alpha / rank) * a @ b``; default ``2 * rank``.
        full: train the matched leaf fully instead of adapting it (PEFT's
            ``modules_to_save``); ``rank``/``alpha`` must then be unset.
        init: ``"gaussian"`` (``a ~ N(0, 1/r^2)``, PEFT's ``init_lora_weights="gaussian"``),
            ``"kaiming"`` (PEFT's default kaiming-uniform, bound ``1/sqrt(fan_in)``),
            ``"pissa"``/``"pissa_niter_<n>"`` (top-r singular triplets of ``W0``, the
            residual becomes the frozen base) or ``"olora"`` (QR of ``W0``); ``b = 0`` for
            the first two.
        in_axes: the weight's axes contracted with the function's input (``a``'s side).
            ``None``: read from the weight's first contraction when ``split`` gets
            ``apply_fn=``, else ``(0,)`` for a 2-D weight (with a warning); ``(1,)`` for an
            ``(out, in)`` weight such as ``eqx.nn.Linear.weight``.
        stack_axes: leading axes that index stacked layers (each layer gets its own
            factors); ``None``: inferred with ``apply_fn=`` (``lax.scan``, batched
            einsums), else ``()``. Also how to give each part of a fused kernel its own
            adapter (Gemma's ``kv_einsum`` ``(2, heads, embed, head_dim)``: ``(0,)``).
        dropout: dropout probability on the adapter branch's input, active when
            ``lora_apply``'s wrapper gets ``lora_rng=``.
        param_dtype: storage dtype of the factors (float32 by default).
        rslora: scale by ``alpha / sqrt(rank)`` (rsLoRA; PEFT's ``use_rslora``).
        dora: DoRA, a trainable magnitude per output column (PEFT's ``use_dora``).
        adalora: AdaLoRA, ``delta W = P diag(lambda) Q`` with trainable singular values.
        glora: GLoRA support tensors: ``True`` for ``lj.Glora()`` or an ``lj.Glora(...)``.

    Example:
        >>> import lora_jax as lj
        >>> lj.LoraRule(r".*/(query|value)/kernel", rank=8).scale
        2.0
    """

    # Regex matched with re.fullmatch against the "/"-joined parameter path.
    pattern: str
    _: dataclasses.KW_ONLY
    # LoRA rank r; required unless full=True.
    rank: int | None = None
    # Scale numerator: delta W = (alpha / rank) a @ b. Defaults to 2 * rank.
    alpha: float | None = None
    # Train the matched leaf fully instead (PEFT's modules_to_save).
    full: bool = False
    # Initialisation ("gaussian": a ~ N(0, 1/r^2) as PEFT's init="gaussian"; "kaiming":
    # PEFT's default kaiming-uniform; b = 0 for both). "pissa" (Meng et al., 2024): the top-r
    # singular triplets of W0 go into a and b, split returns the residual as the frozen base;
    # "pissa_niter_<n>": the same from a randomised SVD with n power iterations; "olora"
    # (Buyukakyuz, 2024): a, b from a QR decomposition of W0, residual frozen. See lj.variants.
    init: str = "gaussian"
    # Axes of the weight contracted with the function's input (the `a` side).
    # None: (0,) for a 2-D weight; inferred from the function for higher ranks.
    in_axes: tuple[int, ...] | None = None
    # Leading axes that index stacked layers (each gets its own factors).
    # None: () for a 2-D weight; inferred from the function for higher ranks.
    stack_axes: tuple[int, ...] | None = None
    # Dropout probability on the adapter branch's input (needs `lora_rng=` at apply time).
    dropout: float = 0.0
    # Storage dtype of the factors.
    param_dtype: Any = jnp.float32
    # Rank-stabilised scale alpha / sqrt(rank) (Kalajdzievski, 2023; PEFT's use_rslora).
    rslora: bool = False
    # DoRA (Liu et al., 2024): a trainable magnitude per output column (PEFT's use_dora).
    dora: bool = False
    # AdaLoRA (Zhang et al., 2023): delta W = P diag(lambda) Q with trainable singular values.
    adalora: bool = False
    # GLoRA (Chavan et al., 2023): W = W0 + W0 * A + B and b = b0 + b0 * D + E + C . W0,
    # B the rank-r term. True: the fixed configuration lj.Glora(); or lj.Glora(a=..., ...).
    glora: Any = False
    # Any other registered variant: its config object, e.g. lj.Vera() (see lj.variants).
    variant: Any = None

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        where = f"LoraRule({self.pattern!r})"
        if not isinstance(self.pattern, str):
            raise TypeError(f"{where}: pattern must be a str regex, got {type(self.pattern)}.")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"{where}: invalid regex ({e}); escape special characters.") from e
        if self.full:
            if self.rank is not None or self.alpha is not None:
                raise ValueError(f"{where}: full=True trains the leaf fully; drop rank/alpha.")
        else:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int | np.integer):
                raise TypeError(f"{where}: rank must be a positive int, got {self.rank!r}.")
            if self.rank <= 0:
                raise ValueError(f"{where}: rank={self.rank} must be positive; use rank >= 1.")
            if self.alpha is not None and not (
                isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0
            ):
                raise ValueError(
                    f"{where}: alpha={self.alpha!r} must be a finite number > 0 "
                    f"(default 2 * rank = {2 * self.rank})."
                )
        if not isinstance(self.init, str) or not (
            self.init in ("gaussian", "kaiming") or is_principal_init(self.init)
        ):
            raise ValueError(f"{where}: init={self.init!r} is not one of {INITS}.")
        if self.variant is not None and _variant.for_config(self.variant) is None:
            raise TypeError(
                f"{where}: variant={self.variant!r} is not the config of a registered variant; "
                f"pass e.g. lj.Vera(), or register the variant first."
            )
        for v in _variant.variants():
            v.check_rule(self, where)
        chosen = _variant.wanted_by(self)
        exclusive = [v.name for v in chosen if v.exclusive]
        if len(exclusive) > 1:
            raise ValueError(f"{where}: {' and '.join(exclusive)} cannot be combined; pick one.")
        if self.full and chosen:
            raise ValueError(
                f"{where}: full=True trains the leaf fully; drop "
                f"{'/'.join(v.name for v in chosen)}."
            )
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"{where}: dropout={self.dropout!r} must be in [0, 1).")
        try:
            is_float = jnp.issubdtype(self.param_dtype, jnp.floating)
        except TypeError:
            is_float = False
        if not is_float:
            raise ValueError(
                f"{where}: param_dtype={self.param_dtype!r} must be a float dtype "
                f"(e.g. jnp.float32 or jnp.bfloat16)."
            )
        for name in ("in_axes", "stack_axes"):
            axes = getattr(self, name)
            if axes is not None:
                if isinstance(axes, int):
                    object.__setattr__(self, name, (axes,))
                elif not all(isinstance(i, int) for i in axes):
                    raise TypeError(f"{where}: {name} must be a tuple of ints, got {axes!r}.")
                else:
                    object.__setattr__(self, name, tuple(axes))

    @property
    def resolved_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """alpha / rank (alpha / sqrt(rank) with rslora)."""
        denom = math.sqrt(self.rank) if self.rslora else self.rank
        return self.resolved_alpha / denom


def path_str(key_path: Sequence[Any]) -> str:
    """'/'-joined form of a jax key path: ``params/layer_0/kernel``."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def match_rules(paths: Sequence[str], rules: Sequence[LoraRule]) -> list[LoraRule | None]:
    """The first rule matching each path (None where none does).

    Raises:
        ValueError: a rule matches no path, or no path is matched at all.
    """
    if isinstance(rules, LoraRule):
        rules = [rules]
    for rule in rules:
        if not isinstance(rule, LoraRule):
            raise TypeError(f"rules must be LoraRule instances, got {type(rule).__name__}.")
    compiled = [re.compile(rule.pattern) for rule in rules]
    chosen: list[LoraRule | None] = []
    used = [False] * len(rules)
    for path in paths:
        for i, regex in enumerate(compiled):
            if regex.fullmatch(path):
                chosen.append(rules[i])
                used[i] = True
                break
        else:
            chosen.append(None)
    unused = [rules[i].pattern for i, u in enumerate(used) if not u]
    if unused:
        sample = ", ".join(repr(p) for p in list(paths)[:6])
        raise ValueError(
            f"rule pattern(s) {unused} matched no parameter (patterns use re.fullmatch on "
            f"'/'-joined paths such as {sample}); fix the pattern or drop the rule."
        )
    if all(c is None for c in chosen):
        raise ValueError("no parameter is adapted or trained; every leaf would be frozen.")
    return chosen
