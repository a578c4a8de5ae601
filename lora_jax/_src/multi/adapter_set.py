"""AdapterSet: named adapters on one frozen base, served from one AdapterBank."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax._src.core.trees import check_pair
from lora_jax._src.multi.bank import AdapterBank, stack_adapters


class AdapterSet:
    """Named adapters on one frozen base, served from one :class:`AdapterBank`.

    The base is held by reference (never copied). Adapters get the free slots of a bank
    of ``slots`` slots (slot 0, the base, is reserved); adding, deleting, switching or
    re-weighting adapters keeps the bank's shapes, so :meth:`apply`'s compiled function is
    reused. ``max_rank`` defaults to the first adapter's largest rank.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> frozen, t = lj.split({"w": jnp.ones((3, 2))}, lj.LoraRule("w", rank=1),
        ...                      key=jax.random.key(0))
        >>> t = jax.tree.map(lambda f: f.with_factors(f.a, f.b + 1.0), t,
        ...                  is_leaf=lambda x: isinstance(x, lj.LoraFactors))
        >>> adapters = lj.AdapterSet(frozen, slots=4)
        >>> adapters.add("task", t)
        >>> f = adapters.apply(lambda p, x: x @ p["w"])
        >>> x = jnp.ones((2, 3))
        >>> bool(jnp.allclose(f(x), lj.lora_apply(lambda p, x: x @ p["w"])(frozen, t, x)))
        True
        >>> with adapters.disabled():
        ...     f(x)
        Array([[3., 3.],
               [3., 3.]], dtype=float32)
    """

    def __init__(self, frozen: Any, *, slots: int = 8, max_rank: int | None = None, base=None):
        self.frozen = frozen
        self.bank: AdapterBank | None = None
        self.active: str | None = None
        self._slots, self._max_rank, self._base = slots, max_rank, base
        self._names: dict[str, int] = {}

    def names(self) -> list[str]:
        """Adapter names in slot order."""
        return sorted(self._names, key=self._names.get)

    def slot(self, name: str | None) -> int:
        """The bank slot of ``name`` (``None``: slot 0, the base)."""
        if name is None:
            return 0
        if name not in self._names:
            raise KeyError(f"no adapter named {name!r}; have {self.names()}.")
        return self._names[name]

    def add(self, name: str, trainable: Any) -> None:
        """Load ``trainable`` under ``name`` (the first one added becomes active)."""
        if name in self._names:
            raise ValueError(f"an adapter named {name!r} exists; delete it first or rename.")
        check_pair(self.frozen, trainable)
        if self.bank is None:
            self.bank = stack_adapters(
                [trainable], base=self._base, slots=self._slots, max_rank=self._max_rank
            )
            slot = 1
        else:
            free = sorted(set(range(1, self.bank.num_slots)) - set(self._names.values()))
            if not free:
                raise ValueError(
                    f"all {self.bank.num_slots - 1} adapter slots are used; delete one or "
                    f"create the set with AdapterSet(frozen, slots=...) larger."
                )
            slot = free[0]
            self.bank = self.bank.set(slot, trainable)
        self._names[name] = slot
        self.active = name if self.active is None else self.active

    def delete(self, name: str) -> None:
        """Remove ``name`` (its slot becomes free; the base becomes active if it was)."""
        self.bank = self.bank.clear(self.slot(name))
        del self._names[name]
        self.active = None if self.active == name else self.active

    def set_active(self, name: str | None) -> None:
        """Make ``name`` the adapter :meth:`apply` uses by default (``None``: the base)."""
        self.slot(name)
        self.active = name

    @contextlib.contextmanager
    def disabled(self):
        """Within the block, :meth:`apply` runs the base model (e.g. DPO's reference model)."""
        previous, self.active = self.active, None
        try:
            yield
        finally:
            self.active = previous

    def trainable(self, name: str | None = None) -> Any:
        """``name``'s (default: the active adapter's) tree, for ``lj.merge``/``lj.unmerge``."""
        return self._bank().select(self.slot(self.active if name is None else name))

    def ids(self, names: Sequence[str | None]) -> jax.Array:
        """Slots ``(len(names),)`` int32 for ``adapter_ids=`` (``None``: the base)."""
        return jnp.asarray([self.slot(n) for n in names], jnp.int32)

    def _bank(self) -> AdapterBank:
        if self.bank is None:
            raise ValueError("the set holds no adapters yet; call add(name, trainable) first.")
        return self.bank

    def apply(self, fn: Callable, *, static_argnums: Sequence[int] = ()) -> Callable:
        """Jitted ``call(*args, adapter=None, **kw)`` running ``fn(params, *args, **kw)``.

        ``adapter`` is a name, ``None`` (the active adapter, or the base inside
        :meth:`disabled`), or a sequence of names (or ``None``), one per example of the
        batch (axis 0 of the array arguments). ``static_argnums`` index ``args``.
        """
        from lora_jax._src.ops.apply import lora_apply  # _apply delegates to this module

        inner = lambda frozen, bank, ids, *a, **k: lora_apply(fn)(
            frozen, bank, *a, adapter_ids=ids, **k
        )
        jitted = jax.jit(inner, static_argnums=tuple(3 + i for i in static_argnums))
        use = object()

        def call(*args: Any, adapter: Any = use, **kw: Any) -> Any:
            chosen = self.active if adapter is use else adapter
            if chosen is None or isinstance(chosen, str):
                ids = jnp.asarray(self.slot(chosen), jnp.int32)
            else:
                ids = self.ids(chosen)
            return jitted(self.frozen, self._bank(), ids, *args, **kw)

        return call
