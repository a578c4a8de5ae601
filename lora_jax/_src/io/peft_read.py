"""Reading a PEFT LoRA adapter: factors (and variants' keys, by their hooks) and fully
trained leaves, per module.

The tensor names and layouts are documented in :mod:`lora_jax.peft`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.io.safe_io import check_peft_config, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ROOT = "base_model.model."


def transpose_if(w: np.ndarray, transposed: bool) -> np.ndarray:
    return np.ascontiguousarray(w.T if transposed and w.ndim == 2 else w)


def pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass a folder written by save_pretrained.")
    config = read_json(path, f"a PEFT {CONFIG_NAME}")
    ptype = config.get("peft_type")
    own = _variant.for_peft_type(ptype)
    on_lora = _variant.on_peft_lora()
    lora_types = ["LORA", *(t for v in on_lora for t in v.peft_types)]
    if ptype not in lora_types and own is None:
        more = [t for v in _variant.variants() if v.peft == "own" for t in v.peft_types]
        raise ValueError(
            f"{path}: peft_type={ptype!r}; only {' and '.join(map(repr, lora_types))} load "
            f"(and {more} through their variants)."
        )
    for name, ok in (("bias", "none"), ("lora_bias", False)):
        if config.get(name, ok) != ok:
            raise ValueError(
                f"{path}: {name}={config[name]!r} is not supported (only {name}={ok!r}); "
                f"retrain the adapter without it."
            )
    if own is not None:
        own.peft_check_config(config, path)
        return config
    skip = {f for v in on_lora if v.peft_uses(config) for f in v.peft_own_fields}
    check_peft_config(config, path, skip=skip)
    for v in on_lora:
        v.peft_check_config(config, path)
    return config


def split_point(shape: tuple[int, ...], d_in: int, d_out: int) -> int | None:
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == d_in and math.prod(shape[k:]) == d_out:
            return k
    return None


def read_factors(tensors, consumed, config, module, path, w_shape, stacked_index, out_in=False):
    """(a, b, alpha, (in_axes, out_axes), variant arrays) of one torch module, or None.

    ``w_shape`` is the (per-layer) weight's shape: ``(*in, *out)``, or ``(*out, *in)`` when
    ``out_in`` (a torch-layout weight, key map layout ``linear_out_in``). The variants this
    config switches on read their own keys (:meth:`Variant.peft_refine`).
    """
    used = [v for v in _variant.on_peft_lora() if v.peft_uses(config)]
    pairs = tuple(v.peft_pair for v in used if v.peft_pair)
    pairs += (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
    for a_name, b_name in pairs:
        ka, kb = f"{ROOT}{module}.{a_name}", f"{ROOT}{module}.{b_name}"
        if ka in tensors:
            break
    else:
        return None
    if kb not in tensors:
        raise ValueError(f"adapter has '{ka}' but no '{kb}'; the file is incomplete.")
    consumed.update((ka, kb))
    owned = {f for v in used for f in v.peft_own_fields}
    r = config.get("r")
    if "rank_pattern" not in owned:
        r = pattern_value(config.get("rank_pattern") or {}, module, r)
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    m = _variant.PeftModule(module, f"{ROOT}{module}.", tensors[ka], tensors[kb], r, alpha)
    for v in used:
        m = v.peft_refine(m, tensors, consumed, config)
    A, B, r = m.a, m.b, m.r
    where = f"'{path}'" + ("" if stacked_index is None else f" layer {stacked_index}")
    if A.ndim != 2 or A.shape[0] != r:
        raise ValueError(f"'{ka}' has shape {A.shape}; r={r} in {CONFIG_NAME} expects ({r}, in).")
    d_in = A.shape[1]
    d_first, d_last = (B.shape[0], d_in) if out_in else (d_in, B.shape[0])
    k = split_point(w_shape, d_first, d_last) if B.ndim == 2 else None
    if B.ndim != 2 or B.shape[1] != r or k is None:
        raise ValueError(
            f"'{ka}' {A.shape} and '{kb}' {B.shape} do not fit the base weight {where} of shape "
            f"{w_shape}: expected ({r}, in) and (out, {r}) with in * out = "
            f"{math.prod(w_shape)}; load onto the model the adapter was trained for."
        )
    ins, outs = (w_shape[k:], w_shape[:k]) if out_in else (w_shape[:k], w_shape[k:])
    a = A.T.reshape(*ins, r)
    b = B.T.reshape(r, *outs)
    n = len(w_shape)
    axes = (
        (tuple(range(k, n)), tuple(range(k))) if out_in else (tuple(range(k)), tuple(range(k, n)))
    )
    return a, b, float(m.alpha), axes, m.arrays


def check_base_copy(tensors, consumed, prefix, tg, w, path) -> None:
    """PEFT also saves adapted embeddings' base (``<module>.base_layer.weight``): must be ours."""
    key = f"{ROOT}{prefix}{tg.module}.base_layer.{tg.key.rsplit('.', 1)[1]}"
    if key not in tensors:
        return
    consumed.add(key)
    if hasattr(w, "dtype") and not np.array_equal(
        transpose_if(np.asarray(w), tg.transposed), tensors[key]
    ):
        raise ValueError(
            f"'{key}' {tensors[key].shape} (a copy of the base weight saved by PEFT) differs from "
            f"frozen '{path}'; the adapter was made for other base weights (e.g. a resized "
            f"vocabulary): load onto that base."
        )


def full_leaf(tensors, consumed, prefixes, key_map, path, directory) -> jax.Array | None:
    """A fully trained leaf (``None`` in frozen) from its ``modules_to_save`` tensors.

    ``None`` when the key map has no entry for ``path``: the model's tree itself holds
    ``None`` there (a bias-free layer, an ``eqx.partition`` hole).
    """
    try:
        try:
            tgts, stacked = [key_map.to_hf(path)], False
        except ValueError:  # stacked: read layers until one is missing
            tgts, stacked = [], True
            while any(ROOT + p + key_map.to_hf(path, len(tgts)).key in tensors for p in prefixes):
                tgts.append(key_map.to_hf(path, len(tgts)))
    except KeyError:  # not a torch module: a hole of the model's own tree (eqx.partition)
        return None
    keys = []
    for tg in tgts:
        found = [ROOT + p + tg.key for p in prefixes if ROOT + p + tg.key in tensors]
        keys.append(found[0] if found else None)
    if not keys or None in keys:
        first = (tgts[keys.index(None)] if None in keys else key_map.to_hf(path, 0)).key
        raise ValueError(
            f"frozen has None at '{path}' (trained fully) but {directory}/{WEIGHTS_NAME} has "
            f"no tensor '{ROOT}{first}'; pass a frozen tree split with the adapter's "
            f"modules_to_save as full=True rules."
        )
    consumed.update(keys)
    leaves = [transpose_if(tensors[k], tgts[0].transposed) for k in keys]
    return jnp.asarray(np.stack(leaves) if stacked else leaves[0])


def assemble(found, stacked, shape, config, path) -> LoraFactors | None:
    present = [f for f in found if f is not None]
    if not present:
        return None
    kinds = {(f[0].shape, f[1].shape, f[2], f[3], *map(np.shape, f[4].values())) for f in present}
    if len(kinds) > 1:
        raise ValueError(
            f"'{path}' stacks {len(found)} layers but the adapter gives them different ranks, "
            f"alphas or shapes; PEFT adapters with per-layer ranks need an unstacked model."
        )
    a0, b0, alpha, (ins, outs), arrays0 = present[0]
    gaps = len(present) < len(found)
    for v in _variant.variants():
        if gaps and not v.peft_zero_fill and any(v.owns(n) for n in arrays0):
            raise ValueError(
                f"'{path}' stacks {len(found)} layers but the {v.title} adapter covers only "
                f"{len(present)}; a missing layer has no {v.title} arrays. Load onto an "
                f"unstacked model."
            )
    if stacked:  # layers the adapter misses get zero factors (and zero variant arrays)

        def stack(pick, x0: np.ndarray) -> np.ndarray:
            return np.stack([np.zeros_like(x0) if f is None else pick(f) for f in found])

        a, b = stack(lambda f: f[0], a0), stack(lambda f: f[1], b0)
        arrays = {n: stack(lambda f, n=n: f[4][n], x) for n, x in arrays0.items()}
    else:
        a, b, arrays = a0, b0, arrays0
    ns = int(stacked)
    t = LoraFactors(
        a=jnp.asarray(a),
        b=jnp.asarray(b),
        alpha=alpha,
        stack_axes=tuple(range(ns)),
        in_axes=tuple(ns + i for i in ins),
        out_axes=tuple(ns + i for i in outs),
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0)),
    )
    return _variant.restore_arrays(t, {n: jnp.asarray(x) for n, x in arrays.items()})
