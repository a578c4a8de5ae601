"""summary: a table of what is adapted, trained and frozen, with parameter and byte counts."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.nbytes import tree_bytes
from lora_jax._src.core.trees import leaves_with_paths
from lora_jax._src.ops.merge import factor_params


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    path: str
    kind: str  # "lora", "full" or the name of the variant (e.g. "dora", "glora")
    shape: tuple[int, ...]
    rank: int | None
    scale: float | None
    trainable: int  # r * (d + k) per adapted matrix (times stacked layers); size for full leaves
    base: int  # size of the weight this row replaces in full fine-tuning
    # Axis that looks like several projections fused in one kernel (see fused_axis), or None.
    fused_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class LoraSummary:
    """Counts for a (frozen, trainable) pair; ``str()`` renders the table."""

    rows: tuple[SummaryRow, ...]
    trainable_params: int
    frozen_params: int
    trainable_bytes: int
    frozen_bytes: int

    @property
    def total_params(self) -> int:
        """Parameters of the model itself (frozen plus fully trained leaves)."""
        full = sum(r.trainable for r in self.rows if r.kind == "full")
        return self.frozen_params + full

    @property
    def reduction(self) -> float:
        """Full fine-tuning's trainable parameters over ours."""
        return self.total_params / max(self.trainable_params, 1)

    def __str__(self) -> str:
        head = ("path", "shape", "kind", "rank", "trainable", "reduction")
        lines = [head]
        for r in self.rows:
            lines.append(
                (
                    r.path,
                    "x".join(map(str, r.shape)),
                    r.kind,
                    "-" if r.rank is None else str(r.rank),
                    f"{r.trainable:,}",
                    f"{r.base / max(r.trainable, 1):.1f}x",
                )
            )
            if r.fused_axis is not None:
                lines[-1] = (lines[-1][0], lines[-1][1], r.kind + "*", *lines[-1][3:])
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
        out = [fmt(lines[0]), "  ".join("-" * w for w in widths)]
        out += [fmt(line) for line in lines[1:]]
        for r in self.rows:
            if r.fused_axis is not None:
                out.append(_fused_note(r))
        out.append(
            f"trainable {self.trainable_params:,} of {self.total_params:,} params "
            f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%, "
            f"{self.reduction:,.1f}x fewer than full fine-tuning); "
            f"trainable {self.trainable_bytes / 2**20:.2f} MiB, "
            f"frozen {self.frozen_bytes / 2**20:.2f} MiB"
        )
        return "\n".join(out)


def fused_axis(t: LoraFactors) -> int | None:
    """The output axis that looks like several projections fused in one kernel, or None.

    A hint, read from the shape alone: the outermost of three or more output axes (the
    projection, heads, head_dim) has size 2 or 3, as in Gemma's ``kv_einsum``
    ``(2, heads, embed, head_dim)`` (k and v) or a fused ``qkv`` kernel
    ``(embed, 3, heads, head_dim)``. One adapter then serves
    every projection; ``stack_axes`` on that axis gives each its own.
    """
    if len(t.out_axes) < 3:
        return None
    first = t.out_axes[0]
    return first if t.shape[first] in (2, 3) else None


def _fused_note(r: SummaryRow) -> str:
    n, ax = r.shape[r.fused_axis], r.fused_axis
    fix = (
        f"split with LoraRule(..., stack_axes=({ax},)) for one adapter each"
        if ax == 0
        else f"stack_axes must lead, so store that axis first (axis {ax} now) for one adapter each"
    )
    return (
        f"* '{r.path}' looks fused: axis {ax} (size {n}) seems to index {n} projections in one "
        f"kernel (e.g. Gemma's kv_einsum), which share one adapter here; {fix}."
    )


def _kind(t: LoraFactors) -> str:
    return next((v.name for v in _variant.present(t)), "lora")


def summary(frozen: Any, trainable: Any) -> LoraSummary:
    """Summarise a split. Works on concrete and abstract (``jax.eval_shape``) trees.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
        >>> f, t = jax.eval_shape(
        ...     lambda p: lj.split(p, [lj.LoraRule("w", rank=8)], key=jax.random.key(0)), params)
        >>> s = lj.summary(f, t)
        >>> s.trainable_params, s.reduction
        (65536, 256.0)
    """
    rows = []
    for path, t in leaves_with_paths(trainable):
        if isinstance(t, LoraFactors):
            n = factor_params(t)
            rows.append(
                SummaryRow(
                    path,
                    _kind(t),
                    t.shape,
                    t.rank,
                    t.scale,
                    n,
                    int(np.prod(t.shape)),
                    fused_axis(t),
                )
            )
        elif t is not None:
            n = int(np.prod(t.shape))
            rows.append(SummaryRow(path, "full", tuple(t.shape), None, None, n, n))
    frozen_params = sum(
        int(np.prod(w.shape)) for _, w in leaves_with_paths(frozen) if w is not None
    )
    return LoraSummary(
        rows=tuple(rows),
        trainable_params=sum(r.trainable for r in rows),
        frozen_params=frozen_params,
        trainable_bytes=tree_bytes(trainable),
        frozen_bytes=tree_bytes(frozen),
    )
