"""The JSON side of an adapter checkpoint: base fingerprints, rules, tree encode_structure, checks.

Everything here is pure Python on metadata dicts; :mod:`lora_jax.checkpoint` does the
orbax I/O. The ``meta`` item's layout is described in that module's docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.rules import LoraRule
from lora_jax._src.core.trees import is_node, leaves_with_paths


def fingerprint(frozen: Any, *, content: bool = False) -> dict:
    """A JSON-able summary of a frozen base: every path with its shape and dtype.

    Args:
        frozen: the frozen tree from :func:`lora_jax.split` (``None`` at fully trained leaves).
        content: also hash the bytes of every leaf (reads the whole base to the host).

    Returns:
        ``{"leaves": [[path, shape or None, dtype or None], ...], "sha256": str or None}``.

    Example:
        >>> import jax.numpy as jnp
        >>> fingerprint({"w": jnp.zeros((2, 3)), "head": None})["leaves"]
        [['head', None, None], ['w', [2, 3], 'float32']]
    """
    digest = hashlib.sha256() if content else None
    leaves = []
    for path, w in leaves_with_paths(frozen):
        if w is None:
            leaves.append([path, None, None])
            continue
        leaves.append([path, [int(d) for d in w.shape], jnp.dtype(w.dtype).name])
        if digest is not None:
            for x in jax.tree.leaves(w):
                digest.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return {"leaves": leaves, "sha256": None if digest is None else digest.hexdigest()}


def is_fingerprint(base: Any) -> bool:
    return isinstance(base, dict) and set(base) == {"leaves", "sha256"}


def as_fingerprint(base: Any) -> dict:
    return base if is_fingerprint(base) else fingerprint(base)


def host_value(x: Any) -> np.ndarray:
    """The whole array on this host (gathered from every process when no process holds it).

    Collective in multi-process runs: every process must call it for the same array.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sha256(x: Any) -> str:
    """SHA-256 of an array's bytes in C order (its global value in multi-process runs)."""
    return hashlib.sha256(np.ascontiguousarray(host_value(x)).tobytes()).hexdigest()


def array_info(x: Any) -> dict:
    return {
        "shape": [int(d) for d in x.shape],
        "dtype": jnp.dtype(x.dtype).name,
        "sha256": sha256(x),
    }


def rule_to_json(rule: LoraRule) -> dict:
    out = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)}
    out["param_dtype"] = jnp.dtype(rule.param_dtype).name
    for name in ("in_axes", "stack_axes"):
        out[name] = None if out[name] is None else list(out[name])
    for v in _variant.variants():  # fields a variant owns (GLoRA's config)
        out.update(v.rule_to_json(rule))
    out["variant"] = _variant.config_to_json(rule.variant)
    return out


def rule_from_json(d: dict) -> LoraRule:
    d = dict(d)
    d["param_dtype"] = jnp.dtype(d["param_dtype"])
    for name in ("in_axes", "stack_axes"):
        d[name] = None if d[name] is None else tuple(d[name])
    for v in _variant.variants():
        v.rule_from_json(d)
    d["variant"] = _variant.config_from_json(d.get("variant"))
    return LoraRule(**d)


class _Slot:
    """Placeholder leaf used to record and rebuild a tree's structure."""


def encode_node(node: Any) -> Any:
    if is_node(node) or hasattr(node, "shape"):
        return "leaf"
    if type(node) is dict:
        return {"dict": [[k, encode_node(node[k])] for k in sorted(node)]}
    if type(node) in (list, tuple):
        return {type(node).__name__: [encode_node(x) for x in node]}
    raise TypeError(type(node).__name__)


def decode_structure(enc: Any) -> Any:
    if enc == "leaf":
        return _Slot()
    if "dict" in enc:
        return {k: decode_structure(v) for k, v in enc["dict"]}
    kind, items = next(iter(enc.items()))
    seq = [decode_structure(x) for x in items]
    return seq if kind == "list" else tuple(seq)


def encode_structure(trainable: Any) -> Any:
    """JSON form of the tree encode_structure, or None when it holds custom pytree nodes."""
    try:
        enc = encode_node(trainable)
    except TypeError:
        return None
    skeleton = jax.tree.map(lambda _: _Slot(), trainable, is_leaf=is_node)
    rebuilt = decode_structure(enc)
    same = jax.tree.structure(skeleton) == jax.tree.structure(rebuilt)
    return enc if same else None


factor_arrays = _variant.factor_arrays  # by name: a, b and each variant's (magnitude, glora_*)


def entry_shape(entry: dict) -> tuple[int, ...] | None:
    """Shape of the base weight an entry adapts (None for holes and trained leaves)."""
    if entry["kind"] != "factors":
        return None
    a, b = entry["arrays"]["a"]["shape"], entry["arrays"]["b"]["shape"]
    ns = len(entry["stack_axes"])
    sizes = dict(zip(entry["stack_axes"], a[:ns]))
    sizes.update(zip(entry["in_axes"], a[ns:-1]))
    sizes.update(zip(entry["out_axes"], b[ns + 1 :]))
    return tuple(sizes[i] for i in range(len(sizes)))


def check_fits(fp: dict, entries: list[dict], what: str) -> None:
    """Raise naming the first path where the adapter entries do not fit a base fingerprint."""
    base = {p: (s, d) for p, s, d in fp["leaves"]}
    paths = [p for p, _, _ in fp["leaves"]]
    mine = [e["path"] for e in entries]
    if paths != mine:
        for i, (p, q) in enumerate(zip(paths + [None], mine + [None])):
            if p != q:
                raise ValueError(
                    f"adapter does not fit {what}: at leaf {i} the base has {p!r} but the adapter "
                    f"has {q!r}; load onto the model the adapter was trained on."
                )
    for e in entries:
        shape, _ = base[e["path"]]
        want = entry_shape(e)
        if e["kind"] == "factors" and (shape is None or tuple(shape) != want):
            raise ValueError(
                f"adapter does not fit {what}: '{e['path']}' has shape "
                f"{None if shape is None else tuple(shape)} in the base but the adapter's factors "
                f"adapt shape {want}; load onto the model the adapter was trained on."
            )
        if e["kind"] == "array" and shape is not None:
            raise ValueError(
                f"adapter does not fit {what}: '{e['path']}' is trained fully by the adapter but "
                f"the base holds a weight there; pass the frozen tree from lj.split."
            )


def check_base(stored: dict, base: Any, entries: list[dict]) -> None:
    fp = as_fingerprint(base)
    check_fits(fp, entries, "base")
    if stored["sha256"] is not None and not is_fingerprint(base):
        fp = fingerprint(base, content=True)
    if stored["sha256"] is not None and fp["sha256"] not in (None, stored["sha256"]):
        raise ValueError(
            f"base content hash {fp['sha256'][:12]}... differs from the one saved with the "
            f"adapter ({stored['sha256'][:12]}...): same shapes, different weights. Load onto "
            f"the base the adapter was trained on."
        )


def restore_target(info: dict, like_leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(like_leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(tuple(info["shape"]), jnp.dtype(info["dtype"]), sharding=sharding)


def kind_and_shapes(x: Any) -> tuple[str, Any]:
    if x is None:
        return "none", None
    if isinstance(x, LoraFactors):
        return "factors", tuple(tuple(v.shape) for v in factor_arrays(x).values())
    return "array", (tuple(x.shape),)


def leaves_of_like(like: Any, entries: list[dict]) -> list[Any]:
    items = leaves_with_paths(like)
    for i in range(max(len(items), len(entries))):
        path, x = items[i] if i < len(items) else (None, None)
        e = entries[i] if i < len(entries) else {"path": None, "kind": "none"}
        kind, got = kind_and_shapes(x)
        names = tuple(e["arrays"]) if e["kind"] != "none" else ()
        want = tuple(tuple(e["arrays"][n]["shape"]) for n in names) or None
        if path != e["path"] or kind != e["kind"] or got != want:
            raise ValueError(
                f"like= does not match the checkpoint at leaf {i}: like has {path!r} ({kind}, "
                f"shapes {got}) where the checkpoint has {e['path']!r} ({e['kind']}, shapes "
                f"{want}); build like from the same lj.split call (e.g. with jax.eval_shape)."
            )
    return [x for _, x in items]
