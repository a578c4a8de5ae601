"""Timing shared by the experiments: one core, interleaved repeats, wall and process CPU time.

Every comparison runs all its configurations in one process, pinned to one core, stepping
them in turn, and reports per configuration the median wall seconds, the median process
CPU seconds (all threads: XLA:CPU runs independent operations concurrently even with one
intra-op thread) and the cores actually used (CPU / wall). Pin before importing jax or
torch: ``os.sched_setaffinity`` applies to the calling thread and the threads it starts
later, so thread pools made at import time must come after it.

    import _timing
    _timing.pin_one_core()          # first thing in the script
    ...
    stats = _timing.interleaved({"a": step_a, "b": step_b}, repeats=7, steps=3)
    print(_timing.table(stats), _timing.contention())
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

PINNED_CORE = 1  # core 0 takes most interrupts and the other processes' default placement


def pin_one_core(core: int = PINNED_CORE) -> int | None:
    """Confine this process (its later threads too) to one core; returns it (None: no pinning).

    Falls back to the lowest allowed core when ``core`` is not allowed, and does nothing
    where ``os.sched_setaffinity`` does not exist (macOS).
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    core = core if core in allowed else min(allowed)
    os.sched_setaffinity(0, {core})
    return core


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HEAP_SETTINGS = "one malloc arena, no mmap, freed memory kept (glibc mallopt)"


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of unmapping it; False where it can't.

    XLA:CPU allocates each execution's temporary buffer (400 MB for a 6-layer
    SmolLM2-shaped step, 1.2 GB for the 30-layer one) from a worker thread's malloc arena,
    where glibc serves it with a fresh ``mmap`` and unmaps it on free: every step then
    faults the pages in again (300k minor faults, 1.3 s of kernel time of a 5.9 s step,
    measured 2026-12-02). One arena, no ``mmap`` and no trimming keep those pages mapped
    (the process holds its peak memory). Call it first, before any thread allocates:
    the arena limit only applies to arenas made afterwards. The same setting holds for
    every configuration of the process, torch included. Same effect from the shell:
    ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        options = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        return all(libc.mallopt(k, v) == 1 for k, v in options)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False


DEFAULT_HEAP = "glibc's default malloc"


def heap_for_timing(argv: list[str]) -> str:
    """:func:`keep_freed_memory` unless ``--system-malloc`` is in ``argv``; says which ran.

    Call it at the top of a script, before jax or torch start their threads (so before
    argparse: the script declares the flag with :func:`add_system_malloc_flag`).
    """
    if "--system-malloc" not in argv and keep_freed_memory():
        return HEAP_SETTINGS
    return DEFAULT_HEAP


def add_system_malloc_flag(parser) -> None:
    """Declare ``--system-malloc`` (read early by :func:`heap_for_timing`) on ``parser``."""
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc malloc as it is (XLA:CPU then re-maps its temporary buffer every step)",
    )


def results_names(title: str, command: str, system_malloc: bool) -> tuple[str, str]:
    """The RESULTS.md section title and command of a run: default-malloc runs get their own."""
    if not system_malloc:
        return title, command
    return f"{title}, {DEFAULT_HEAP}", f"{command} --system-malloc"


def cores_allowed() -> int:
    """How many cores this process may run on (1 after :func:`pin_one_core`)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@dataclasses.dataclass
class Timing:
    """Per-repeat seconds per step of one configuration: wall clock and process CPU time."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    @property
    def cores(self) -> float:
        """Cores actually used: process CPU time over wall time (<= 1 when pinned)."""
        return self.median_cpu / self.median_wall


def _block(out):
    import jax

    return jax.block_until_ready(out)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, steps: int = 1, warmup: int = 1
) -> dict[str, Timing]:
    """Time each zero-argument ``fn`` in turn: ``repeats`` rounds, ``steps`` calls a round.

    Round ``i`` starts at the ``i``-th configuration (the order rotates), so no
    configuration always runs right after the same other one (a cost one step leaves to
    the next, such as cold caches, is spread over all of them). The first ``warmup``
    rounds (compilation, caches) are not recorded. Results are blocked on with
    ``jax.block_until_ready`` (a no-op for Python floats and torch values already on the
    host).
    """
    stats = {k: Timing() for k in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                _block(fn())
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if i >= warmup:
                stats[name].wall.append(wall / steps)
                stats[name].cpu.append(cpu / steps)
    return stats


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up call."""
    return interleaved({"fn": lambda: fn(*args)}, repeats).get("fn").median_wall


def contention() -> str:
    """One line on how busy the machine was: load average against the cores it has."""
    one, five, _ = os.getloadavg()
    return (
        f"machine load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} "
        f"cores, this process pinned to {cores_allowed()} core(s)"
        + (
            "; the machine was shared, so absolute times are noisy, ratios less so"
            if one > 1.5
            else ""
        )
    )


def table(stats: dict[str, Timing], unit: float = 1.0, label: str = "s/step") -> list[str]:
    """Markdown rows: median wall, median CPU, cores used and the wall range, per configuration.

    ``unit`` scales the seconds (e.g. ``1e3`` with ``label="ms"``).
    """
    rows = [
        f"| | wall {label} (median) | process CPU {label} (median) | cores used | wall min..max |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, t in stats.items():
        rows.append(
            f"| {k} | {unit * t.median_wall:.3f} | {unit * t.median_cpu:.3f} | {t.cores:.2f} "
            f"| {unit * min(t.wall):.3f}..{unit * max(t.wall):.3f} |"
        )
    return rows
