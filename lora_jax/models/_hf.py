"""Hugging Face checkpoints: reading config.json + safetensors, and the name map to our paths.

Each reference model publishes a :class:`KeyMap` as ``PEFT_KEY_MAP``: one
:class:`KeyEntry` per parameter, pairing our "/"-joined leaf path with the
PyTorch state-dict key of the same weight. Both are templates in which
``{layer}`` stands for a layer index:

* ``{layer}`` in both (BERT: ``encoder/layer_{layer}/attention/query/kernel`` and
  ``encoder.layer.{layer}.attention.self.query.weight``): one leaf per layer.
* ``{layer}`` only in the key (Llama: ``layers/attention/q_proj/kernel`` and
  ``model.layers.{layer}.self_attn.q_proj.weight``): the leaf is *stacked*, its
  axis 0 indexes layers, and layer ``i`` is ``leaf[i]`` (LoraFactors ``a[i]``, ``b[i]``).

``layout`` says how the torch tensor relates to ours:

* ``linear``: ``nn.Linear.weight (out, in)``, our kernel ``(in, out)`` is its transpose;
  PEFT stores ``lora_A.weight (r, in)`` and ``lora_B.weight (out, r)``.
* ``linear_out_in``: ``nn.Linear.weight (out, in)`` stored as it is, as Equinox's
  ``eqx.nn.Linear.weight`` and torch ports do: our leaf *is* the torch tensor, and its
  factors have ``in_axes=(1,)`` (``split`` with ``apply_fn=`` finds that).
* ``embedding``: ``nn.Embedding.weight (vocab, dim)``, the same as ours; PEFT stores
  ``lora_embedding_A (r, vocab)`` and ``lora_embedding_B (dim, r)``.
* ``vector``: biases and norm weights ``(n,)``, the same as ours (only ever fully trained,
  PEFT's ``modules_to_save``).

So ``transposed`` (torch is our kernel transposed) holds for ``linear`` only; a
GPT-2 style ``Conv1D`` (PEFT's ``fan_in_fan_out=True``) would be a fourth layout
stored ``(in, out)`` like ours. In every layout, for a 2-D leaf with factors
``a (in, r)``, ``b (r, out)``: PEFT's A is ``a.T`` and B is ``b.T``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np
from safetensors import safe_open

from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.io.safe_io import check_float_tensor, read_json, safetensors_header

LAYOUTS = ("linear", "linear_out_in", "embedding", "vector")
_LAYER = re.escape("{layer}")


class KeyEntry(NamedTuple):
    """One parameter: our path template, the torch state-dict key template, the layout."""

    path: str  # e.g. "layers/attention/q_proj/kernel" or "encoder/layer_{layer}/output/dense/bias"
    key: str  # e.g. "model.layers.{layer}.self_attn.q_proj.weight"
    layout: str  # one of LAYOUTS

    @property
    def stacked(self) -> bool:
        """Our leaf holds every layer along axis 0."""
        return "{layer}" in self.key and "{layer}" not in self.path


class HFTarget(NamedTuple):
    """Where one of our leaves (or one layer of a stacked leaf) lives in a torch model."""

    key: str  # state-dict key, e.g. "model.layers.3.self_attn.q_proj.weight"
    layout: str  # one of LAYOUTS

    @property
    def module(self) -> str:
        """Module name, e.g. ``model.layers.3.self_attn.q_proj`` (what PEFT's keys name)."""
        return self.key.rsplit(".", 1)[0]

    @property
    def transposed(self) -> bool:
        """The torch tensor is our leaf transposed (``nn.Linear`` stores ``(out, in)``)."""
        return self.layout == "linear"


def _regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(_LAYER, r"(?P<layer>\d+)"))


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """The bidirectional map between our leaf paths and a torch model's state-dict keys.

    Example:
        >>> from lora_jax.models import llama
        >>> t = llama.PEFT_KEY_MAP.to_hf("layers/attention/q_proj/kernel", layer=3)
        >>> t.module, t.transposed
        ('model.layers.3.self_attn.q_proj', True)
        >>> llama.PEFT_KEY_MAP.from_hf("model.layers.3.self_attn.q_proj")
        ('layers/attention/q_proj/kernel', 3)
    """

    entries: tuple[KeyEntry, ...]
    # Prefixes a torch key may carry before the names in `entries` (e.g. "bert." in
    # BertForSequenceClassification); from_hf strips them, to_hf never adds them.
    prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for e in self.entries:
            if e.layout not in LAYOUTS:
                raise ValueError(f"KeyEntry {e}: layout must be one of {LAYOUTS}.")

    def to_hf(self, path: str, layer: int | None = None) -> HFTarget:
        """The torch key of our leaf ``path``; ``layer`` picks one layer of a stacked leaf.

        Raises:
            KeyError: no entry matches ``path``.
            ValueError: ``layer`` is missing for a stacked leaf or given for an unstacked one.
        """
        for e in self.entries:
            m = _regex(e.path).fullmatch(path)
            if m is None:
                continue
            if e.stacked and layer is None:
                raise ValueError(
                    f"'{path}' stacks layers along axis 0; pass layer=i to name one layer's "
                    f"module ({e.key})."
                )
            if not e.stacked and layer is not None:
                raise ValueError(f"'{path}' is not stacked; drop layer={layer}.")
            index = m.groupdict().get("layer", layer)
            return HFTarget(e.key.format(layer=index), e.layout)
        raise KeyError(
            f"no PEFT_KEY_MAP entry for our path '{path}'; known paths look like "
            f"{[e.path for e in self.entries[:4]]}."
        )

    def from_hf(self, name: str) -> tuple[str, int | None]:
        """Our ``(path, layer)`` for a torch state-dict key or module name (meaning its weight).

        ``layer`` is the index into axis 0 of a stacked leaf, else None.

        Raises:
            KeyError: the name matches no entry.
        """
        candidates = [name, name + ".weight"]
        for prefix in self.prefixes:
            candidates += [c[len(prefix) :] for c in candidates if c.startswith(prefix)]
        for cand in candidates:
            for e in self.entries:
                m = _regex(e.key).fullmatch(cand)
                if m is None:
                    continue
                layer = m.groupdict().get("layer")
                if e.stacked:
                    return e.path, int(layer)
                return (e.path if layer is None else e.path.format(layer=layer)), None
        raise KeyError(
            f"torch name '{name}' matches no PEFT_KEY_MAP entry; known keys look like "
            f"{[e.key for e in self.entries[:4]]}."
        )


def read_config(hf_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a Hugging Face model folder."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist; pass a folder written by save_pretrained (config.json "
            f"and model.safetensors)."
        )
    return read_json(path, "a Hugging Face config.json")


def safetensors_reader(hf_dir: str | os.PathLike) -> dict[str, Callable[[], np.ndarray]]:
    """Lazy readers, by key, of ``model.safetensors`` or a sharded ``*.index.json`` set.

    Values are numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``), torch layout.
    """
    single = os.path.join(hf_dir, "model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        files = {single}
        owner = None
    elif os.path.isfile(index):
        owner = _weight_map(index, hf_dir)
        files = set(owner.values())
    else:
        raise FileNotFoundError(
            f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json; "
            f"save the torch model with save_pretrained(..., safe_serialization=True)."
        )
    readers = {}
    for file in sorted(files):
        keys = list(safetensors_header(file))
        for k in keys:
            if owner is None or owner.get(k) == file:
                readers[k] = _reader(file, k)
    return readers


def _weight_map(index: str, hf_dir: str | os.PathLike) -> dict[str, str]:
    """``{key: file}`` of a sharded checkpoint's index, each file inside ``hf_dir``."""
    weight_map = read_json(index, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and os.path.basename(v) == v and v.endswith(".safetensors")
        for v in weight_map.values()
    ):
        raise ValueError(
            f"{index}: weight_map must map tensor names to .safetensors file names in the same "
            f"folder; the index is corrupted."
        )
    return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}


def check_dtype(dtype: Any, fn: str) -> None:
    """Refuse a cast target that is not a float dtype (None keeps the stored dtype)."""
    try:
        ok = dtype is None or jax.numpy.issubdtype(dtype, jax.numpy.floating)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(
            f"{fn}: dtype={dtype!r} is not a float dtype; pass jnp.float32, jnp.bfloat16, "
            f"jnp.float16 or None (keep the stored dtype)."
        )


def require_ints(hf: dict, names: Iterable[str], where: str, optional: Iterable[str] = ()) -> None:
    """Refuse a config.json whose size fields (``optional`` ones if present) are not ints >= 1."""
    for name in (*names, *(n for n in optional if hf.get(n) is not None)):
        v = hf.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"{where}: {name}={v!r} must be a positive int; the config.json is corrupted or "
                f"belongs to another model type."
            )


def _reader(file: str, key: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        try:
            with safe_open(file, framework="flax") as f:
                return np.asarray(f.get_tensor(key))
        except Exception as e:  # SafetensorError for a file changed or damaged since opened
            raise ValueError(f"{file}: cannot read tensor '{key}' ({e}); re-export it.") from e

    return read


def stack_numpy(path: str, layers: list[Callable[[], np.ndarray]], stacked: bool) -> np.ndarray:
    """The default leaf of :func:`build_tree`: the tensor, or its layers stacked on axis 0."""
    return np.stack([read() for read in layers]) if stacked else layers[0]()


def build_tree(
    entries: Iterable[KeyEntry],
    tensors: dict[str, Callable[[], np.ndarray]],
    num_layers: int,
    prefix: str = "",
    where: str = "checkpoint",
    convert: Callable[[str, list, bool], Any] = stack_numpy,
) -> dict[str, Any]:
    """Our nested-dict tree from torch tensors named by ``entries``.

    Each of our leaves is made by ``convert(path, layers, stacked)``: ``layers`` are
    zero-argument readers of its tensors in our layout (one per layer for a stacked
    leaf, else one), read only when called, so ``convert`` can process one tensor at a
    time (quantise while loading). The default stacks them into numpy arrays.
    """

    def reader(key: str, layout: str) -> Callable[[], np.ndarray]:
        if prefix + key not in tensors:
            sample = sorted(tensors)[:5]
            raise KeyError(
                f"{where} has no tensor '{prefix + key}'; it has {len(tensors)} tensors such "
                f"as {sample}. Is it the right model class (see PEFT_KEY_MAP)?"
            )

        def read() -> np.ndarray:
            w = tensors[prefix + key]()
            check_float_tensor(w, f"{where}: tensor '{prefix + key}'")
            return w.T if layout == "linear" else w

        return read

    tree: dict[str, Any] = {}
    plan = []  # every reader first, so a missing tensor fails before anything is read
    for e in entries:
        if e.stacked:
            layers = [reader(e.key.format(layer=i), e.layout) for i in range(num_layers)]
            plan.append((e.path, layers, True))
        elif "{layer}" in e.path:
            for i in range(num_layers):
                plan.append(
                    (e.path.format(layer=i), [reader(e.key.format(layer=i), e.layout)], False)
                )
        else:
            plan.append((e.path, [reader(e.key, e.layout)], False))
    for path, layers, stacked in plan:
        *parents, name = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = convert(path, layers, stacked)
    return tree


def check_shapes(tree: Any, expected: Any, where: str) -> None:
    """Raise if a loaded tree's leaf shapes differ from the config's (abstract init)."""
    quantized = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
    got = {
        jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=quantized)[0]
    }
    for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]:
        path = jax.tree_util.keystr(p, simple=True, separator="/")
        if tuple(got[path]) != tuple(x.shape):
            raise ValueError(
                f"{where}: '{path}' has shape {tuple(got[path])} but config.json implies "
                f"{tuple(x.shape)}; the config and the weights disagree."
            )
