"""Defensive reading of files that may be truncated, corrupted or hostile.

Every reader here validates sizes and structure *before* it allocates or parses more
than the file can hold, and never unpickles: a pickle (or ``torch.save`` zip) where an
adapter or model should be is refused by its magic bytes. Failures raise
:class:`ValueError` naming the file, what was found and what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Collection
from typing import Any

import numpy as np

MAX_JSON_BYTES = 64 << 20  # configs and checkpoint metadata are kilobytes to a few megabytes
MAX_JSON_DEPTH = 64  # legitimate configs nest 3 or 4 levels
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
# safetensors dtype names and their item sizes in bytes.
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_PICKLE_PROTOCOLS = range(2, 6)


def sniff(head: bytes) -> str | None:
    """What a file whose first bytes are ``head`` is, if it is a format we refuse or expect.

    Returns ``"pickle"`` (``pickle`` protocol 2 to 5), ``"zip"`` (``torch.save``'s
    archive, which holds a pickle), ``"gguf"``, or None.
    """
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:4] == b"GGUF":
        return "gguf"
    return None


def refuse_pickle(path: str | os.PathLike, head: bytes, what: str) -> None:
    kind = sniff(head)
    if kind in ("pickle", "zip"):
        raise ValueError(
            f"{path} is a {kind} file ({'torch.save archive' if kind == 'zip' else 'pickle'}), "
            f"not {what}; lora_jax never unpickles (it can run arbitrary code). Convert it "
            f"with safetensors (e.g. PEFT's save_pretrained(safe_serialization=True))."
        )


def _depth(x: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping at ``limit + 1``."""
    stack, deepest = [(x, 1)], 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def parse_json(data: bytes, where: str) -> Any:
    """JSON from bytes: UTF-8, at most :data:`MAX_JSON_DEPTH` levels, a clear error else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where} is not UTF-8 text (byte {e.start} is {data[e.start : e.start + 1]!r}); "
            f"the file is corrupted or not JSON."
        ) from None
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); the file is corrupted.") from None
    else:
        depth = _depth(value, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(
            f"{where} nests JSON more than {MAX_JSON_DEPTH} levels deep; refusing it as "
            f"corrupted or hostile."
        )
    return value


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path`` (size-capped, UTF-8, depth-capped), never anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist or is not a file; expected {what}.")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ValueError(
            f"{path} is {size} bytes, more than the {MAX_JSON_BYTES} allowed for {what}; "
            f"refusing it as corrupted or hostile."
        )
    with open(path, "rb") as f:
        data = f.read(size)
    refuse_pickle(path, data[:4], what)
    value = parse_json(data, path)
    if not isinstance(value, dict):
        raise ValueError(
            f"{path} holds a JSON {type(value).__name__}, but {what} is a JSON object ({{...}})."
        )
    return value


def memory_bytes() -> int:
    """Physical memory of this machine in bytes (a bound no single load may exceed)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return 1 << 62


def check_declared_bytes(nbytes: int, where: str) -> None:
    if nbytes > memory_bytes():
        raise ValueError(
            f"{where} declares {nbytes} bytes of arrays, more than this machine's "
            f"{memory_bytes()} bytes of memory; refusing it as corrupted or hostile."
        )


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"{where}: shape {shape!r} is not a list of ints >= 0; corrupted file.")
    return tuple(shape)


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The validated header of a safetensors file: ``{name: {dtype, shape, data_offsets}}``.

    Checks, before reading any tensor: the file is not a pickle; the declared header fits
    the file; every tensor has a known dtype, a shape whose byte size equals its offsets,
    and lies inside the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist or is not a file; expected a .safetensors file.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        # A header length of 0x0280..0x0580 bytes starts with a pickle's b"\x80\x02".."\x05";
        # a real header's JSON starts right after the 8 length bytes.
        if head[8:9] != b"{":
            refuse_pickle(path, head, "a safetensors file")
        head = head[:8]
        if len(head) < 8:
            raise ValueError(
                f"{path} is {size} bytes: too short for a safetensors header; the file is "
                f"truncated."
            )
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(
                f"{path}: the header claims {n} bytes but the file has {size} bytes; it is "
                f"truncated or not a safetensors file."
            )
        f.seek(8)
        raw = f.read(n)
    header = parse_json(raw, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; corrupted file.")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where} has header entry {info!r}; corrupted file.")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{where} has dtype {info['dtype']!r}, not one of {sorted(SAFETENSORS_DTYPES)}."
            )
        shape = check_shape(info["shape"], where)
        offsets = info["data_offsets"]
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{where} has data_offsets {offsets!r}; corrupted file.")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]]
        if offsets[1] - offsets[0] != nbytes or offsets[1] > data_size:
            raise ValueError(
                f"{where} declares shape {shape} {info['dtype']} ({nbytes} bytes) at offsets "
                f"{offsets}, but the data section has {data_size} bytes; the file is truncated "
                f"or corrupted."
            )
        tensors[name] = info
    return tensors


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays, after :func:`safetensors_header`."""
    from safetensors.numpy import load_file

    safetensors_header(path)
    try:
        return load_file(os.fspath(path))
    except Exception as e:  # the Rust reader raises SafetensorError for malformed files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-export it.") from e


def check_float_tensor(x: np.ndarray, where: str) -> None:
    """Refuse a tensor that is not floating point or holds NaN/Inf."""
    kind = np.dtype(x.dtype)
    if not (np.issubdtype(kind, np.floating) or kind.name == "bfloat16"):
        raise ValueError(
            f"{where} has dtype {kind.name}; weights must be float16/bfloat16/float32/float64. "
            f"The file is corrupted or not a weight file."
        )
    if not np.isfinite(np.asarray(x, np.float32)).all():
        bad = int(np.size(x) - np.isfinite(np.asarray(x, np.float32)).sum())
        raise ValueError(
            f"{where} {tuple(x.shape)} holds {bad} NaN/Inf value(s); the file is corrupted "
            f"or the weights diverged. Use another checkpoint."
        )


def open_gguf(path: str | os.PathLike) -> Any:
    """``gguf.GGUFReader(path)`` after checking the magic; any parse error is a ValueError."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist or is not a file; expected a .gguf file.")
    with open(path, "rb") as f:
        head = f.read(4)
    refuse_pickle(path, head, "a GGUF file")
    if sniff(head) != "gguf":
        raise ValueError(f"{path} starts with {head!r}, not b'GGUF'; it is not a GGUF file.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors...
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from e


def adapter_tensors(directory: str | os.PathLike, weights_name: str) -> dict[str, np.ndarray]:
    """The float, finite tensors of a PEFT adapter folder's safetensors file.

    An ``adapter_model.bin`` (pickle) is never read: alone it is refused, beside the
    safetensors file it is ignored.
    """
    path = os.path.join(directory, weights_name)
    if not os.path.isfile(path):
        pickled = [
            n
            for n in ("adapter_model.bin", "adapter_model.pt")
            if os.path.isfile(os.path.join(directory, n))
        ]
        if pickled:
            raise ValueError(
                f"{directory} has {pickled[0]} (a pickle) but no {weights_name}; lora_jax never "
                f"unpickles. Re-save the adapter with PEFT's save_pretrained(dir, "
                f"safe_serialization=True)."
            )
        raise ValueError(f"{path} does not exist; pass a folder written by save_pretrained.")
    header = safetensors_header(path)
    for name, info in header.items():
        if info["dtype"] not in FLOAT_DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}; adapter tensors are "
                f"floating point ({', '.join(FLOAT_DTYPES)}). The file is not a LoRA adapter."
            )
    tensors = load_safetensors(path)
    for name, x in tensors.items():
        check_float_tensor(x, f"{path}: tensor {name!r}")
    return tensors


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_peft_config(config: dict, path: str, skip: Collection[str] = ()) -> None:
    """Refuse a LoRA ``adapter_config.json`` whose fields have the wrong type or range.

    ``skip``: fields a variant switched on by this config checks itself (AdaLoRA's rank).
    """
    checks = [
        ("r", _is_rank(config.get("r")), "a positive int"),
        (
            "lora_alpha",
            _is_number(config.get("lora_alpha")) and config["lora_alpha"] > 0,
            "a finite number > 0",
        ),
        (
            "lora_dropout",
            _is_number(config.get("lora_dropout", 0.0))
            and 0 <= config.get("lora_dropout", 0.0) < 1,
            "a number in [0, 1)",
        ),
    ]
    for name in ("use_rslora", "fan_in_fan_out"):
        checks.append((name, isinstance(config.get(name, False), bool), "true or false"))
    for name, ok, want in checks:
        if not ok and name not in skip:
            raise ValueError(
                f"{path}: {name}={config.get(name)!r} must be {want}; fix the config or re-save "
                f"the adapter."
            )
    for name, valid, want in (
        ("rank_pattern", _is_rank, "positive ints"),
        ("alpha_pattern", lambda v: _is_number(v) and v > 0, "finite numbers > 0"),
    ):
        if name in skip:
            continue
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and valid(v) for k, v in pattern.items()
        ):
            raise ValueError(
                f"{path}: {name} must map module names to {want}, got {str(pattern)[:120]}; "
                f"fix the config or re-save the adapter."
            )
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(
                    f"{path}: {name} key {key!r} is not a valid regex ({e})."
                ) from None
