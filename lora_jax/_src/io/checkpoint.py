"""Adapter checkpoints with orbax: only the trainable tree is written.

A checkpoint is an orbax composite directory with two items:

* ``arrays``: the factors ``a``/``b`` (with DoRA's ``magnitude`` and AdaLoRA's
  ``singular`` where present) and the fully trained leaves (orbax
  ``StandardSave``, so large adapters are written sharded and in parallel);
* ``meta``: JSON with the tree structure (``None`` holes included: orbax drops
  them), the static fields of every :class:`~lora_jax.LoraFactors`, the rules,
  a fingerprint of the frozen base (paths, shapes, dtypes, optional content
  hash), a SHA-256 digest of every array, the step, user metadata and
  ``lora_jax.__version__``;

and beside them ``lora_jax_files.json``, the size and SHA-256 of every file of
``arrays``, checked before orbax reads any (:mod:`lora_jax._src.io.file_manifest`).

Saves are atomic: orbax writes to a temporary directory and renames it, and an
existing checkpoint is only replaced once the new one is complete. With several
processes (``jax.distributed``) every process calls :func:`save_adapters` with the same
path: they agree on one staging name, each writes its shards, and process 0 renames.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import LoraRule
from lora_jax._src.core.trees import is_node, leaves_with_paths
from lora_jax._src.io.ckpt_meta import (
    array_info,
    as_fingerprint,
    check_base,
    check_fits,
    decode_structure,
    encode_structure,
    factor_arrays,
    is_fingerprint,
    leaves_of_like,
    restore_target,
    rule_from_json,
    rule_to_json,
    sha256,
)
from lora_jax._src.io.ckpt_meta import (
    fingerprint as fingerprint,  # public: lj.checkpoint.fingerprint
)
from lora_jax._src.io.file_manifest import check_manifest, write_manifest
from lora_jax._src.io.safe_ckpt import (
    check_adapter_meta,
    check_meta_size,
    check_replaceable,
    check_save_args,
    find_checkpoint,
    replace_dir,
)

FORMAT = "lora_jax.adapters"
FORMAT_VERSION = 1


def _version() -> str:
    """lora_jax's version from the package metadata (the one source of ``lj.__version__``)."""
    try:
        return importlib.metadata.version("lora_jax")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _pack(trainable, rules, base, step, metadata) -> tuple[dict, dict]:
    """The orbax ``arrays`` item and the JSON ``meta`` item of one checkpoint."""
    check_save_args(rules, base, step, metadata)
    if isinstance(rules, LoraRule):
        rules = [rules]
    entries, arrays = [], {}
    for i, (path, t) in enumerate(leaves_with_paths(trainable)):
        key = f"{i:05d}"
        if t is None:
            entries.append({"path": path, "kind": "none"})
        elif isinstance(t, LoraFactors):
            entries.append(
                {
                    "path": path,
                    "kind": "factors",
                    "alpha": float(t.alpha),
                    "stack_axes": list(t.stack_axes),
                    "in_axes": list(t.in_axes),
                    "out_axes": list(t.out_axes),
                    "rslora": bool(t.rslora),
                    "dropout": float(t.dropout),
                    "arrays": {n: array_info(x) for n, x in factor_arrays(t).items()},
                }
            )
            for v in _variant.present(t):  # static data a variant needs back (GLoRA's forms)
                if v.meta(t) is not None:
                    entries[-1][v.name] = v.meta(t)
            arrays[key] = factor_arrays(t)
        elif isinstance(t, QuantizedArray) or not hasattr(t, "shape"):
            raise TypeError(
                f"'{path}': trainable leaf of type {type(t).__name__} cannot be saved; the "
                f"trainable tree holds LoraFactors, arrays and None (from lj.split)."
            )
        else:
            entries.append({"path": path, "kind": "array", "arrays": {"w": array_info(t)}})
            arrays[key] = {"w": t}
    base_fp = as_fingerprint(base)
    check_fits(base_fp, entries, "the base passed to save_adapters")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_jax_version": _version(),
        "structure": encode_structure(trainable),
        "leaves": entries,
        "rules": [rule_to_json(r) for r in rules],
        "base": base_fp,
        "step": None if step is None else int(step),
        "metadata": metadata,
    }
    return arrays, meta


def _unpack(restore: Callable[[Any], dict], where: str, like: Any, base: Any) -> Any:
    check_manifest(pathlib.Path(where))  # before orbax reads a damaged file (see file_manifest)
    try:
        meta = restore(ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
        raise ValueError(f"cannot read adapter checkpoint metadata in {where}/meta: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}/meta is not a lora_jax adapter checkpoint (format missing).")
    check_adapter_meta(meta, f"{where}/meta", FORMAT_VERSION)
    entries = meta["leaves"]
    if base is not None:
        check_base(meta["base"], base, entries)
    if like is not None:
        like_leaves = leaves_of_like(like, entries)
    elif meta["structure"] is None and (base is None or is_fingerprint(base)):
        raise ValueError(
            f"{where} holds a tree with custom pytree nodes (an nnx.State, boxed linen "
            f"params, ...) whose structure is not stored; pass base= (the frozen tree from "
            f"lj.split, whose structure it shares) or like= (jax.eval_shape of the lj.split call)."
        )
    else:
        like_leaves = [None] * len(entries)
    abstract = {}
    for i, (e, x) in enumerate(zip(entries, like_leaves)):
        if e["kind"] == "factors":
            like_arrays = factor_arrays(x) if x is not None else {}
            abstract[f"{i:05d}"] = {
                n: restore_target(info, like_arrays.get(n)) for n, info in e["arrays"].items()
            }
        elif e["kind"] == "array":
            abstract[f"{i:05d}"] = {"w": restore_target(e["arrays"]["w"], x)}
    try:
        arrays = restore(ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))["arrays"]
    except Exception as e:
        raise ValueError(f"cannot read adapter arrays in {where}/arrays: {e}") from e

    def get(i: int, name: str, x: Any) -> jax.Array:
        arr, info = arrays[f"{i:05d}"][name], entries[i]["arrays"][name]
        if "sha256" in info:  # older multi-process saves have none
            if sha256(arr) != info["sha256"]:
                raise ValueError(
                    f"adapter checkpoint {where}/arrays is corrupted: '{entries[i]['path']}' "
                    f"({name}) does not match its saved SHA-256; re-save or use another step."
                )
        return arr if x is None else arr.astype(x.dtype)

    values = []
    for i, (e, x) in enumerate(zip(entries, like_leaves)):
        if e["kind"] == "none":
            values.append(None)
        elif e["kind"] == "array":
            values.append(get(i, "w", x))
        else:
            like_arrays = factor_arrays(x) if x is not None else {}
            got = {n: get(i, n, like_arrays.get(n)) for n in e["arrays"]}
            t = LoraFactors(
                a=got["a"],
                b=got["b"],
                alpha=e["alpha"],
                stack_axes=tuple(e["stack_axes"]),
                in_axes=tuple(e["in_axes"]),
                out_axes=tuple(e["out_axes"]),
                rslora=e["rslora"],
                dropout=e["dropout"],
            )  # each variant puts back its arrays and meta:
            values.append(_variant.restore_arrays(t, got, e))
    if like is not None:
        skeleton = like
    elif meta["structure"] is not None:
        skeleton = decode_structure(meta["structure"])
    else:  # the trainable tree mirrors the frozen one: same nodes, a leaf per entry
        skeleton = base
    return jax.tree.unflatten(jax.tree.structure(skeleton, is_leaf=is_node), values)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _composite(arrays: dict, meta: dict) -> ocp.args.Composite:
    return ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))


def save_adapters(
    path: str | os.PathLike,
    trainable: Any,
    *,
    rules: Sequence[LoraRule] | LoraRule,
    base: Any,
    step: int | None = None,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Write the trainable tree (factors and fully trained leaves) to ``path``.

    Args:
        path: checkpoint directory; an existing one is replaced only after the new
            checkpoint is complete.
        trainable: the trainable tree from :func:`lora_jax.split` (after training).
        rules: the LoraRules used to split (stored for reference).
        base: the frozen tree, or its :func:`fingerprint` (pass one made with
            ``content=True`` to have loads verify the base's bytes).
        step: training step to record.
        metadata: any JSON-able dict to store alongside.

    Returns:
        The absolute checkpoint path.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> rules = [lj.LoraRule("q/kernel", rank=2)]
        >>> frozen, trainable = lj.split({"q": {"kernel": jnp.ones((8, 4))}}, rules,
        ...                              key=jax.random.key(0))
        >>> d = tempfile.mkdtemp()
        >>> p = lj.save_adapters(d + "/ckpt", trainable, rules=rules, base=frozen, step=10)
        >>> back = lj.load_adapters(p, base=frozen)
        >>> bool((back["q"]["kernel"].a == trainable["q"]["kernel"].a).all())
        True
    """
    path = pathlib.Path(path).absolute()
    check_replaceable(path)
    arrays, meta = _pack(trainable, rules, base, step, metadata)
    suffix = _shared_suffix()
    staging = path.with_name(f"{path.name}.saving-{suffix}")
    _checkpointer().save(staging, args=_composite(arrays, meta))
    if jax.process_index() == 0:  # every process's files are written once save returns
        write_manifest(staging)
        replace_dir(staging, path, suffix)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"lora_jax.save_adapters:{path}:{suffix}")
    return path


def _shared_suffix() -> str:
    """A random staging suffix, the same on every process (process 0's)."""
    value = np.asarray(uuid.uuid4().int % 2**31, np.int32)
    if jax.process_count() > 1:
        value = multihost_utils.broadcast_one_to_all(value)
    return f"{int(value):08x}"


def load_adapters(path: str | os.PathLike, *, like: Any = None, base: Any = None) -> Any:
    """Read a trainable tree written by :func:`save_adapters`.

    Args:
        path: the checkpoint directory.
        like: optional tree with the trainable structure whose leaves are arrays or
            ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of the ``lj.split`` call, with
            ``.sharding`` set): arrays are restored onto those shardings and cast to
            those dtypes. Without it, arrays land on the first device in the saved dtype.
        base: optional frozen tree (or fingerprint) the adapter will be applied to; a
            different path, shape (or content, if hashed at save) raises.

    Returns:
        The trainable tree: LoraFactors with their saved static fields, fully trained
        arrays, ``None`` holes.

    Raises:
        ValueError: unreadable or corrupted checkpoint, a base or ``like`` that does not fit.
    """
    path = find_checkpoint(pathlib.Path(path).absolute())
    if not path.is_dir():
        raise ValueError(f"no adapter checkpoint at {path}; expected a directory.")
    check_meta_size(path)
    ckptr = _checkpointer()
    return _unpack(lambda args: ckptr.restore(path, args=args), str(path), like, base)


def read_info(path: str | os.PathLike) -> dict:
    """The stored metadata of a checkpoint: rules (as LoraRules), step, metadata, base, version."""
    path = find_checkpoint(pathlib.Path(path).absolute())
    check_meta_size(path)
    try:
        meta = _checkpointer().restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise ValueError(f"cannot read adapter checkpoint metadata in {path}/meta: {e}") from e
    meta = meta["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}/meta is not a lora_jax adapter checkpoint (format missing).")
    check_adapter_meta(meta, f"{path}/meta", FORMAT_VERSION)
    meta = dict(meta)
    try:
        meta["rules"] = [rule_from_json(r) for r in meta["rules"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}/meta: a stored rule is invalid ({e}); corrupted metadata.") from e
    return meta
