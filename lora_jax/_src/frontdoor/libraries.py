"""One-call splits for Flax NNX modules and Equinox models, over :func:`lora_jax.split`.

Each helper takes the library's model object, splits out its arrays the way the
library does (``nnx.split``, ``eqx.partition``), adapts them and returns what a
training loop needs: the frozen and trainable trees, an ``apply`` function of them,
and what puts the model back together (``nnx.merge``/``nnx.update``, ``eqx.combine``).
The library is imported when a helper is called, never at ``import lora_jax``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from lora_jax._src.core.rules import LoraRule
from lora_jax._src.ops.apply import lora_apply
from lora_jax._src.ops.merge import merge as merge_pair
from lora_jax._src.ops.split import split as split_tree


def _call(model: Any, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


def _split_and_wrap(run, tree, rules, key, args, kwargs, strict):
    """``(frozen, trainable, lora_apply(run))`` of ``tree``, where ``run(tree, *args,
    **kwargs)`` calls the model; with example inputs, split reads each weight's layout."""
    frozen, trainable = split_tree(
        tree, rules, key=key, apply_fn=run if args or kwargs else None, args=args, kwargs=kwargs
    )
    return frozen, trainable, lora_apply(run, strict=strict)


class NnxLora(NamedTuple):
    """What :func:`lora_jax.nnx.split` returns.

    Attributes:
        graphdef: the module's ``nnx.GraphDef`` (static structure).
        frozen: ``nnx.State`` of the base (``None`` at fully trained leaves).
        trainable: ``nnx.State`` with :class:`~lora_jax.LoraFactors` at adapted leaves.
        apply: ``apply(frozen, trainable, *args, lora_rng=None, **kwargs)``, the module's
            call (or ``call(module, *args, **kwargs)``) with the adapted weights.
    """

    graphdef: Any
    frozen: Any
    trainable: Any
    apply: Callable


class EqxLora(NamedTuple):
    """What :func:`lora_jax.eqx.split` returns.

    Attributes:
        frozen: the array half of ``eqx.partition(model, eqx.is_array)`` (``None`` at fully
            trained leaves and wherever the model holds no array).
        trainable: the same structure with :class:`~lora_jax.LoraFactors` at adapted leaves.
        static: the non-array half, for ``eqx.combine``.
        apply: ``apply(frozen, trainable, *args, lora_rng=None, **kwargs)``, the model's
            call (or ``call(model, *args, **kwargs)``) with the adapted weights.
    """

    frozen: Any
    trainable: Any
    static: Any
    apply: Callable


def nnx_split(
    module: Any,
    rules: Sequence[LoraRule] | LoraRule,
    *,
    key: jax.Array,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    call: Callable = _call,
    strict: bool = False,
) -> NnxLora:
    """Adapt a Flax NNX module: ``nnx.split`` it and split its state.

    Args:
        module: an ``nnx.Module``; its state's paths end in ``/value``
            (``layers/0/kernel/value``), which the rules' patterns match.
        rules, key: as for :func:`lora_jax.split`.
        args, kwargs: example inputs of ``call``; with them every adapted weight's
            input axes are read from its first use (pass them for attention, einsum and
            conv weights).
        call: ``call(module, *args, **kwargs)`` runs the model (default: ``module(*args)``).
        strict: passed to :func:`lora_jax.lora_apply` (raise instead of materialising).

    Returns:
        :class:`NnxLora` ``(graphdef, frozen, trainable, apply)``. After training,
        :func:`lora_jax.nnx.merge` writes the merged weights back into the module.
    """
    from flax import nnx

    graphdef, state = nnx.split(module)

    def run(s: Any, *a: Any, **k: Any) -> Any:
        return call(nnx.merge(graphdef, s), *a, **k)

    frozen, trainable, apply = _split_and_wrap(run, state, rules, key, args, kwargs, strict)
    return NnxLora(graphdef, frozen, trainable, apply)


def nnx_merge(module: Any, frozen: Any, trainable: Any) -> Any:
    """Write ``W0 + scale * a @ b`` (and the trained leaves) into ``module`` (``nnx.update``)."""
    from flax import nnx

    nnx.update(module, merge_pair(frozen, trainable))
    return module


def eqx_split(
    model: Any,
    rules: Sequence[LoraRule] | LoraRule,
    *,
    key: jax.Array,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    call: Callable = _call,
    strict: bool = False,
) -> EqxLora:
    """Adapt an Equinox model: ``eqx.partition(model, eqx.is_array)`` and split the arrays.

    Args:
        model: an ``eqx.Module``; paths are its attribute names (``layers/0/weight``).
        rules, key: as for :func:`lora_jax.split`.
        args, kwargs: example inputs of ``call``; with them every weight's input side is
            read from its first use (``eqx.nn.Linear.weight`` is ``(out, in)``: ``a``
            goes on axis 1). Without them 2-D weights are assumed ``(in, out)``, which is
            wrong for Equinox layers: pass them, or set ``LoraRule(in_axes=(1,))``.
        call: ``call(model, *args, **kwargs)`` runs the model (default: ``model(*args)``;
            e.g. ``lambda m, x: jax.vmap(m)(x)`` for a batch).
        strict: passed to :func:`lora_jax.lora_apply`.

    Returns:
        :class:`EqxLora` ``(frozen, trainable, static, apply)``; :func:`lora_jax.eqx.merge`
        rebuilds a plain model with the merged weights.
    """
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_array)

    def run(p: Any, *a: Any, **k: Any) -> Any:
        return call(eqx.combine(p, static), *a, **k)

    frozen, trainable, apply = _split_and_wrap(run, params, rules, key, args, kwargs, strict)
    return EqxLora(frozen, trainable, static, apply)


def eqx_merge(static: Any, frozen: Any, trainable: Any) -> Any:
    """The Equinox model with ``W0 + scale * a @ b`` at adapted weights (``eqx.combine``)."""
    import equinox as eqx

    return eqx.combine(merge_pair(frozen, trainable), static)
