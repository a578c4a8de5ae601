"""Adapter checkpoint directories: safe replacement, recovery after a killed save, and
validation of the stored metadata before any array is restored.

Checkpoint directories are replaced under a lock on their parent directory, so two
processes saving to one path serialise their swaps, and a save killed between its two
renames leaves the previous checkpoint as ``<name>.old-<suffix>``, which
:func:`find_checkpoint` reads and the next save puts back.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pathlib
import shutil
import stat
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.io.safe_io import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    check_declared_bytes,
    check_shape,
)


def is_checkpoint_dir(path: pathlib.Path) -> bool:
    """An orbax composite checkpoint with a ``meta`` item (what save_adapters writes)."""
    return (path / "meta").is_dir()


def _foreign_dir(path: pathlib.Path) -> bool:
    """A non-empty directory without a checkpoint's ``meta`` (False if it vanished)."""
    try:
        return any(path.iterdir()) and not is_checkpoint_dir(path) and path.exists()
    except FileNotFoundError:
        return False


def check_replaceable(path: pathlib.Path) -> None:
    """Refuse to save over a file or over a directory that is not an adapter checkpoint.

    Another process may be swapping a checkpoint in at ``path`` (rename old, rename new):
    a path that vanishes counts as free, and a directory is foreign only if it looks so
    twice, 50 ms apart.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):
        raise ValueError(
            f"{path} exists and is not a directory; save_adapters writes a checkpoint "
            f"directory there. Choose another path or remove the file."
        )
    if _foreign_dir(path):
        time.sleep(0.05)  # a concurrent swap leaves the path half-made for an instant only
        if _foreign_dir(path):
            raise ValueError(
                f"{path} is a non-empty directory that is not an adapter checkpoint; refusing "
                f"to replace it. Save to a new path such as {path / 'adapters'}."
            )


@contextlib.contextmanager
def _dir_lock(directory: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock on ``directory`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _olds(path: pathlib.Path, complete: bool = True) -> list[pathlib.Path]:
    """Previous checkpoints set aside by a swap (``complete``: with a meta item), newest first."""
    found = [pathlib.Path(p) for p in glob.glob(glob.escape(str(path)) + ".old-*")]
    found = [p for p in found if p.is_dir() and (is_checkpoint_dir(p) or not complete)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def find_checkpoint(path: pathlib.Path) -> pathlib.Path:
    """``path``, or the previous checkpoint a save killed mid-swap left beside it."""
    if path.exists():
        return path
    olds = _olds(path)
    return olds[0] if olds else path


def replace_dir(staging: pathlib.Path, path: pathlib.Path, suffix: str) -> None:
    """Move the complete checkpoint ``staging`` to ``path``, replacing any previous one.

    Under a lock on the parent directory: a previous checkpoint left as ``.old-*`` by a
    killed save is put back first (and other leftovers removed), then ``path`` is renamed
    aside, ``staging`` renamed in, and the old one deleted. At every instant either
    ``path`` or exactly one ``.old-*`` holds a complete checkpoint.
    """
    with _dir_lock(path.parent):
        olds = _olds(path)
        if not path.exists() and olds:
            olds[0].rename(path)
        for stale in _olds(path, complete=False):
            shutil.rmtree(stale, ignore_errors=True)
        if path.exists():
            old = path.with_name(f"{path.name}.old-{suffix}")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)


def _axes(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise ValueError(f"{where} is {value!r}, not a list of ints; corrupted metadata.")
    return tuple(value)


def _array_nbytes(info: Any, where: str) -> int:
    """Byte size of one stored array's declared shape/dtype (validated)."""
    if not isinstance(info, dict) or not {"shape", "dtype"} <= set(info):
        raise ValueError(f"{where} is {info!r}, not {{shape, dtype, sha256}}; corrupted metadata.")
    shape = check_shape(info["shape"], where)
    try:
        dtype = np.dtype(info["dtype"]) if info["dtype"] != "bfloat16" else None
    except TypeError:
        dtype = False
    if dtype is False or (dtype is not None and dtype.kind != "f"):
        raise ValueError(f"{where} has dtype {info['dtype']!r}, not a float dtype; corrupted.")
    sha = info.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise ValueError(f"{where} has sha256 {sha!r}, not 64 hex digits; corrupted metadata.")
    return math.prod(shape) * (2 if dtype is None else dtype.itemsize)


def _check_factor_entry(e: dict, where: str) -> None:
    arrays = e.get("arrays")
    known = lambda n: n in ("a", "b") or any(v.owns(n) for v in _variant.variants())  # noqa: E731
    if not isinstance(arrays, dict) or not {"a", "b"} <= set(arrays) or not all(map(known, arrays)):
        raise ValueError(
            f"{where} has arrays {arrays!r}; expected a, b (+ a registered variant's arrays: "
            f"magnitude/singular/glora_*/...)."
        )
    stack, ins, outs = (
        _axes(e.get(k), f"{where} {k}") for k in ("stack_axes", "in_axes", "out_axes")
    )
    ndim = len(stack) + len(ins) + len(outs)
    if sorted(stack + ins + outs) != list(range(ndim)) or not ins or not outs:
        raise ValueError(
            f"{where}: stack_axes {stack}, in_axes {ins}, out_axes {outs} are not a partition "
            f"of a weight's axes; corrupted metadata."
        )
    a, b = arrays["a"]["shape"], arrays["b"]["shape"]
    ns = len(stack)
    if (
        len(a) != ns + len(ins) + 1
        or len(b) != ns + 1 + len(outs)
        or a[-1] != b[ns]
        or a[:ns] != b[:ns]
    ):
        raise ValueError(
            f"{where}: a {a} and b {b} do not fit stack_axes {stack}, in_axes {ins}, "
            f"out_axes {outs} with one rank; corrupted metadata."
        )
    if a[-1] < 1:
        raise ValueError(f"{where}: rank {a[-1]} must be >= 1; corrupted metadata.")
    for v in _variant.variants():  # each variant checks its own arrays and meta
        v.check_entry(e, where)
    alpha, dropout = e.get("alpha"), e.get("dropout")
    if not (
        isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha)
    ):
        raise ValueError(f"{where}: alpha {alpha!r} is not a finite number; corrupted metadata.")
    if not (isinstance(dropout, int | float) and 0 <= dropout < 1) or not isinstance(
        e.get("rslora"), bool
    ):
        raise ValueError(
            f"{where}: dropout {dropout!r} / rslora {e.get('rslora')!r} are not a number in "
            f"[0, 1) and a bool; corrupted metadata."
        )


def _check_structure(enc: Any, where: str) -> int:
    """Validate an encoded tree structure; returns its number of leaves."""
    count, stack = 0, [(enc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where}: the tree structure nests too deep; corrupted metadata.")
        if node == "leaf":
            count += 1
        elif isinstance(node, dict) and len(node) == 1 and set(node) <= {"dict", "list", "tuple"}:
            ((kind, items),) = node.items()
            if not isinstance(items, list):
                raise ValueError(f"{where}: structure {kind} holds {items!r}; corrupted metadata.")
            if kind == "dict":
                if not all(
                    isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in items
                ):
                    raise ValueError(f"{where}: structure dict items are not [key, node] pairs.")
                stack.extend((kv[1], depth + 1) for kv in items)
            else:
                stack.extend((x, depth + 1) for x in items)
        else:
            raise ValueError(f"{where}: structure node {str(node)[:80]!r} is not valid; corrupted.")
    return count


def _is_base_leaf(x: Any) -> bool:
    """``[path, shape or None, dtype or None]`` of a base fingerprint."""
    if not (isinstance(x, list) and len(x) == 3 and isinstance(x[0], str)):
        return False
    shape_ok = x[1] is None or (
        isinstance(x[1], list) and all(isinstance(d, int) and not isinstance(d, bool) for d in x[1])
    )
    return shape_ok and (x[2] is None or isinstance(x[2], str))


def check_adapter_meta(meta: dict, where: str, version: int) -> None:
    """Validate the ``meta`` item of an adapter checkpoint before any array is restored."""
    got = meta.get("format_version")
    if not isinstance(got, int) or got > version:
        raise ValueError(
            f"{where}: format_version {got!r} is not one this lora_jax reads (<= {version}); "
            f"upgrade lora_jax or re-save the adapter."
        )
    leaves = meta.get("leaves")
    if not isinstance(leaves, list):
        raise ValueError(f"{where}: 'leaves' is {type(leaves).__name__}, not a list; corrupted.")
    total = 0
    for i, e in enumerate(leaves):
        at = f"{where}: leaf {i}"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str):
            raise ValueError(f"{at} is {str(e)[:80]!r}, not {{path, kind, ...}}; corrupted.")
        at = f"{where}: leaf {i} ({e['path']!r})"
        kind = e.get("kind")
        if kind == "none":
            continue
        if kind == "array":
            arrays = e.get("arrays")
            if not isinstance(arrays, dict) or set(arrays) != {"w"}:
                raise ValueError(f"{at} has arrays {arrays!r}; expected {{'w': ...}}.")
        elif kind == "factors":
            if not isinstance(e.get("arrays"), dict):
                raise ValueError(f"{at} has arrays {e.get('arrays')!r}; corrupted metadata.")
            for name, info in e["arrays"].items():
                _array_nbytes(info, f"{at} {name}")
            _check_factor_entry(e, at)
        else:
            raise ValueError(f"{at} has kind {kind!r}, not 'none', 'factors' or 'array'.")
        total += sum(_array_nbytes(info, f"{at} {n}") for n, info in e["arrays"].items())
    check_declared_bytes(total, where)
    structure = meta.get("structure")
    if structure is not None and _check_structure(structure, where) != len(leaves):
        raise ValueError(
            f"{where}: the tree structure has another number of leaves than 'leaves' "
            f"({len(leaves)}); corrupted metadata."
        )
    base = meta.get("base")
    if not (
        isinstance(base, dict)
        and isinstance(base.get("leaves"), list)
        and all(_is_base_leaf(x) for x in base["leaves"])
        and (base.get("sha256") is None or isinstance(base.get("sha256"), str))
    ):
        raise ValueError(f"{where}: 'base' is not a fingerprint {{leaves, sha256}}; corrupted.")
    step = meta.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise ValueError(f"{where}: step {step!r} is not an int; corrupted metadata.")


def check_save_args(rules: Any, base: Any, step: Any, metadata: Any) -> None:
    """Refuse save arguments that would fail later inside orbax or write a useless checkpoint."""
    from lora_jax._src.core.rules import LoraRule

    seq = [rules] if isinstance(rules, LoraRule) else rules
    if not isinstance(seq, list | tuple) or not all(isinstance(r, LoraRule) for r in seq):
        raise TypeError(
            f"rules must be the LoraRule(s) passed to lj.split, got {type(rules).__name__}; "
            f"they are stored so that the checkpoint records how it was made."
        )
    if base is None:
        raise TypeError(
            "base is None; pass the frozen tree from lj.split (or "
            "lj.checkpoint.fingerprint(frozen)) so that loads can check the adapter fits."
        )
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | np.integer)):
        raise TypeError(f"step={step!r} must be an int or None.")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metadata must be JSON-serialisable (dicts, lists, str, finite numbers): {e}."
        ) from None


def check_meta_size(path: pathlib.Path) -> None:
    """Refuse a checkpoint whose ``meta`` item is too large to be genuine (before reading it)."""
    meta = path / "meta"
    if meta.is_dir():
        size = sum(f.stat().st_size for f in meta.rglob("*") if f.is_file())
        if size > MAX_JSON_BYTES:
            raise ValueError(
                f"{meta} holds {size} bytes, more than the {MAX_JSON_BYTES} allowed for adapter "
                f"metadata; refusing it as corrupted or hostile."
            )
