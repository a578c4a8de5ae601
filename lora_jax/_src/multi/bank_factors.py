"""BankFactors: one adapted weight's factors for every slot of an adapter bank.

Slot ``0`` is the base (zero factors). :meth:`BankFactors.select` picks one slot's
factors (gathered per example under ``jax.vmap``); :meth:`BankFactors.gated` keeps every
slot's factors side by side and zeroes all but one slot's rank columns, so a batch that
mixes slots still runs each low-rank product as one matmul (:func:`use_gates` picks the
form for a bank).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lora_jax._src.core.explicit import explicit_spec
from lora_jax._src.core.factors import LoraFactors


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["a", "b", "scale"],
    meta_fields=["stack_axes", "in_axes", "out_axes"],
)
@dataclasses.dataclass(frozen=True)
class BankFactors:
    """The factors of one adapted weight for every slot of a bank.

    ``a`` ``(slots, *stack, *in_axes, R)`` and ``b`` ``(slots, *stack, R, *out_axes)``, zero-padded
    to the bank's rank R; ``scale`` ``(slots,)``, each adapter's alpha / r.
    """

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

    def concatenated(self) -> tuple[jax.Array, jax.Array]:
        """Slots ``1..`` side by side along the rank axis: a ``(*stack, *in_axes, (slots-1) R)``
        and b ``(*stack, (slots-1) R, *out_axes)``, slot-major (slot 0 holds zeros: left out)."""
        ns = len(self.stack_axes)
        a = jnp.moveaxis(self.a[1:], 0, -2)
        b = jnp.moveaxis(self.b[1:], 0, ns)
        a = a.reshape(a.shape[:-2] + (-1,))
        b = b.reshape(b.shape[:ns] + (-1,) + b.shape[ns + 2 :])
        return a, b

    def gated(self, idx: Any, a: jax.Array, b: jax.Array) -> LoraFactors:
        """Slot ``idx`` as the concatenated factors ``(a, b)`` with a gate that keeps only its
        rank columns (times its scale): ``a @ (gate * b)`` equals ``select(idx)``'s update.

        Every example then shares ``a`` and ``b``, so under ``jax.vmap`` each low-rank product is
        one matmul for the whole batch. An id outside ``0..slots-1`` gives a NaN gate.
        """
        slots, r = self.a.shape[0], self.a.shape[-1]
        idx = jnp.asarray(idx)
        owner = jnp.arange(1, slots) == idx
        gate = jnp.where(owner, self.scale[1:], 0.0)
        gate = jnp.where((idx >= 0) & (idx < slots), gate, jnp.nan)
        gate = jnp.repeat(gate, r).astype(b.dtype)
        rank = a.shape[-1]
        return LoraFactors(
            a, b, float(rank), self.stack_axes, self.in_axes, self.out_axes, gate=gate
        )


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


#: Largest ``(slots - 1) * R`` served by gated concatenated factors; wider banks gather each
#: example's factors instead. Measured by ``experiments/bank_throughput.py`` (docs/benchmarks.md).
GATED_MAX_COLUMNS = 64


def use_gates(leaves: list[Any]) -> bool:
    """Whether a mixed batch runs every slot's factors side by side, gated per example.

    A batched product with gathered factors (BGMV) costs a per-example matmul of rank R;
    the gated form costs one matmul of rank ``(slots - 1) R`` for the whole batch. On an
    Explicit mesh the gathered form keeps the factors' own shardings, so it stays there.
    """
    factors = [x for x in leaves if isinstance(x, BankFactors)]
    if not factors or any(explicit_spec(x.a) is not None for x in factors):
        return False
    return all((x.a.shape[0] - 1) * x.a.shape[-1] <= GATED_MAX_COLUMNS for x in factors)
