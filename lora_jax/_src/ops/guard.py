"""Numerical-fault guard: skip non-finite adapter updates under jit, and report them with the step.

The skipping is optax's own :func:`optax.apply_if_finite` (one ``isfinite`` reduction over the
gradients, i.e. over the small trainable tree, plus a select: well under 1% of a LoRA step);
this module adds the report that names the step, so a NaN batch is neither silent nor able to
poison the adapter.
"""

from __future__ import annotations

from typing import Any

import jax
import optax


class NonFiniteError(FloatingPointError):
    """A training step produced non-finite gradients; the adapter was left unchanged."""


def finite_guard(optimizer: optax.GradientTransformation, *, max_consecutive: int = 1_000_000):
    """``optimizer`` that skips any step whose gradients contain NaN or Inf (works under jit).

    Pair it with :func:`check_finite` after each step to learn which steps were skipped.

    Example:
        >>> import jax.numpy as jnp, optax, lora_jax as lj
        >>> opt = lj.finite_guard(optax.sgd(0.1))
        >>> params = {"a": jnp.ones(2)}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"a": jnp.array([jnp.nan, 1.0])}, state, params)
        >>> updates["a"].tolist(), bool(state.last_finite)
        ([0.0, 0.0], False)
    """
    return optax.apply_if_finite(optimizer, max_consecutive_errors=max_consecutive)


def _guard_states(opt_state: Any) -> list[optax.ApplyIfFiniteState]:
    is_guard = lambda x: isinstance(x, optax.ApplyIfFiniteState)
    return [s for s in jax.tree.leaves(opt_state, is_leaf=is_guard) if is_guard(s)]


def check_finite(opt_state: Any, step: int) -> None:
    """Raise :class:`NonFiniteError` if the last update of a :func:`finite_guard` was skipped.

    Call it outside jit after each step (it reads one boolean from the device).

    Raises:
        NonFiniteError: naming ``step`` and the number of skipped steps so far.
        ValueError: ``opt_state`` holds no finite_guard state.
    """
    guards = _guard_states(opt_state)
    if not guards:
        raise ValueError(
            "opt_state has no finite_guard state; build the optimiser with "
            "lj.finite_guard(optax_optimizer)."
        )
    for g in guards:
        if not bool(g.last_finite):
            raise NonFiniteError(
                f"step {step}: non-finite loss or gradients (NaN/Inf in the batch or the "
                f"model); the adapter update was skipped ({int(g.total_notfinite)} skipped so "
                f"far). Inspect the batch of this step."
            )
