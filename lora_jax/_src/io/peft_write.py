"""Writing PEFT adapters, and the entry points of the PEFT format both ways."""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np
from safetensors.numpy import save_file

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.rules import LoraRule
from lora_jax._src.core.trees import is_node, leaves_with_paths
from lora_jax._src.io.peft_read import (
    CONFIG_NAME,
    ROOT,
    WEIGHTS_NAME,
    assemble,
    check_base_copy,
    full_leaf,
    read_config,
    read_factors,
    transpose_if,
)
from lora_jax._src.io.safe_io import adapter_tensors


class HFTarget(Protocol):
    key: str
    layout: str

    @property
    def module(self) -> str: ...

    @property
    def transposed(self) -> bool: ...


class KeyMap(Protocol):
    def to_hf(self, path: str, layer: int | None = None) -> HFTarget: ...


def _targets(key_map: KeyMap, path: str, n_layers: int | None) -> tuple[list[HFTarget], bool]:
    """Torch targets of one leaf (one per layer when the map stacks it) and whether stacked.

    ``n_layers`` is the size of the leaf's axis 0 (None for a scalar). Raises KeyError
    for an unmapped path.
    """
    try:
        return [key_map.to_hf(path)], False
    except ValueError:
        if n_layers is None:
            raise
        return [key_map.to_hf(path, layer=i) for i in range(n_layers)], True


def _check_orientation(path: str, t: LoraFactors, layout: str) -> None:
    """Refuse factors whose input side contradicts the key map's torch layout.

    ``linear`` leaves are ``(*in, *out)`` (a Flax kernel), ``linear_out_in`` leaves
    ``(*out, *in)`` (the torch weight itself); factors built the other way round (e.g. an
    Equinox weight split without ``apply_fn=``) would export ``lora_A`` on the output side.
    """
    want = {"linear": (t.in_axes, t.out_axes), "linear_out_in": (t.out_axes, t.in_axes)}
    if layout not in want:
        return
    first, last = want[layout]
    if max(first) > min(last):
        expect = "(*in, *out)" if layout == "linear" else "(*out, *in)"
        raise ValueError(
            f"'{path}': the key map's layout {layout!r} stores this weight as {expect}, but its "
            f"factors have in_axes={t.in_axes} and out_axes={t.out_axes}. Split with "
            f"apply_fn= (or LoraRule(in_axes=...)) so that `a` is on the input side, or fix the "
            f"key map's layout ('linear' for (in, out) kernels, 'linear_out_in' for (out, in))."
        )


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _common(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value and a {module: value} pattern of the others."""
    top = collections.Counter(values.values()).most_common(1)[0][0]
    return top, {m: v for m, v in values.items() if v != top}


def _one(values: dict[str, Any], name: str) -> Any:
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        raise ValueError(
            f"PEFT has one {name} per adapter but the factors use {distinct} "
            f"(e.g. {next(iter(values))!r}); use one value in all LoraRules."
        )
    return distinct[0]


def _check_args(fn: str, key_map: Any, tree: Any, name: str) -> None:
    """Refuse a key map without ``to_hf`` and an empty or ``None`` tree, before any file I/O."""
    if not callable(getattr(key_map, "to_hf", None)):
        raise TypeError(
            f"{fn}: key_map is a {type(key_map).__name__} without to_hf(path, layer); pass e.g. "
            f"lora_jax.models.bert.PEFT_KEY_MAP or a lora_jax.models.KeyMap."
        )
    if not any(p for p, _ in leaves_with_paths(tree)):
        raise ValueError(f"{fn}: {name} is an empty tree (or None); pass the {name} from lj.split.")


def save_pretrained(
    directory: str | os.PathLike,
    trainable: Any,
    *,
    key_map: KeyMap,
    rules: Sequence[LoraRule] | LoraRule | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    module_prefix: str = "",
    fan_in_fan_out: bool = False,
) -> None:
    """Write ``trainable`` as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

    Args:
        directory: output folder (created); gets ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        trainable: the trainable tree from :func:`lora_jax.split`.
        key_map: maps our leaf paths to torch modules (see the module docstring).
        rules: the LoraRules used to split; records ``init_lora_weights`` ("gaussian"
            when every adapting rule uses it, else PEFT's default ``True``).
        base_model_name_or_path, task_type: copied into the config (e.g. "SEQ_CLS").
        module_prefix: prepended to every module name, e.g. ``"bert."`` for a
            ``BertForSequenceClassification`` whose key map names ``BertModel`` modules.
        fan_in_fan_out: the targets are GPT-2 ``Conv1D`` modules (torch weight ``(in, out)``).

    Raises:
        ValueError: a leaf has no key map entry, or the factors disagree on
            ``rslora``/``dropout`` (PEFT has one per adapter).

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, lora_jax as lj
        >>> from lora_jax.models import KeyEntry, KeyMap
        >>> key_map = KeyMap((KeyEntry("dense/kernel", "dense.weight", "linear"),))
        >>> frozen, trainable = lj.split({"dense": {"kernel": jnp.ones((8, 4))}},
        ...                              lj.LoraRule("dense/kernel", rank=2), key=jax.random.key(0))
        >>> d = tempfile.mkdtemp()
        >>> lj.peft.save_pretrained(d, trainable, key_map=key_map)
        >>> sorted(os.listdir(d))
        ['adapter_config.json', 'adapter_model.safetensors']
        >>> lj.peft.load_pretrained(d, frozen, key_map=key_map)["dense"]["kernel"].a.shape
        (8, 2)
    """
    _check_args("save_pretrained", key_map, trainable, "trainable")
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas, rslora, dropout, targets, full = {}, {}, {}, {}, [], []
    lora_leaves, owners = [], {}  # (path, factors, variants present) written as LoRA
    for path, t in leaves_with_paths(trainable):
        if t is None:
            continue
        stack = len(t.stack_axes) if isinstance(t, LoraFactors) else None
        if stack is not None and stack > 1:
            raise ValueError(
                f"'{path}' has {stack} stack axes {t.stack_axes}; PEFT export supports one "
                f"(layers). Reshape the stacked axes into one."
            )
        try:
            tgts, stacked = _targets(key_map, path, t.shape[0] if len(t.shape) else None)
        except KeyError as e:
            raise ValueError(f"no key_map entry for '{path}': {e}") from e
        if stack is not None and stacked != bool(stack):
            raise ValueError(
                f"'{path}': factors have stack_axes={t.stack_axes} but the key_map "
                f"{'stacks' if stacked else 'does not stack'} this leaf; split with "
                f"stack_axes matching the model's layout."
            )
        if not isinstance(t, LoraFactors):
            w = np.asarray(t)
            for i, tg in enumerate(tgts):
                tensors[ROOT + module_prefix + tg.key] = transpose_if(
                    w[i] if stacked else w, tg.transposed
                )
                full.append(module_prefix + tg.module)
            continue
        own = next((v for v in _variant.present(t) if v.peft == "own"), None)
        if own is not None:  # a variant with its own PEFT tuner writes its keys (VeRA)
            for i, tg in enumerate(tgts):
                module = module_prefix + tg.module
                for suffix, x in own.peft_tensors(t, i if stacked else None).items():
                    tensors[f"{ROOT}{module}.{suffix}"] = np.ascontiguousarray(x)
                targets.append(module)
                dropout[module] = t.dropout
            owners.setdefault(own, []).append(t)
            continue
        on_lora = list(_variant.present(t))
        for v in on_lora:
            if v.peft != "lora":
                raise ValueError(
                    f"'{path}': {v.title} factors have no PEFT format (no PEFT LoRA tuner reads "
                    f"them); keep them in lj.save_adapters checkpoints or export "
                    f"lj.merge(frozen, trainable)."
                )
        _check_orientation(path, t, tgts[0].layout)
        a, b = np.asarray(t.a), np.asarray(t.b)
        ns = len(t.stack_axes)
        order = np.argsort(t.in_axes)  # torch flattens the in side in the weight's axis order
        a = a.transpose(*range(ns), *(ns + order), a.ndim - 1)
        a = a.reshape(*a.shape[:ns], -1, a.shape[-1])
        b = b.reshape(*b.shape[: ns + 1], -1)
        emb = tgts[0].layout == "embedding"
        refused = next((v for v in on_lora if emb and not v.peft_embedding), None)
        if refused is not None:
            raise ValueError(
                f"'{path}' is an embedding with {refused.title} factors; the PEFT export "
                f"supports those on linear weights only. Use a plain LoraRule for embeddings."
            )
        names = next(
            (v.peft_pair for v in on_lora if v.peft_pair),
            ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight"),
        )
        for i, tg in enumerate(tgts):
            module = module_prefix + tg.module
            layer = i if stacked else None
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            tensors[f"{ROOT}{module}.{names[0]}"] = np.ascontiguousarray(ai.T)
            tensors[f"{ROOT}{module}.{names[1]}"] = np.ascontiguousarray(bi.T)
            for v in on_lora:
                for suffix, x in v.peft_tensors(t, layer).items():
                    tensors[f"{ROOT}{module}.{suffix}"] = np.ascontiguousarray(x)
            targets.append(module)
            ranks[module], alphas[module] = t.rank, _number(t.alpha)
            rslora[module], dropout[module] = t.rslora, t.dropout
        lora_leaves.append((path, t, on_lora))
    if not targets and not full:
        raise ValueError("trainable has no factors or trained leaves; nothing to save.")
    r, rank_pattern = _common(ranks) if ranks else (8, {})
    alpha, alpha_pattern = _common(alphas) if alphas else (8, {})
    init = True
    if rules is not None:
        rules = [rules] if isinstance(rules, LoraRule) else rules
        inits = {x.init for x in rules if not x.full}
        init = "gaussian" if inits == {"gaussian"} else True
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(set(full)) or None,
        "use_rslora": bool(_one(rslora, "use_rslora")) if rslora else False,
        "lora_dropout": float(_one(dropout, "lora_dropout")) if dropout else 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": init,
        "inference_mode": True,
    }
    for v in _variant.on_peft_lora():  # PEFT switches a variant on for the whole adapter
        leaves = [t for _, t, on in lora_leaves if v in on]
        if leaves and len(leaves) < len(lora_leaves):
            path = next(p for p, _, on in lora_leaves if v not in on)
            raise ValueError(
                f"PEFT has one {v.peft_setting} per adapter but the factors use [False, True] "
                f"(e.g. {path!r} has no {v.title}); use one value in all LoraRules."
            )
        if leaves:
            shared, config = v.peft_config(config, leaves)
            tensors.update(shared)
    for v, leaves in owners.items():
        if ranks or len(owners) > 1:
            raise ValueError(f"{v.title} factors cannot share a PEFT adapter with other factors.")
        shared, config = v.peft_config(config, leaves)
        tensors.update(shared)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_pretrained(directory: str | os.PathLike, frozen: Any, *, key_map: KeyMap) -> Any:
    """Read a PEFT LoRA adapter as a trainable tree for ``frozen``.

    Args:
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        frozen: the base parameter tree (or the frozen tree from :func:`lora_jax.split`);
            leaves that the adapter trains fully (``modules_to_save``) must be ``None``.
        key_map: maps our leaf paths to torch modules (see the module docstring). If it
            has ``prefixes`` (e.g. ``"bert."``), keys under those prefixes also load.

    Returns:
        The trainable tree (structure of ``frozen``): LoraFactors (float arrays of the
        saved dtype) at adapted leaves, arrays at fully trained ones, ``None`` elsewhere.
        Stacked leaves whose adapter misses some layers get zero factors there.

    Raises:
        ValueError: tensors whose shape does not match ``r``/``lora_alpha`` or the base
            (naming the key, the shape seen and the one expected), tensors no key maps to,
            unsupported config fields.

    Example:
        >>> import json, os, tempfile, numpy as np, jax.numpy as jnp, lora_jax as lj
        >>> from safetensors.numpy import save_file
        >>> from lora_jax.models import KeyEntry, KeyMap
        >>> d = tempfile.mkdtemp()  # an adapter as PEFT writes it: A (r, in), B (out, r)
        >>> save_file({"base_model.model.fc.lora_A.weight": np.ones((2, 8), np.float32),
        ...            "base_model.model.fc.lora_B.weight": np.ones((4, 2), np.float32)},
        ...           os.path.join(d, "adapter_model.safetensors"))
        >>> with open(os.path.join(d, "adapter_config.json"), "w") as f:
        ...     json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, f)
        >>> key_map = KeyMap((KeyEntry("fc/kernel", "fc.weight", "linear"),))
        >>> t = lj.peft.load_pretrained(d, {"fc": {"kernel": jnp.zeros((8, 4))}}, key_map=key_map)
        >>> t["fc"]["kernel"].a.shape, t["fc"]["kernel"].b.shape, t["fc"]["kernel"].scale
        ((8, 2), (2, 4), 2.0)
    """
    _check_args("load_pretrained", key_map, frozen, "frozen")
    config = read_config(directory)
    tensors = adapter_tensors(directory, WEIGHTS_NAME)
    read, build = read_factors, assemble
    own = _variant.for_peft_type(config.get("peft_type"))
    if own is not None:  # a variant with its own PEFT tuner reads its keys (VeRA)

        def read(tensors, consumed, config, module, *rest, out_in=False):
            return own.peft_read(
                tensors, consumed, config, f"{ROOT}{module}.", *rest, out_in=out_in
            )

        build = own.peft_assemble
    consumed: set[str] = set()
    prefixes = ("", *getattr(key_map, "prefixes", ()))
    names = {k[len(ROOT) :] for k in tensors}
    items = leaves_with_paths(frozen)
    out = []
    for path, w in items:
        if w is None:
            out.append(full_leaf(tensors, consumed, prefixes, key_map, path, directory))
            continue
        shape = tuple(w.shape)
        try:
            tgts, stacked = _targets(key_map, path, shape[0] if shape else None)
        except KeyError:
            out.append(None)
            continue
        prefix = next(
            (p for p in prefixes if any(n.startswith(p + tgts[0].module + ".") for n in names)), ""
        )
        found = [
            read(
                tensors,
                consumed,
                config,
                prefix + tg.module,
                path,
                shape[stacked:],
                i if stacked else None,
                out_in=tg.layout == "linear_out_in",
            )
            for i, tg in enumerate(tgts)
            if tg.key == tg.module + ".weight"  # LoRA adapts a module's weight, never its bias
        ]
        for i, tg in enumerate(tgts):
            check_base_copy(tensors, consumed, prefix, tg, w[i] if stacked else w, path)
            key = f"{ROOT}{prefix}{tg.key}"
            if key in tensors:
                raise ValueError(
                    f"adapter trains '{key}' fully (modules_to_save) but frozen holds a weight at "
                    f"'{path}'; split with LoraRule({path!r}, full=True) and pass that frozen tree."
                )
        out.append(build(found, stacked, shape, config, path))
    if not consumed:
        raise ValueError(
            f"{directory}/{WEIGHTS_NAME} has no tensor for any leaf of frozen ({len(tensors)} "
            f"tensors, e.g. {sorted(tensors)[:3]}); load onto the model the adapter was made for."
        )
    unused = sorted(set(tensors) - consumed)
    if unused:
        raise ValueError(
            f"{len(unused)} tensor(s) in {WEIGHTS_NAME} map to no leaf of frozen, e.g. "
            f"{unused[:3]}; add their modules to key_map or load onto the matching model."
        )
    return jax.tree.unflatten(jax.tree.structure(frozen, is_leaf=is_node), out)
