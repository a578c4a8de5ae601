"""Reading a PEFT adapter: factors, AdaLoRA triplets and fully trained leaves per module.

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
    own = _variant.for_peft_type(config.get("peft_type"))
    if config.get("peft_type") not in ("LORA", "ADALORA") and own is None:
        more = [t for v in _variant.variants() for t in v.peft_types]
        raise ValueError(
            f"{path}: peft_type={config.get('peft_type')!r}; only 'LORA' and 'ADALORA' load "
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
    else:
        check_peft_config(config, path)
    return config


def split_point(shape: tuple[int, ...], d_in: int, d_out: int) -> int | None:
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == d_in and math.prod(shape[k:]) == d_out:
            return k
    return None


def read_factors(tensors, consumed, config, module, path, w_shape, stacked_index, out_in=False):
    """(a, b, alpha, (in_axes, out_axes), singular, magnitude) of one torch module, or None.

    ``w_shape`` is the (per-layer) weight's shape: ``(*in, *out)``, or ``(*out, *in)`` when
    ``out_in`` (a torch-layout weight, key map layout ``linear_out_in``).
    """
    adalora = config.get("peft_type") == "ADALORA"
    pairs = (("lora_A", "lora_B"),) if adalora else ()
    pairs += (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
    for a_name, b_name in pairs:
        ka, kb = f"{ROOT}{module}.{a_name}", f"{ROOT}{module}.{b_name}"
        if ka in tensors:
            break
    else:
        return None
    if kb not in tensors:
        raise ValueError(f"adapter has '{ka}' but no '{kb}'; the file is incomplete.")
    A, B = tensors[ka], tensors[kb]
    consumed.update((ka, kb))
    if adalora:
        r, alpha = config["init_r"], config["lora_alpha"]
        A, B, E = adalora_tensors(tensors, consumed, config, module, ka, A, B)
    else:
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
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
    magnitude = None
    if config.get("use_dora", False):
        km = f"{ROOT}{module}.lora_magnitude_vector"
        if km not in tensors or tensors[km].shape != (B.shape[0],):
            got = tensors[km].shape if km in tensors else "is missing"
            raise ValueError(
                f"{CONFIG_NAME} has use_dora=True but '{km}' {got}; expected shape "
                f"({B.shape[0]},). The file is incomplete."
            )
        consumed.add(km)
        magnitude = tensors[km].reshape(outs)
    return a, b, float(alpha), axes, (E if adalora else None), magnitude


def adalora_tensors(tensors, consumed, config, module, ka, A, B):
    """AdaLoRA's ``A (r, in)``, ``B (out, r)``, ``E (r,)`` expanded to ``init_r`` if pruned."""
    ke = f"{ROOT}{module}.lora_E"
    if ke not in tensors or tensors[ke].shape != (A.shape[0], 1):
        got = tensors[ke].shape if ke in tensors else "is missing"
        raise ValueError(
            f"AdaLoRA adapter has '{ka}' {A.shape} but '{ke}' {got}; expected "
            f"({A.shape[0]}, 1). The file is incomplete."
        )
    consumed.add(ke)
    E = tensors[ke][:, 0]
    r = config["init_r"]
    kept = (config.get("rank_pattern") or {}).get(f"{module}.lora_E")
    if kept is not None and A.shape[0] != r:
        kept = np.asarray(kept, bool)
        if kept.shape != (r,) or kept.sum() != A.shape[0]:
            raise ValueError(
                f"rank_pattern['{module}.lora_E'] keeps {int(kept.sum())} of {kept.size} "
                f"ranks but '{ka}' has {A.shape[0]} rows and init_r={r}; the file is "
                f"inconsistent."
            )
        full = (
            lambda x, axis: np.zeros(  # noqa: E731
                x.shape[:axis] + (r,) + x.shape[axis + 1 :], x.dtype
            )
        )
        A2, B2, E2 = full(A, 0), full(B, 1), full(E, 0)
        A2[kept], B2[:, kept], E2[kept] = A, B, E
        A, B, E = A2, B2, E2
    return A, B, E


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
    if len({(f[0].shape, f[1].shape, f[2], f[3]) for f in present}) > 1:
        raise ValueError(
            f"'{path}' stacks {len(found)} layers but the adapter gives them different ranks, "
            f"alphas or shapes; PEFT adapters with per-layer ranks need an unstacked model."
        )
    a0, b0, alpha, (ins, outs), s0, m0 = present[0]
    if m0 is not None and len(present) < len(found):
        raise ValueError(
            f"'{path}' stacks {len(found)} layers but the DoRA adapter covers only "
            f"{len(present)}; a missing layer has no magnitude. Load onto an unstacked model."
        )
    if stacked:  # layers the adapter misses get zero factors (and zero singular values)

        def stack(i: int, x0: np.ndarray | None) -> np.ndarray | None:
            if x0 is None:
                return None
            return np.stack([np.zeros_like(x0) if f is None else f[i] for f in found])

        a, b, singular, magnitude = stack(0, a0), stack(1, b0), stack(4, s0), stack(5, m0)
    else:
        a, b, singular, magnitude = a0, b0, s0, m0
    ns = int(stacked)
    return LoraFactors(
        a=jnp.asarray(a),
        b=jnp.asarray(b),
        singular=None if singular is None else jnp.asarray(singular),
        magnitude=None if magnitude is None else jnp.asarray(magnitude),
        alpha=alpha,
        stack_axes=tuple(range(ns)),
        in_axes=tuple(ns + i for i in ins),
        out_axes=tuple(ns + i for i in outs),
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout", 0.0)),
    )
