"""The training side of a step checkpoint: optimiser state and ``extra`` (data position, keys).

:class:`~lora_jax.checkpoint.AdapterCheckpointManager` writes two items beside the
adapter's ``arrays`` and ``meta``:

* ``state`` (orbax ``StandardSave``): every array leaf of the optax state, flattened in
  ``jax.tree`` order (``None``, ``optax.MaskedNode`` and empty states hold no leaf), and
  the arrays of ``extra`` (PRNG keys as their ``key_data``);
* ``train`` (JSON): for every optimiser leaf its key path, shape, dtype and SHA-256, and
  for ``extra`` the JSON values and the kind, shape, dtype, key implementation and
  SHA-256 of each array.

The optimiser tree itself is not stored (its nodes are optax NamedTuples and user
classes): ``restore_train_state`` rebuilds it from ``opt_like``, usually
``jax.eval_shape(optimizer.init, trainable)``, and refuses one whose leaf paths, shapes
or dtypes differ from what was saved.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.io.ckpt_meta import host_value, restore_target, sha256
from lora_jax._src.io.safe_io import check_shape

TRAIN_FORMAT = "lora_jax.train_state"
TRAIN_VERSION = 1


def _info(path: str, x: Any) -> dict:
    return {
        "path": path,
        "shape": [int(d) for d in x.shape],
        "dtype": jnp.dtype(x.dtype).name,
        "sha256": sha256(x),
    }


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def pack_train(opt_state: Any, extra: dict | None) -> tuple[dict, dict]:
    """The orbax ``state`` item (arrays) and the JSON ``train`` item of one step."""
    if extra is not None and (
        not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra)
    ):
        raise TypeError(
            f"extra must be a dict with str keys (e.g. {{'data_position': 120, 'rng': key}}), "
            f"got {type(extra).__name__}."
        )
    opt_arrays, opt_leaves = {}, None
    if opt_state is not None:
        opt_leaves = []
        for i, (p, x) in enumerate(jax.tree_util.tree_flatten_with_path(opt_state)[0]):
            path = jax.tree_util.keystr(p)
            if _is_key(x) or not hasattr(x, "shape") or not hasattr(x, "dtype"):
                leaf, x = x, np.asarray(x)  # a Python scalar in a user's state
                if x.dtype == object:
                    raise TypeError(
                        f"opt_state leaf {path} is a {type(leaf).__name__}, not an array; an "
                        f"optax state holds arrays (and None / MaskedNode / empty states)."
                    )
            opt_arrays[f"{i:05d}"] = x
            opt_leaves.append(_info(path, x))
    values, extra_arrays, extra_info = {}, {}, {}
    for name, v in (extra or {}).items():
        # extra arrays are small and often process-local: stored from the host, as numpy
        if _is_key(v):
            data = host_value(jax.random.key_data(v))
            extra_arrays[name] = data
            extra_info[name] = _info(name, data) | {"key_impl": str(jax.random.key_impl(v))}
        elif isinstance(v, jax.Array):
            extra_arrays[name] = host_value(v)
            extra_info[name] = _info(name, v)
        elif isinstance(v, np.ndarray | np.generic):  # int64 stays int64 (no x64 needed)
            extra_arrays[name] = np.asarray(v)
            extra_info[name] = _info(name, v) | {"numpy": True}
        else:
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"extra[{name!r}] is neither an array, a PRNG key nor JSON-able "
                    f"(dicts, lists, str, finite numbers): {e}."
                ) from None
            values[name] = v
    arrays = {}
    if opt_arrays:
        arrays["opt"] = opt_arrays
    if extra_arrays:
        arrays["extra"] = extra_arrays
    train = {
        "format": TRAIN_FORMAT,
        "format_version": TRAIN_VERSION,
        "opt_state": opt_leaves,
        "extra": values,
        "extra_arrays": extra_info,
    }
    return arrays, train


def _check_info(info: Any, where: str) -> None:
    if not (
        isinstance(info, dict)
        and isinstance(info.get("path"), str)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("sha256"), str)
        and len(info["sha256"]) == 64
    ):
        raise ValueError(f"{where} is {str(info)[:80]!r}, not {{path, shape, dtype, sha256}}.")
    check_shape(info["shape"], where)
    try:
        jnp.dtype(info["dtype"])
    except TypeError:
        raise ValueError(f"{where} has unknown dtype {info['dtype']!r}; corrupted.") from None


def check_train_meta(train: Any, where: str) -> None:
    """Validate the ``train`` item before any of its arrays is restored."""
    if not isinstance(train, dict) or train.get("format") != TRAIN_FORMAT:
        raise ValueError(f"{where} is not a lora_jax training state (format missing).")
    got = train.get("format_version")
    if not isinstance(got, int) or got > TRAIN_VERSION:
        raise ValueError(
            f"{where}: format_version {got!r} is not one this lora_jax reads "
            f"(<= {TRAIN_VERSION}); upgrade lora_jax."
        )
    opt, extra, arrays = train.get("opt_state"), train.get("extra"), train.get("extra_arrays")
    if not (opt is None or isinstance(opt, list)) or not isinstance(extra, dict):
        raise ValueError(f"{where}: 'opt_state' / 'extra' have the wrong types; corrupted.")
    if not isinstance(arrays, dict):
        raise ValueError(f"{where}: 'extra_arrays' is not a dict; corrupted.")
    for i, info in enumerate(opt or []):
        _check_info(info, f"{where}: opt_state leaf {i}")
    for name, info in arrays.items():
        _check_info(info, f"{where}: extra[{name!r}]")
        if "key_impl" in info and not isinstance(info["key_impl"], str):
            raise ValueError(f"{where}: extra[{name!r}] key_impl is not a str; corrupted.")


def opt_targets(train: dict, opt_like: Any, where: str) -> tuple[Any, list[Any]]:
    """``opt_like``'s tree structure and leaves, checked against the saved optimiser leaves."""
    saved = train["opt_state"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(opt_like)
    if len(flat) != len(saved):
        raise ValueError(
            f"opt_like has {len(flat)} array leaves but {where} saved {len(saved)}; build "
            f"opt_like with the same optimiser: jax.eval_shape(optimizer.init, trainable)."
        )
    for i, ((p, x), info) in enumerate(zip(flat, saved)):
        path = jax.tree_util.keystr(p)
        shape = tuple(getattr(x, "shape", ()))
        if path != info["path"] or shape != tuple(info["shape"]):
            raise ValueError(
                f"opt_like does not match {where} at optimiser leaf {i}: opt_like has {path} "
                f"{shape} where the checkpoint has {info['path']} {tuple(info['shape'])}; build "
                f"opt_like with the same optimiser: jax.eval_shape(optimizer.init, trainable)."
            )
    return treedef, [x for _, x in flat]


def abstract_state(train: dict, opt_leaves: list[Any] | None) -> dict:
    """The ``state`` item's restore targets: opt_like's shardings (else device 0), numpy extras."""
    out = {}
    if train["opt_state"]:
        out["opt"] = {
            f"{i:05d}": restore_target(info, x)
            for i, (info, x) in enumerate(zip(train["opt_state"], opt_leaves))
        }
    if train["extra_arrays"]:
        out["extra"] = {
            n: np.zeros(info["shape"], info["dtype"]) for n, info in train["extra_arrays"].items()
        }
    return out


def verified(arr: Any, info: dict, where: str, what: str) -> Any:
    """``arr`` after checking its SHA-256 against the saved one."""
    if sha256(arr) != info["sha256"]:
        raise ValueError(
            f"training state in {where} is corrupted: {what} does not match its saved "
            f"SHA-256; restore another step (see all_steps())."
        )
    return arr


def unpack_train(
    train: dict, arrays: dict, treedef: Any, opt_leaves: list[Any] | None, where: str
) -> tuple[Any, dict]:
    """``(opt_state, extra)`` from the restored ``state`` item, cast to the like dtypes."""
    opt_state = None
    if train["opt_state"] is not None:
        values = []
        for i, (info, x) in enumerate(zip(train["opt_state"], opt_leaves)):
            arr = verified(arrays["opt"][f"{i:05d}"], info, where, f"optimiser leaf {info['path']}")
            values.append(arr.astype(x.dtype) if hasattr(x, "dtype") else arr)
        opt_state = jax.tree.unflatten(treedef, values)
    extra = dict(train["extra"])
    for name, info in train["extra_arrays"].items():
        arr = verified(arrays["extra"][name], info, where, f"extra[{name!r}]")
        if "key_impl" in info:
            arr = jax.random.wrap_key_data(jnp.asarray(arr), impl=info["key_impl"])
        extra[name] = arr if info.get("numpy") or "key_impl" in info else jnp.asarray(arr)
    return opt_state, extra


def nbytes(train: dict) -> int:
    """Bytes declared by the ``train`` item's arrays."""
    infos = list(train["opt_state"] or []) + list(train["extra_arrays"].values())
    return sum(math.prod(i["shape"]) * jnp.dtype(i["dtype"]).itemsize for i in infos)
