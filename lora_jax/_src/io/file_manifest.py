"""The size and SHA-256 of an adapter checkpoint's array files, checked before orbax reads them.

orbax reads an item's arrays concurrently. When one read fails on a damaged file it
abandons the other reads' coroutines while tensorstore is still reading for them, and
collecting those later crashed the process with SIGSEGV in about one load in eight
(orbax-checkpoint 0.12.8, tensorstore 0.1.85/0.1.86, 2026-12-02). Checking every file
against the list written at save time turns a truncated, bit-flipped or replaced file
into a ``ValueError`` naming it before any read starts. The JSON items (``meta``,
``train``) are not listed: they are read whole and validated field by field
(:mod:`lora_jax._src.io.safe_ckpt`). Checkpoints saved without the list (lora_jax before
2026-12-02) are read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from lora_jax._src.io.safe_io import read_json

NAME = "lora_jax_files.json"
ARRAY_ITEMS = ("arrays", "state")  # the items orbax reads through tensorstore


def _item_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The files inside the checkpoint's array items."""
    return sorted(f for item in ARRAY_ITEMS for f in (directory / item).rglob("*") if f.is_file())


def _digest(f: pathlib.Path) -> str:
    with open(f, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(directory: pathlib.Path) -> None:
    """Record every array file's size and SHA-256 in ``directory/NAME`` (written atomically)."""
    files = {
        f.relative_to(directory).as_posix(): [f.stat().st_size, _digest(f)]
        for f in _item_files(directory)
    }
    tmp = directory / f"{NAME}.tmp"
    tmp.write_text(json.dumps({"format": "lora_jax.files", "files": files}, indent=0))
    os.replace(tmp, directory / NAME)


def check_manifest(directory: pathlib.Path) -> None:
    """Refuse a checkpoint whose files differ from those listed at save (no list: no check).

    Raises:
        ValueError: naming the first missing, resized or changed file.
    """
    if not (directory / NAME).exists():
        return
    listing = read_json(directory / NAME, "lora_jax's list of checkpoint files")
    files = listing.get("files")
    if listing.get("format") != "lora_jax.files" or not isinstance(files, dict):
        raise ValueError(f"{directory / NAME} is not a list of checkpoint files; it is corrupted.")
    root = directory.resolve()
    for rel, entry in files.items():
        try:
            f = (directory / rel).resolve()
            inside = f.is_relative_to(root) and f != root
        except (OSError, ValueError):  # a NUL byte, a name too long, a symlink loop
            inside = False
        pair = isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int
        if not inside or not pair:
            raise ValueError(f"{directory / NAME} has an invalid entry for {rel!r}; corrupted.")
        size, digest = entry
        try:
            have = f.stat().st_size if f.is_file() else None
        except OSError:
            have = None
        if have is None:
            raise ValueError(f"checkpoint file {f} is missing; the checkpoint is incomplete.")
        if have != size:
            raise ValueError(
                f"checkpoint file {f} has {have} bytes but was saved with {size} "
                f"({'truncated' if have < size else 'grown'}); the checkpoint is damaged: "
                f"re-save it or load another step."
            )
        if _digest(f) != digest:
            raise ValueError(
                f"checkpoint file {f} does not match the SHA-256 recorded at save; the "
                f"checkpoint is damaged: re-save it or load another step."
            )
