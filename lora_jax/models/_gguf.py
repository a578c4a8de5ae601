"""llama.cpp GGUF Llama files: metadata to config fields, tensors as lazy torch-layout readers.

Nothing is dequantised up front: each reader dequantises its tensor (``gguf.quants``,
the routine transformers uses) when called, so a loader can quantise while loading.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from lora_jax._src.io.safe_io import check_float_tensor, open_gguf

# GGUF (llama.cpp) tensor names -> the torch keys of ``llama.PEFT_KEY_MAP``.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader: Any, name: str, default: Any = None) -> Any:
    field = reader.fields.get(name)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata has no '{name}'; is this a llama.cpp Llama file?")
        return default
    return field.contents()


def _number(reader: Any, path: Any, name: str, default: Any, kind: type) -> Any:
    """A positive int (or finite float) metadata field; anything else is a ValueError."""
    value = _field(reader, name, default)
    try:
        number = kind(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        number = None
    if number is None or not np.isfinite(number) or number <= 0 or isinstance(value, bool):
        raise ValueError(
            f"{path}: GGUF field '{name}' is {value!r}; expected a positive {kind.__name__}."
        )
    return number


def _tensor_reader(t: Any, path: Any, heads: int | None) -> Callable[[], np.ndarray]:
    """Dequantise ``t`` to float32 in torch layout; ``heads`` undoes the q/k row permutation."""
    import gguf

    def read() -> np.ndarray:
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
        except Exception as e:  # unknown quant type, data shorter than the shape...
            raise ValueError(
                f"{path}: tensor '{t.name}' ({t.tensor_type!r}, shape {tuple(t.shape)}) cannot "
                f"be dequantised ({e}); the file is corrupted."
            ) from e
        check_float_tensor(w, f"{path}: tensor '{t.name}'")
        if heads is not None:
            rows, cols = w.shape
            w = w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        return w

    return read


def gguf_llama(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, Callable[[], np.ndarray]]]:
    """``(LlamaConfig fields, {torch key: lazy float32 reader})`` of a llama.cpp Llama GGUF."""
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; load_gguf reads 'llama' only.")
    tensors = {str(t.name): t for t in reader.tensors}
    for name in tensors:
        parts = name.split(".")
        if name not in GGUF_NAMES and not (
            len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_BLOCK
        ):
            raise ValueError(
                f"{path}: tensor '{name}' is not a llama.cpp Llama tensor (expected "
                f"{sorted(GGUF_NAMES)} or blk.N.{{{','.join(GGUF_BLOCK)}}}.weight)."
            )
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path} has no 'token_embd.weight'; it is not a complete Llama GGUF.")
    num = lambda name, default=None, kind=int: _number(reader, path, name, default, kind)  # noqa: E731
    heads = num("llama.attention.head_count")
    kv_heads = num("llama.attention.head_count_kv", heads)
    hidden = num("llama.embedding_length")
    fields = dict(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=num("llama.feed_forward_length"),
        num_hidden_layers=num("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=num("llama.rope.dimension_count", hidden // heads),
        rms_norm_eps=num("llama.attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=num("llama.rope.freq_base", 10000.0, float),
        tie_word_embeddings="output.weight" not in tensors,
    )
    readers = {}
    for name, t in tensors.items():
        if name in GGUF_NAMES:
            readers[GGUF_NAMES[name]] = _tensor_reader(t, path, None)
            continue
        _, layer, kind, _ = name.split(".")
        n = {"attn_q": heads, "attn_k": kv_heads}.get(kind)
        if n is not None:
            rows = int(t.shape[-1])
            if rows % (2 * n):
                raise ValueError(
                    f"{path}: '{name}' has {rows} rows, not a multiple of 2 * {n} heads; the "
                    f"file's head counts and tensors disagree."
                )
        readers[f"model.layers.{layer}.{GGUF_BLOCK[kind]}.weight"] = _tensor_reader(t, path, n)
    return fields, readers
