"""Test helpers for the reference Llama: a GGUF writer (llama.cpp's layout)."""

import gguf
import numpy as np

from lora_jax.models import _gguf


def write_gguf(path, model, arch="llama"):
    """A float32 GGUF of a torch Llama, written the way llama.cpp's converter does."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    names = {v: k for k, v in _gguf.GGUF_NAMES.items()}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.numpy()
        if key.startswith("model.layers."):
            _, _, layer, *rest = key.split(".")
            kind = {v: k for k, v in _gguf.GGUF_BLOCK.items()}[".".join(rest[:-1])]
            if kind in ("attn_q", "attn_k"):  # llama.cpp's row permutation
                n = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
                rows, cols = t.shape
                t = t.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)
            name = f"blk.{layer}.{kind}.weight"
        else:
            name = names[key]
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
