"""AdaLoRA (Zhang et al., 2023): budgeted rank allocation by importance-driven pruning.

An AdaLoRA leaf (``LoraRule(adalora=True)``) holds ``delta W = scale * P diag(lambda) Q``
with ``P = a (*stack, in, r)``, ``lambda = singular (*stack, r)``, ``Q = b (*stack, r, out)``.
Training adds :func:`orthogonal_regularizer` to the loss and calls
:meth:`RankAllocator.update` after every optimiser step, which

1. scores every entry ``w`` of ``P``, ``lambda`` and ``Q`` by its sensitivity
   ``I = |w * dL/dw|``, smoothed ``Ibar <- beta1 Ibar + (1 - beta1) I`` with uncertainty
   ``Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|`` and score ``s = Ibar * Ubar`` (paper eq. 8-10);
2. scores each triplet ``i`` by ``s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` (eq. 7);
3. keeps the ``b(t)`` best triplets over all leaves and layers, zeroing the other ``lambda_i``:
   ``b(t)`` falls from the initial total rank to ``target_rank`` per matrix with a cubic
   schedule between ``tinit`` and ``total_steps - tfinal`` (eq. 11), masks are recomputed
   every ``delta_t`` steps and fixed (and reapplied every step) in the last ``tfinal`` steps.

This is PEFT's ``RankAllocator`` / ``AdaLoraModel.update_and_allocate`` step for step
(same schedule, ties and phases). The masks live in :class:`AdaLoraState` as arrays, so a
jitted training step compiles once for all budgets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.trees import is_node, leaves_with_paths


class AdaLora(_variant.Variant):
    """The plug-in hooks: ``singular (*stack, r)`` scales the rank directions of ``b``."""

    name = "adalora"
    title = "AdaLoRA"
    # PEFT: an AdaLoraConfig (peft_type 'ADALORA', init_r, rank_pattern = kept ranks) over
    # LoRA's modules, with keys lora_A (r, in), lora_B (out, r), lora_E (r, 1).
    peft = "lora"
    peft_types = ("ADALORA",)
    peft_setting = "AdaLoRA (singular values)"
    peft_pair = ("lora_A", "lora_B")
    peft_embedding = False
    peft_own_fields = ("r", "rank_pattern")

    def wants(self, rule: Any) -> bool:
        return bool(rule.adalora)

    def check_rule(self, rule: Any, where: str) -> None:
        if rule.adalora and rule.init != "gaussian":
            raise ValueError(
                f"{where}: adalora uses its own init (P, Q ~ N(0, 0.02^2), lambda = 0); "
                f"drop init={rule.init!r}."
            )

    def init(self, factors, base, ctx):  # PEFT's AdaLoRA init: P, Q ~ N(0, 0.02^2), lambda = 0
        dtype = ctx.rule.param_dtype
        ka, kb = jax.random.split(ctx.key)
        a = 0.02 * jax.random.normal(ka, factors.a.shape, dtype)
        b = 0.02 * jax.random.normal(kb, factors.b.shape, dtype)
        singular = jnp.zeros(factors.a.shape[: len(factors.stack_axes)] + (factors.rank,), dtype)
        return dataclasses.replace(factors, a=a, b=b, singular=singular), base

    def present(self, t) -> bool:
        return t.singular is not None

    def arrays(self, t):
        return {"singular": t.singular}

    def replace(self, t, values):
        return dataclasses.replace(t, singular=values["singular"])

    def layout(self, t):
        return {"singular": (("stack", "r"), _variant.BASE)}

    def owns(self, name: str) -> bool:
        return name == "singular"

    def restore(self, t, arrays, meta):
        return dataclasses.replace(t, singular=arrays["singular"])

    def low_rank(self, t, a, b):
        s = t.singular.reshape(t.singular.shape + (1,) * len(t.out_axes))
        return a, b * s.astype(b.dtype)

    def peft_tensors(self, t, layer):
        s = np.asarray(t.singular)
        return {"lora_E": (s if layer is None else s[layer])[:, None]}

    def peft_config(self, config, leaves):
        """PEFT's ``AdaLoraConfig``; the schedule fields only matter for training in PEFT
        and are set so that it validates (``target_r = init_r``, ``total_step = 1``)."""
        if config["use_rslora"]:
            raise ValueError(
                "AdaLoRA factors with rslora=True cannot be exported: PEFT's AdaLoRA always "
                "scales by lora_alpha / r; split with rslora=False."
            )
        per_adapter = (
            ("r", "rank_pattern", "init_r (AdaLoRA rank)"),
            ("lora_alpha", "alpha_pattern", "lora_alpha"),
        )
        for field, exceptions, name in per_adapter:  # the LoRA writer's per-module values
            pattern = config[exceptions]
            if pattern:
                raise ValueError(
                    f"PEFT has one {name} per adapter but the factors use "
                    f"{sorted({config[field], *pattern.values()})}; use one value in all "
                    f"AdaLoRA LoraRules."
                )
        r, alpha = config["r"], config["lora_alpha"]
        config = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")}
        config.update(
            peft_type="ADALORA", r=8,  # r: unused by AdaLoRA (PEFT warns for other values)
            init_r=r, target_r=r, lora_alpha=alpha, rank_pattern=None, total_step=1,
            tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
        )  # fmt: skip
        return {}, config

    def peft_check_config(self, config, path):
        if not self.peft_uses(config):
            return
        r, kept = config.get("init_r"), config.get("rank_pattern") or {}
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(
                f"{path}: init_r={r!r} must be a positive int; fix the config or re-save the "
                f"adapter."
            )
        if not isinstance(kept, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, bool | int) for x in v)
            for k, v in kept.items()
        ):
            raise ValueError(
                f"{path}: rank_pattern must map module names to lists of booleans, got "
                f"{str(kept)[:120]}; fix the config or re-save the adapter."
            )

    def peft_uses(self, config):
        return config.get("peft_type") == "ADALORA"

    def peft_refine(self, m, tensors, consumed, config):
        """``lora_E (r, 1)`` read, and A, B, E expanded back to ``init_r`` if PEFT pruned."""
        ke, A, B = m.key_prefix + "lora_E", m.a, m.b
        if ke not in tensors or tensors[ke].shape != (A.shape[0], 1):
            got = tensors[ke].shape if ke in tensors else "is missing"
            raise ValueError(
                f"AdaLoRA adapter has '{m.key_prefix}lora_A' {A.shape} but '{ke}' {got}; "
                f"expected ({A.shape[0]}, 1). The file is incomplete."
            )
        consumed.add(ke)
        E, r = tensors[ke][:, 0], config["init_r"]
        module = m.module
        kept = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
        if kept is not None and A.shape[0] != r:
            kept = np.asarray(kept, bool)
            if kept.shape != (r,) or kept.sum() != A.shape[0]:
                raise ValueError(
                    f"rank_pattern['{module}.lora_E'] keeps {int(kept.sum())} of {kept.size} "
                    f"ranks but '{m.key_prefix}lora_A' has {A.shape[0]} rows and init_r={r}; "
                    f"the file is inconsistent."
                )
            A2 = np.zeros((r, A.shape[1]), A.dtype)
            B2, E2 = np.zeros((B.shape[0], r), B.dtype), np.zeros((r,), E.dtype)
            A2[kept], B2[:, kept], E2[kept] = A, B, E
            A, B, E = A2, B2, E2
        arrays = {**m.arrays, "singular": E}
        return dataclasses.replace(m, a=A, b=B, r=r, alpha=config["lora_alpha"], arrays=arrays)


ADALORA = _variant.register(AdaLora())


class AdaLoraState(NamedTuple):
    """Allocator state; dicts keyed by the "/"-joined path of each AdaLoRA leaf.

    Attributes:
        step: ``()`` int32, the number of updates made (PEFT's ``global_step``).
        ipt: smoothed sensitivity ``(a, b, singular)`` per leaf, shapes of the factors.
        unc: smoothed uncertainty, same structure.
        mask: ``(*stack, r)`` bool per leaf, the triplets kept by the last allocation.
    """

    step: jax.Array
    ipt: dict[str, tuple[jax.Array, jax.Array, jax.Array]]
    unc: dict[str, tuple[jax.Array, jax.Array, jax.Array]]
    mask: dict[str, jax.Array]


def _adalora_leaves(trainable: Any) -> list[tuple[str, LoraFactors]]:
    leaves = [
        (p, t)
        for p, t in leaves_with_paths(trainable)
        if isinstance(t, LoraFactors) and t.singular is not None
    ]
    if not leaves:
        raise ValueError(
            "trainable has no AdaLoRA leaves (LoraFactors with singular values); split with "
            "LoraRule(..., adalora=True)."
        )
    return leaves


def _matrices(t: LoraFactors) -> tuple[jax.Array, jax.Array]:
    """``P (*stack, in, r)`` and ``Q (*stack, r, out)`` with the in and out axes flattened."""
    ns = len(t.stack_axes)
    p = t.a.reshape(t.a.shape[:ns] + (-1, t.rank))
    q = t.b.reshape(t.b.shape[: ns + 1] + (-1,))
    return p, q


def orthogonal_regularizer(trainable: Any, *, squared: bool = True) -> jax.Array:
    """AdaLoRA's penalty keeping ``P`` and ``Q`` near-orthogonal, a float32 scalar.

    ``squared=True`` is the paper's eq. 4 summed over matrices (each stacked layer is one):
    ``sum ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``. ``squared=False`` is PEFT's form (added
    with weight ``orth_reg_weight``): the mean over all ``P`` and ``Q`` matrices of
    ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> _, t = lj.split({"w": jnp.ones((8, 6))}, lj.LoraRule("w", rank=2, adalora=True),
        ...                 key=jax.random.key(0))
        >>> round(float(lj.orthogonal_regularizer(t)), 1)  # P, Q ~ N(0, 0.02^2): ||-I||^2 twice
        4.0
    """
    hi = jax.lax.Precision.HIGHEST
    total, count = jnp.zeros((), jnp.float32), 0
    for _, t in _adalora_leaves(trainable):
        p, q = _matrices(t)
        eye = jnp.eye(t.rank, dtype=jnp.float32)
        for gram in (
            jnp.einsum("...ir,...is->...rs", p, p, precision=hi),
            jnp.einsum("...ri,...si->...rs", q, q, precision=hi),
        ):
            sq = jnp.sum(jnp.square(gram.astype(jnp.float32) - eye), axis=(-2, -1))
            if squared:
                total = total + jnp.sum(sq)
            else:  # sqrt with a zero gradient at an exactly orthogonal matrix
                total = total + jnp.sum(jnp.sqrt(jnp.maximum(sq, jnp.finfo(jnp.float32).tiny)))
            count += math.prod(sq.shape)
    return total if squared else total / count


@dataclasses.dataclass(frozen=True)
class RankAllocator:
    """AdaLoRA's budget schedule and importance-based masking (see the module docstring).

    Hyperparameters are PEFT's ``AdaLoraConfig`` fields: ``target_r`` -> ``target_rank``,
    ``total_step`` -> ``total_steps``, ``tinit``, ``tfinal``, ``deltaT`` -> ``delta_t``,
    ``beta1``, ``beta2``. The initial rank is each leaf's ``rank``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> _, t = lj.split({"w": jnp.ones((8, 6))}, lj.LoraRule("w", rank=4, adalora=True),
        ...                 key=jax.random.key(0))
        >>> alloc = lj.RankAllocator(target_rank=2, total_steps=10, tinit=2, tfinal=3)
        >>> state = alloc.init(t)
        >>> grads = jax.tree.map(jnp.ones_like, t)
        >>> for _ in range(10):
        ...     t, state = jax.jit(alloc.update)(t, grads, state)
        >>> alloc.rank_pattern(state)
        {'w': [2]}
    """

    target_rank: int
    total_steps: int
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self) -> None:
        for name in ("target_rank", "total_steps", "delta_t"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RankAllocator: {name}={v!r} must be an int >= 1.")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"RankAllocator: {name}={v!r} must be an int >= 0.")
        if self.tinit >= self.total_steps - self.tfinal:
            raise ValueError(
                f"RankAllocator: tinit={self.tinit} >= total_steps - tfinal = "
                f"{self.total_steps - self.tfinal} leaves no budgeting phase; lower tinit/tfinal "
                f"or raise total_steps."
            )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v < 1):
                raise ValueError(f"RankAllocator: {name}={v!r} must be in (0, 1).")

    def _budgets(self, trainable: Any) -> tuple[int, int]:
        """(initial, target) total rank: sum of all leaves' ranks, target_rank per matrix."""
        init, n = 0, 0
        for path, t in _adalora_leaves(trainable):
            if self.target_rank > t.rank:
                raise ValueError(
                    f"'{path}' has rank {t.rank} < target_rank={self.target_rank}; AdaLoRA only "
                    f"prunes, so split with a rank above the target (PEFT's init_r > target_r)."
                )
            layers = math.prod(t.singular.shape[:-1])
            init, n = init + layers * t.rank, n + layers
        return init, self.target_rank * n

    def schedule(self, init_budget: int, target_budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Budget ``(total_steps + 1,)`` int32 and whether to mask ``(total_steps + 1,)`` per step.

        PEFT's ``budget_schedule``: the initial budget up to ``tinit``, then
        ``int((init - target) * (1 - (t - tinit) / (T - tfinal - tinit)) ** 3 + target)``
        with masking every ``delta_t`` steps, then ``target`` from ``T - tfinal`` on.
        """
        budget = np.empty(self.total_steps + 1, np.int32)
        mask_now = np.zeros(self.total_steps + 1, bool)
        span = self.total_steps - self.tfinal - self.tinit
        for t in range(self.total_steps + 1):
            if t <= self.tinit:
                budget[t] = init_budget
            elif t > self.total_steps - self.tfinal:
                budget[t], mask_now[t] = target_budget, True
            else:
                mul = 1 - (t - self.tinit) / span
                budget[t] = int((init_budget - target_budget) * mul**3 + target_budget)
                mask_now[t] = t % self.delta_t == 0
        return budget, mask_now

    def init(self, trainable: Any) -> AdaLoraState:
        """Zero scores and all-kept masks for the AdaLoRA leaves of ``trainable``."""
        self._budgets(trainable)
        leaves = _adalora_leaves(trainable)

        def zeros() -> dict[str, tuple[jax.Array, ...]]:  # distinct buffers: states are donated
            return {
                p: tuple(jnp.zeros(x.shape, jnp.float32) for x in (t.a, t.b, t.singular))
                for p, t in leaves
            }

        mask = {p: jnp.ones(t.singular.shape, bool) for p, t in leaves}
        return AdaLoraState(jnp.zeros((), jnp.int32), zeros(), zeros(), mask)

    def _masks(self, leaves, ipt, unc, budget, init_budget) -> dict[str, jax.Array]:
        """Keep the ``budget`` triplets with the highest scores (PEFT's ``mask_to_budget``)."""
        scores = {}
        for p, t in leaves:
            sa, sb, ss = (i * u for i, u in zip(ipt[p], unc[p]))
            ns = len(t.stack_axes)
            a_axes = tuple(range(ns, sa.ndim - 1))
            b_axes = tuple(range(ns + 1, sb.ndim))
            scores[p] = ss + jnp.mean(sa, axis=a_axes) + jnp.mean(sb, axis=b_axes)
        flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
        k = init_budget - budget  # how many to drop: torch.kthvalue(k) then score <= threshold
        threshold = jnp.where(k > 0, flat[jnp.maximum(k - 1, 0)], -jnp.inf)
        return {p: s > threshold for p, s in scores.items()}

    def update(self, trainable: Any, grads: Any, state: AdaLoraState) -> tuple[Any, AdaLoraState]:
        """One allocation step: update scores, reallocate on schedule, zero pruned ``singular``.

        Call it after the optimiser step with that step's gradients (PEFT's order:
        ``optimizer.step(); model.update_and_allocate(step)``). Traceable under ``jit``.

        Args:
            trainable: the trainable tree (AdaLoRA leaves are updated, others pass through).
            grads: gradients with the structure of ``trainable``.
            state: from :meth:`init` or the previous update.

        Returns:
            ``(trainable, state)`` with masked singular values and the step incremented.
        """
        leaves = _adalora_leaves(trainable)
        init_budget, target_budget = self._budgets(trainable)
        budgets, mask_now = self.schedule(init_budget, target_budget)
        step = state.step
        t = jnp.minimum(step, self.total_steps)
        end = self.total_steps - self.tfinal
        grad_of = dict(leaves_with_paths(grads))
        ipt, unc = {}, {}
        for p, f in leaves:
            g = grad_of[p]
            sens = [
                jnp.abs(x.astype(jnp.float32) * dx.astype(jnp.float32))
                for x, dx in ((f.a, g.a), (f.b, g.b), (f.singular, g.singular))
            ]
            i_new = tuple(self.beta1 * i + (1 - self.beta1) * s for i, s in zip(state.ipt[p], sens))
            u_new = tuple(
                self.beta2 * u + (1 - self.beta2) * jnp.abs(s - i)
                for u, s, i in zip(state.unc[p], sens, i_new)
            )
            ipt[p] = tuple(jnp.where(step < end, n, o) for n, o in zip(i_new, state.ipt[p]))
            unc[p] = tuple(jnp.where(step < end, n, o) for n, o in zip(u_new, state.unc[p]))
        budget = jnp.asarray(budgets)[t]
        fresh = self._masks(leaves, ipt, unc, budget, init_budget)
        recompute = ((step < end) & jnp.asarray(mask_now)[t]) | (step == end)
        mask = {p: jnp.where(recompute, fresh[p], state.mask[p]) for p in fresh}
        apply = recompute | (step > end)
        masked = {}
        for p, f in leaves:
            keep = jnp.where(apply, mask[p], True)
            masked[p] = dataclasses.replace(f, singular=f.singular * keep.astype(f.singular.dtype))
        reset = step == end  # PEFT's reset_ipt once the budget is final
        ipt = {p: tuple(jnp.where(reset, 0.0, x) for x in v) for p, v in ipt.items()}
        unc = {p: tuple(jnp.where(reset, 0.0, x) for x in v) for p, v in unc.items()}
        flat, treedef = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_node)
        paths = [p for p, _ in leaves_with_paths(trainable)]
        out = [masked.get(p, x) for p, (_, x) in zip(paths, flat)]
        return jax.tree.unflatten(treedef, out), AdaLoraState(step + 1, ipt, unc, mask)

    def rank_pattern(self, state: AdaLoraState) -> dict[str, list[int]]:
        """Kept rank of every AdaLoRA leaf (one entry per stacked layer), from the last mask."""
        return {
            p: np.asarray(m).reshape(-1, m.shape[-1]).sum(-1).astype(int).tolist()
            for p, m in state.mask.items()
        }
