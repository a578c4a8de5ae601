"""LoRA+ (Hayou et al., 2024): the output-side factor ``b`` learns ``ratio`` times faster."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.trees import is_node
from lora_jax._src.core.variant import BASE, FAST


def lora_plus_labels(trainable: Any) -> Any:
    """The optimiser group of every trainable array: ``"base"`` (lr) or ``"fast"`` (ratio * lr).

    ``a`` and AdaLoRA's ``singular`` ``(*stack, r)`` are ``"base"``; ``b`` and DoRA's
    ``magnitude`` are ``"fast"`` (PEFT's ``create_loraplus_optimizer`` puts ``lora_B`` and
    every 1-D parameter, hence ``lora_magnitude_vector``, in the fast group and
    ``lora_E (r, 1)`` in the base one). GLoRA's random-init halves are ``"base"``, its
    zero-init halves, vectors and scalars ``"fast"``. Fully trained leaves are ``"base"``.
    """

    def leaf(t: Any) -> Any:
        if isinstance(t, LoraFactors):
            static = any(v.static_factors for v in _variant.present(t))
            out = t if static else t.with_factors(BASE, FAST)
            for v in _variant.present(t):  # each variant names the group of its arrays
                out = v.replace(out, {n: group for n, (_, group) in v.layout(t).items()})
            return out
        return None if t is None else BASE

    return jax.tree.map(leaf, trainable, is_leaf=is_node)


def lora_plus(
    optimizer: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
) -> optax.GradientTransformation:
    """An optimiser with learning rate ``lr`` for ``a`` and ``ratio * lr`` for ``b``.

    LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models")
    shows that equal rates for ``a`` and ``b`` are inefficient for wide models and sets
    ``lr_b = ratio * lr_a`` (their default ratio 16). Groups as :func:`lora_plus_labels`.

    Args:
        optimizer: builds one optax transformation from a learning rate, e.g.
            ``optax.adam`` or ``lambda lr: optax.adamw(lr, weight_decay=0.01)``.
        learning_rate: ``lr`` of ``a`` (a float or an optax schedule).
        ratio: ``lr_b / lr_a`` (> 0).

    Returns:
        ``optax.multi_transform`` over the two groups; ``init``/``update`` take the
        trainable tree from :func:`lora_jax.split`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
        >>> _, trainable = lj.split({"w": jnp.ones((4, 4))}, lj.LoraRule("w", rank=2),
        ...                         key=jax.random.key(0))
        >>> opt = lj.lora_plus(optax.sgd, 0.1, ratio=16)
        >>> grads = jax.tree.map(jnp.ones_like, trainable)
        >>> updates, _ = opt.update(grads, opt.init(trainable), trainable)
        >>> round(float(updates["w"].a[0, 0]), 4), round(float(updates["w"].b[0, 0]), 4)
        (-0.1, -1.6)
    """
    if isinstance(ratio, bool) or not (
        isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0
    ):
        raise ValueError(f"ratio={ratio!r} must be a finite number > 0 (LoRA+ suggests 16).")
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must build a transformation from a learning rate (e.g. optax.adam), "
            f"got {type(optimizer).__name__}."
        )
    if callable(learning_rate):
        fast_lr = lambda count: ratio * learning_rate(count)  # noqa: E731
    else:
        fast_lr = ratio * learning_rate
    return optax.multi_transform(
        {BASE: optimizer(learning_rate), FAST: optimizer(fast_lr)}, lora_plus_labels
    )
