"""Hostile and broken files: every loader refuses them with a clear ValueError, early.

Files are built here without torch: tiny BERT/Llama folders (config.json + safetensors),
a tiny Llama GGUF, a PEFT adapter folder and an orbax adapter checkpoint. Each is then
truncated, bit-flipped, given wrong shapes/dtypes/keys, absurd declared sizes, broken
JSON or pickle bytes. A pickle payload whose ``__reduce__`` creates a marker file checks
that no loader ever unpickles. A bounded hypothesis fuzz (mutated bytes of the valid
files) counts inputs tried, clean refusals, loads, crashes and hangs.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import signal
import struct
import time
import tracemalloc
import zipfile

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import lora_jax as lj
from lora_jax.models import KeyEntry, KeyMap, _gguf, bert, llama

BERT_CFG = bert.BertConfig(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)
LLAMA_CFG = llama.LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)
PEFT_MAP = KeyMap((KeyEntry("fc/kernel", "fc.weight", "linear"),))
PEFT_BASE = {"fc": {"kernel": jnp.zeros((8, 4))}}
RULES = [lj.LoraRule("w", rank=16)]


# ---- builders of valid files --------------------------------------------------------------


def _leaf(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return np.asarray(tree)


def _torch_tensors(params, entries, num_layers):
    """Our tree -> torch state dict (``linear`` leaves transposed)."""
    out = {}
    for e in entries:
        torch = lambda w, e=e: np.ascontiguousarray(w.T if e.layout == "linear" else w)  # noqa: E731
        if e.stacked:
            for i in range(num_layers):
                out[e.key.format(layer=i)] = torch(_leaf(params, e.path)[i])
        elif "{layer}" in e.path:
            for i in range(num_layers):
                out[e.key.format(layer=i)] = torch(_leaf(params, e.path.format(layer=i)))
        else:
            out[e.key] = torch(_leaf(params, e.path))
    return out


def write_bert(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    params = bert.init(jax.random.key(0), BERT_CFG)
    entries = [e for e in bert.PEFT_KEY_MAP.entries if not e.path.startswith("classifier/")]
    save_file(_torch_tensors(params, entries, 2), str(folder / "model.safetensors"))
    config = {k: getattr(BERT_CFG, k) for k in BERT_CFG.__dataclass_fields__}
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    return folder


def write_llama(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    params = llama.init(jax.random.key(0), LLAMA_CFG)
    entries = [e for e in llama.PEFT_KEY_MAP.entries if e.path != "lm_head/kernel"]
    save_file(_torch_tensors(params, entries, 2), str(folder / "model.safetensors"))
    config = {k: getattr(LLAMA_CFG, k) for k in LLAMA_CFG.__dataclass_fields__}
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return folder


def write_gguf(path: pathlib.Path, arch: str = "llama") -> pathlib.Path:
    params = llama.init(jax.random.key(0), LLAMA_CFG)
    entries = [e for e in llama.PEFT_KEY_MAP.entries if e.path != "lm_head/kernel"]
    tensors = _torch_tensors(params, entries, 2)
    names = {v: k for k, v in _gguf.GGUF_NAMES.items()}
    blocks = {v: k for k, v in _gguf.GGUF_BLOCK.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    for key, t in tensors.items():
        if key.startswith("model.layers."):
            _, _, layer, *rest = key.split(".")
            key = f"blk.{layer}.{blocks['.'.join(rest[:-1])]}.weight"
        else:
            key = names[key]
        w.add_tensor(key, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_peft(folder: pathlib.Path, r: int = 2) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_file(
        {
            "base_model.model.fc.lora_A.weight": rng.standard_normal((r, 8), np.float32),
            "base_model.model.fc.lora_B.weight": rng.standard_normal((4, r), np.float32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["fc"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def orbax_pair():
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((256, 128), np.float32))}
    frozen, trainable = lj.split(params, RULES, key=jax.random.key(0))
    t = trainable["w"]
    trainable = {"w": t.with_factors(t.a, jnp.ones_like(t.b))}
    return frozen, trainable


def write_orbax(path: pathlib.Path) -> pathlib.Path:
    frozen, trainable = orbax_pair()
    return lj.save_adapters(path, trainable, rules=RULES, base=frozen, step=3)


# ---- damage -------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that something unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def pickle_bytes(marker) -> bytes:
    return pickle.dumps(Payload(marker), protocol=4)


def torch_zip_bytes(marker, tmp: pathlib.Path) -> bytes:
    """A ``torch.save``-style zip archive whose data.pkl is the payload."""
    z = tmp / "payload.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("archive/data.pkl", pickle_bytes(marker))
    return z.read_bytes()


def _truncate(f: pathlib.Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def _flip(f: pathlib.Path, at: float = 0.5, n: int = 16) -> None:
    data = bytearray(f.read_bytes())
    i = min(int(len(data) * at), len(data) - n)
    data[i : i + n] = bytes(255 - b for b in data[i : i + n])
    f.write_bytes(bytes(data))


def _safetensors_with_header(f: pathlib.Path, edit) -> None:
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def _sparse(f: pathlib.Path, size: int) -> None:
    with open(f, "wb") as h:
        h.truncate(size)


def _json_edit(f: pathlib.Path, edit) -> None:
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))


def _meta_edit(edit):
    return lambda c: _json_edit(c / "meta" / "metadata", edit)


def _orbax_data_file(c: pathlib.Path) -> pathlib.Path:
    files = [f for f in (c / "arrays").rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=lambda f: f.stat().st_size)


def _set(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


# ---- the catalogue of broken files ---------------------------------------------------------

PEFT_DAMAGE = {
    "truncated": (lambda d: _truncate(d / "adapter_model.safetensors"), r"truncated"),
    "flipped-header": (lambda d: _flip(d / "adapter_model.safetensors", 0.02, 4), r"safetensors"),
    "header-claims-terabytes": (
        lambda d: _safetensors_with_header(
            d / "adapter_model.safetensors",
            lambda h: _set(h, ["base_model.model.fc.lora_A.weight", "shape"], [2**20, 2**20]),
        ),
        r"declares shape \(1048576, 1048576\) F32 .* truncated",
    ),
    "header-length-terabytes": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(
            struct.pack("<Q", 2**42) + (d / "adapter_model.safetensors").read_bytes()[8:]
        ),
        r"header claims 4398046511104 bytes but the file has \d+ bytes",
    ),
    "wrong-shape": (
        lambda d: save_file(
            {
                "base_model.model.fc.lora_A.weight": np.ones((2, 7), np.float32),
                "base_model.model.fc.lora_B.weight": np.ones((4, 2), np.float32),
            },
            str(d / "adapter_model.safetensors"),
        ),
        r"\(2, 7\) and .*\(4, 2\) do not fit the base weight 'fc/kernel' of shape \(8, 4\)",
    ),
    "int-dtype": (
        lambda d: save_file(
            {
                "base_model.model.fc.lora_A.weight": np.ones((2, 8), np.int32),
                "base_model.model.fc.lora_B.weight": np.ones((4, 2), np.int32),
            },
            str(d / "adapter_model.safetensors"),
        ),
        r"'base_model.model.fc.lora_A.weight' has dtype I32; adapter tensors are floating",
    ),
    "nan-values": (
        lambda d: save_file(
            {
                "base_model.model.fc.lora_A.weight": np.full((2, 8), np.nan, np.float32),
                "base_model.model.fc.lora_B.weight": np.ones((4, 2), np.float32),
            },
            str(d / "adapter_model.safetensors"),
        ),
        r"lora_A.weight' \(2, 8\) holds 16 NaN/Inf",
    ),
    "config-r-disagrees": (
        lambda d: _json_edit(d / "adapter_config.json", lambda c: c.update(r=4)),
        r"'base_model.model.fc.lora_A.weight' has shape \(2, 8\); r=4 in adapter_config.json",
    ),
    "config-alpha-string": (
        lambda d: _json_edit(d / "adapter_config.json", lambda c: c.update(lora_alpha="8")),
        r"lora_alpha='8' must be a finite number > 0",
    ),
    "config-alpha-nan": (
        lambda d: (d / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}'
        ),
        r"lora_alpha=nan must be a finite number > 0",
    ),
    "config-r-zero": (
        lambda d: _json_edit(d / "adapter_config.json", lambda c: c.update(r=0)),
        r"r=0 must be a positive int",
    ),
    "config-rank-pattern-bad": (
        lambda d: _json_edit(
            d / "adapter_config.json", lambda c: c.update(rank_pattern={"fc": -1})
        ),
        r"rank_pattern must map module names to positive ints",
    ),
    "extra-key": (
        lambda d: save_file(
            {
                "base_model.model.fc.lora_A.weight": np.ones((2, 8), np.float32),
                "base_model.model.fc.lora_B.weight": np.ones((4, 2), np.float32),
                "base_model.model.other.lora_A.weight": np.ones((2, 8), np.float32),
            },
            str(d / "adapter_model.safetensors"),
        ),
        r"1 tensor\(s\) in adapter_model.safetensors map to no leaf .*other.lora_A",
    ),
    "missing-b": (
        lambda d: save_file(
            {"base_model.model.fc.lora_A.weight": np.ones((2, 8), np.float32)},
            str(d / "adapter_model.safetensors"),
        ),
        r"has 'base_model.model.fc.lora_A.weight' but no 'base_model.model.fc.lora_B.weight'",
    ),
    "no-tensors": (
        lambda d: save_file({}, str(d / "adapter_model.safetensors")),
        r"has no tensor for any leaf of frozen \(0 tensors",
    ),
    "config-not-utf8": (
        lambda d: (d / "adapter_config.json").write_bytes(b'{"peft_type": "\xff\xfe"}'),
        r"adapter_config.json is not UTF-8 text \(byte 15",
    ),
    "config-deep-json": (
        lambda d: (d / "adapter_config.json").write_text(_deep_json()),
        r"nests JSON more than 64 levels deep",
    ),
    "config-list": (
        lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
        r"holds a JSON list, but a PEFT adapter_config.json is a JSON object",
    ),
    "config-huge": (
        lambda d: _sparse(d / "adapter_config.json", 65 << 20),
        r"adapter_config.json is 68157440 bytes, more than the 67108864 allowed",
    ),
    "config-missing": (
        lambda d: (d / "adapter_config.json").unlink(),
        r"adapter_config.json does not exist",
    ),
}

BERT_DAMAGE = {
    "truncated": (lambda d: _truncate(d / "model.safetensors"), r"model.safetensors.*truncated"),
    "header-claims-terabytes": (
        lambda d: _safetensors_with_header(
            d / "model.safetensors",
            lambda h: _set(h, ["embeddings.word_embeddings.weight", "shape"], [2**21, 2**20]),
        ),
        r"'embeddings.word_embeddings.weight' declares shape \(2097152, 1048576\)",
    ),
    "int-weights": (
        lambda d: save_file(
            {
                k: np.ones(v.shape, np.int32)
                for k, v in _torch_tensors(
                    bert.init(jax.random.key(0), BERT_CFG),
                    [e for e in bert.PEFT_KEY_MAP.entries if not e.path.startswith("classifier")],
                    2,
                ).items()
            },
            str(d / "model.safetensors"),
        ),
        r"tensor 'embeddings.word_embeddings.weight' has dtype int32; weights must be float",
    ),
    "config-shapes-disagree": (
        lambda d: _json_edit(d / "config.json", lambda c: c.update(intermediate_size=64)),
        r"'encoder/layer_0/intermediate/dense/(kernel|bias)' has shape \((16, )?32,?\) but "
        r"config.json implies \((16, )?64,?\)",
    ),
    "config-missing-size": (
        lambda d: _json_edit(d / "config.json", lambda c: c.pop("hidden_size")),
        r"BERT config.json: hidden_size=None must be a positive int",
    ),
    "config-deep-json": (
        lambda d: (d / "config.json").write_text(_deep_json()),
        r"config.json nests JSON more than 64 levels deep",
    ),
    "config-not-utf8": (
        lambda d: (d / "config.json").write_bytes(b"\xff" * 10),
        r"config.json is not UTF-8 text",
    ),
    "index-path-traversal": (
        lambda d: (
            (d / "model.safetensors").rename(d / "model-1.safetensors"),
            (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"embeddings.word_embeddings.weight": "../../x"}})
            ),
        ),
        r"weight_map must map tensor names to .safetensors file names in the same folder",
    ),
}

ORBAX_DAMAGE = {
    # Refused from the file list before orbax reads (a failed concurrent read in orbax
    # crashed the process later in about 1 load in 8: lora_jax/_src/io/file_manifest.py).
    "truncated-array": (lambda c: _truncate(_orbax_data_file(c)), r"c/arrays/\S+ has \d+ bytes"),
    "flipped-array": (lambda c: _flip(_orbax_data_file(c)), r"c/arrays/\S+ does not match"),
    "meta-absurd-shape": (
        _meta_edit(
            lambda m: (
                _set(m, ["leaves", 0, "arrays", "a", "shape"], [2**30, 2**20]),
                _set(m, ["leaves", 0, "arrays", "b", "shape"], [2**20, 2**20]),
                _set(m, ["base", "leaves", 0, 1], [2**30, 2**20]),
            )
        ),
        r"c/meta: leaf 0 \('w'\) .* a \[1073741824, 1048576\] and b|declares \d+ bytes of arrays",
    ),
    "meta-declares-terabytes": (
        _meta_edit(
            lambda m: (
                _set(m, ["leaves", 0, "arrays", "a", "shape"], [2**24, 2**20]),
                _set(m, ["leaves", 0, "arrays", "b", "shape"], [2**20, 2**20]),
            )
        ),
        r"c/meta declares \d+ bytes of arrays, more than this machine's \d+ bytes of memory",
    ),
    "meta-wrong-shape": (
        _meta_edit(lambda m: _set(m, ["leaves", 0, "arrays", "a", "shape"], [256, 5])),
        r"c/meta: leaf 0 \('w'\): a \[256, 5\] and b \[16, 128\] do not fit .* one rank",
    ),
    "meta-int-dtype": (
        _meta_edit(lambda m: _set(m, ["leaves", 0, "arrays", "a", "dtype"], "int32")),
        r"c/meta: leaf 0 \('w'\) a has dtype 'int32', not a float dtype",
    ),
    "meta-missing-leaves": (
        _meta_edit(lambda m: m.pop("leaves")),
        r"c/meta: 'leaves' is NoneType, not a list",
    ),
    "meta-extra-leaf": (
        _meta_edit(lambda m: m["leaves"].append({"path": "extra", "kind": "none"})),
        r"the tree structure has another number of leaves than 'leaves' \(2\)",
    ),
    "meta-bad-kind": (
        _meta_edit(lambda m: _set(m, ["leaves", 0, "kind"], "pickle")),
        r"leaf 0 \('w'\) has kind 'pickle', not 'none', 'factors' or 'array'",
    ),
    "meta-newer-format": (
        _meta_edit(lambda m: m.update(format_version=99)),
        r"format_version 99 is not one this lora_jax reads",
    ),
    "meta-not-utf8": (
        lambda c: (c / "meta" / "metadata").write_bytes(b'{"format": "\xff"}'),
        r"cannot read adapter checkpoint metadata in .*c/meta",
    ),
    "meta-deep-json": (
        lambda c: (c / "meta" / "metadata").write_text(_deep_json()),
        r"cannot read adapter checkpoint metadata in .*c/meta",
    ),
    "meta-huge": (
        lambda c: _sparse(c / "meta" / "metadata", 65 << 20),
        r"c/meta holds \d+ bytes, more than the 67108864 allowed",
    ),
    "arrays-missing": (
        lambda c: shutil.rmtree(c / "arrays"),
        r"c/arrays/\S+ is missing",
    ),
}


@pytest.mark.parametrize("name", list(PEFT_DAMAGE), ids=list(PEFT_DAMAGE))
def test_broken_peft_folder_is_refused(tmp_path, name):
    damage, match = PEFT_DAMAGE[name]
    folder = write_peft(tmp_path / "adapter")
    damage(folder)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            lj.peft.load_pretrained(folder, PEFT_BASE, key_map=PEFT_MAP)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # refused before any large allocation


@pytest.mark.parametrize("name", list(BERT_DAMAGE), ids=list(BERT_DAMAGE))
def test_broken_hf_folder_is_refused(tmp_path, name):
    damage, match = BERT_DAMAGE[name]
    folder = write_bert(tmp_path / "bert")
    damage(folder)
    with pytest.raises(ValueError, match=match):
        bert.load(folder)


@pytest.mark.parametrize("name", list(ORBAX_DAMAGE), ids=list(ORBAX_DAMAGE))
def test_broken_orbax_checkpoint_is_refused(tmp_path, name):
    damage, match = ORBAX_DAMAGE[name]
    c = write_orbax(tmp_path / "c")
    damage(c)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            lj.load_adapters(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


GGUF_DAMAGE = {
    "truncated": (lambda f: _truncate(f), r"tiny.gguf is not a readable GGUF file"),
    "bad-magic": (lambda f: f.write_bytes(b"GGML" + f.read_bytes()[4:]), r"not b'GGUF'"),
    "tensor-count-huge": (
        lambda f: f.write_bytes(
            f.read_bytes()[:8] + struct.pack("<Q", 2**40) + f.read_bytes()[16:]
        ),
        r"tiny.gguf is not a readable GGUF file",
    ),
    "other-arch": (lambda f: write_gguf(f, arch="gpt2"), r"architecture is 'gpt2'"),
}


@pytest.mark.parametrize("name", list(GGUF_DAMAGE), ids=list(GGUF_DAMAGE))
def test_broken_gguf_is_refused(tmp_path, name):
    damage, match = GGUF_DAMAGE[name]
    f = write_gguf(tmp_path / "tiny.gguf")
    damage(f)
    with pytest.raises(ValueError, match=match):
        llama.load_gguf(f)


def test_valid_files_load(tmp_path):
    """The builders make files the loaders accept (so the damage tests test the damage)."""
    assert lj.peft.load_pretrained(write_peft(tmp_path / "p"), PEFT_BASE, key_map=PEFT_MAP)
    assert bert.load(write_bert(tmp_path / "b"))[1] == BERT_CFG
    assert llama.load(write_llama(tmp_path / "l"))[1] == LLAMA_CFG
    params, config = llama.load_gguf(write_gguf(tmp_path / "tiny.gguf"))
    assert config.num_hidden_layers == 2 and params["embed_tokens"]["embedding"].shape == (32, 16)
    frozen, trainable = orbax_pair()
    back = lj.load_adapters(write_orbax(tmp_path / "c"), base=frozen)
    np.testing.assert_array_equal(back["w"].b, trainable["w"].b)


# ---- pickles: refused, never executed ----------------------------------------------------


def _plant(tmp_path, kind):
    """Write the payload where a loader looks; returns (marker, load thunk)."""
    marker = tmp_path / "PWNED"
    blob = pickle_bytes(marker) if kind != "zip" else torch_zip_bytes(marker, tmp_path)
    if kind in ("pickle", "zip"):
        folder = write_peft(tmp_path / "p")
        (folder / "adapter_model.safetensors").write_bytes(blob)
        load = lambda: lj.peft.load_pretrained(folder, PEFT_BASE, key_map=PEFT_MAP)  # noqa: E731
    elif kind == "bin-only":
        folder = write_peft(tmp_path / "p")
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(blob)
        load = lambda: lj.peft.load_pretrained(folder, PEFT_BASE, key_map=PEFT_MAP)  # noqa: E731
    elif kind == "model":
        folder = write_bert(tmp_path / "b")
        (folder / "model.safetensors").write_bytes(blob)
        load = lambda: bert.load(folder)  # noqa: E731
    elif kind == "gguf":
        f = tmp_path / "m.gguf"
        f.write_bytes(blob)
        load = lambda: llama.load_gguf(f)  # noqa: E731
    elif kind == "orbax-meta":
        c = write_orbax(tmp_path / "c")
        (c / "meta" / "metadata").write_bytes(blob)
        load = lambda: lj.load_adapters(c)  # noqa: E731
    else:  # orbax-array
        c = write_orbax(tmp_path / "c")
        _orbax_data_file(c).write_bytes(blob)
        load = lambda: lj.load_adapters(c)  # noqa: E731
    return marker, load


PICKLE_PLACES = {
    "pickle-as-safetensors": ("pickle", r"is a pickle file .* lora_jax never unpickles"),
    "zip-as-safetensors": ("zip", r"is a zip file \(torch.save archive\)"),
    "bin-only": (
        "bin-only",
        r"has adapter_model.bin \(a pickle\) but no adapter_model.safetensors",
    ),
    "pickle-as-model": ("model", r"model.safetensors is a pickle file"),
    "pickle-as-gguf": ("gguf", r"m.gguf is a pickle file"),
    "pickle-as-orbax-meta": ("orbax-meta", r"cannot read adapter checkpoint metadata"),
    "pickle-as-orbax-array": ("orbax-array", r"c/arrays"),
}


def test_payload_is_live(tmp_path):
    """Sanity: unpickling the payload does create the marker."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle_bytes(marker))
    assert marker.exists()


@pytest.mark.parametrize("place", list(PICKLE_PLACES), ids=list(PICKLE_PLACES))
def test_pickle_is_refused_and_never_run(tmp_path, place):
    kind, match = PICKLE_PLACES[place]
    marker, load = _plant(tmp_path, kind)
    with pytest.raises(ValueError, match=match):
        load()
    assert not marker.exists()


def test_bin_beside_safetensors_is_ignored(tmp_path):
    folder = write_peft(tmp_path / "p")
    marker = tmp_path / "PWNED"
    (folder / "adapter_model.bin").write_bytes(pickle_bytes(marker))
    t = lj.peft.load_pretrained(folder, PEFT_BASE, key_map=PEFT_MAP)
    assert t["fc"]["kernel"].a.shape == (8, 2)
    assert not marker.exists()


# ---- fuzzing: mutated bytes of valid files -------------------------------------------------

HANG_S = 20
FUZZ_STATS: dict[str, dict[str, int]] = {}


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _clean(e: BaseException, where: str) -> bool:
    """A refusal we raise on purpose: ValueError (or the GGUF/HF KeyErrors) naming the file."""
    msg = str(e)
    if isinstance(e, ValueError):
        return where in msg or "adapter" in msg or "config.json" in msg
    return isinstance(e, KeyError) and ("GGUF metadata has no" in msg or "has no tensor" in msg)


def _classify(target: str, load, where: str) -> None:
    stats = FUZZ_STATS.setdefault(target, dict(tried=0, refused=0, loaded=0, crashed=0, hung=0))
    stats["tried"] += 1
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        load()
        stats["loaded"] += 1
    except _Hang:
        stats["hung"] += 1
    except Exception as e:  # noqa: BLE001 -- classifying every exception is the point
        if _clean(e, where):
            stats["refused"] += 1
        else:
            stats["crashed"] += 1
            stats.setdefault("examples", []).append(f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "set":
            buf[i] = value
        elif kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "insert":
            buf[i:i] = bytes([value]) * (1 + value % 16)
        else:  # truncate
            del buf[i:]
    return bytes(buf)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["set", "flip", "insert", "truncate"]),
        st.integers(0, 2**31),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {
        "peft": write_peft(root / "peft"),
        "bert": write_bert(root / "bert"),
        "gguf": write_gguf(root / "tiny.gguf"),
        "orbax": write_orbax(root / "c"),
    }


def _fresh(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _pick(folder: pathlib.Path, index: int) -> pathlib.Path:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return files[index % len(files)]


@pytest.mark.slow
def test_fuzz_loaders(pristine, tmp_path):
    _, trainable = orbax_pair()
    work = tmp_path / "work"

    @FUZZ
    @given(
        target=st.sampled_from(["peft", "bert", "gguf", "orbax"]), index=st.integers(0, 99), ops=OPS
    )
    def run(target, index, ops):
        path = _fresh(pristine[target], work / pristine[target].name)
        f = path if path.is_file() else _pick(path, index)
        f.write_bytes(_mutate(f.read_bytes(), ops))
        if target == "peft":
            load = lambda: lj.peft.load_pretrained(path, PEFT_BASE, key_map=PEFT_MAP)  # noqa: E731
        elif target == "bert":
            load = lambda: bert.load(path)  # noqa: E731
        elif target == "gguf":
            load = lambda: llama.load_gguf(path)  # noqa: E731
        else:

            def load():
                back = lj.load_adapters(path)
                # Arrays are digest-checked: whatever loads must be the saved bytes.
                np.testing.assert_array_equal(back["w"].a, trainable["w"].a)
                np.testing.assert_array_equal(back["w"].b, trainable["w"].b)

        _classify(target, load, str(path))

    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    total = {k: sum(s[k] for s in FUZZ_STATS.values()) for k in ("tried", "crashed", "hung")}
    print(f"\nfuzz: {json.dumps(FUZZ_STATS, indent=1)}\ntotal {total} in {seconds:.1f} s")
    assert total["tried"] >= 50
    assert total["crashed"] == 0, FUZZ_STATS
    assert total["hung"] == 0, FUZZ_STATS
