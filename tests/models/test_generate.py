"""KV-cache generation: equal to recomputing the whole context, compiled once, reproducible."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import generate as gen
from lora_jax.models import llama

CFG = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
RULES = [lj.LoraRule(r"layers/.*/kernel", rank=4, stack_axes=(0,))]
NEW = 6
# Rows of different lengths, left-padded to 4 (0 marks padding).
PROMPTS = [[5, 6], [7, 8, 9, 10], [11, 12, 13]]


def _padded(rows):
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def base():
    # Weights 5x the init scale spread the logits, so argmax ties cannot hide a bug.
    params = llama.init(jax.random.key(0), CFG)
    return jax.tree.map(lambda x: 5 * x if x.ndim > 1 else x, params)


def _adapter(frozen_params, seed):
    """A trainable tree with non-zero B (a fresh split has B = 0: no effect to test)."""
    _, trainable = lj.split(frozen_params, RULES, key=jax.random.key(seed))

    def nonzero(t):
        if not isinstance(t, lj.LoraFactors):
            return t
        b = 0.5 * jax.random.normal(jax.random.key(seed + 100), t.b.shape, t.b.dtype)
        return dataclasses.replace(t, b=b)

    return jax.tree.map(nonzero, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))


@jax.jit
def _full_logits(dense, seq):
    return llama.forward(dense, CFG, seq)


def _recompute_greedy(dense, row, new=NEW):
    """The oracle: the unpadded row, the full forward re-run for every token, argmax.

    The row sits at the start of a fixed buffer (one compilation); causal attention keeps
    the unused tail from reaching position ``t - 1``.
    """
    seq = np.zeros((1, 16), np.int32)
    seq[0, : len(row)] = row
    for t in range(len(row), len(row) + new):
        seq[0, t] = int(jnp.argmax(_full_logits(dense, jnp.asarray(seq))[0, t - 1]))
    return list(seq[0, len(row) : len(row) + new])


def _cases(base):
    frozen, trainable = lj.split(base, RULES, key=jax.random.key(1))
    t1, t2 = _adapter(base, 1), _adapter(base, 2)
    nf4 = lj.quantize(frozen, RULES)
    dense = lj.merge(frozen, t1)
    bank = lj.stack_adapters([t1, t2])
    ids = [2, 0, 1]  # one adapter per row, the base model (slot 0) in the middle
    slot_tree = [lj.merge(frozen, t) for t in (trainable, t1, t2)]
    return {
        "dense": (base, dict(), [base] * 3),
        "unmerged": (frozen, dict(trainable=t1), [dense] * 3),
        "merged": (dense, dict(), [dense] * 3),
        "nf4": (nf4, dict(trainable=t1), [lj.merge(nf4, t1)] * 3),
        "nf4_no_adapter": (nf4, dict(), [lj.merge(nf4, trainable)] * 3),
        "bank": (frozen, dict(trainable=bank, adapter_ids=ids), [slot_tree[i] for i in ids]),
    }


@pytest.mark.parametrize("case", ["dense", "unmerged", "merged", "nf4", "nf4_no_adapter", "bank"])
def test_cached_greedy_equals_full_recompute(base, case):
    params, kw, oracles = _cases(base)[case]
    ids, mask = _padded(PROMPTS)
    out = np.asarray(llama.generate(params, CFG, ids, max_new_tokens=NEW, prompt_mask=mask, **kw))
    assert out.shape == (3, ids.shape[1] + NEW)
    np.testing.assert_array_equal(out[:, : ids.shape[1]], ids)
    for row, prompt, oracle in zip(out, PROMPTS, oracles):
        assert list(row[ids.shape[1] :]) == _recompute_greedy(oracle, prompt)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_forward_cached_prefill_matches_forward(base, jit):
    """The prompt's logits from an empty cache equal the plain forward's (1e-5, float32)."""
    ids = jnp.asarray([[3, 4, 5, 6]])
    cache = gen.init_cache(CFG, 1, 7, jnp.float32)
    pos = jnp.arange(4)[None]
    kv_mask = jnp.arange(7)[None] < 4
    fn = jax.jit(gen.forward_cached, static_argnums=1) if jit else gen.forward_cached
    logits, cache = fn(base, CFG, ids, pos, pos, kv_mask, cache)
    np.testing.assert_allclose(logits, llama.forward(base, CFG, ids), atol=1e-5)
    assert cache.k.shape == (1, 2, 7, 2, 8)
    assert not np.asarray(cache.k[:, :, 4:]).any()  # slots past the prompt untouched


def _count_compiles():
    events = []

    def listener(name, *_, **__):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


def test_decode_compiles_once_per_model_and_never_per_adapter(base):
    frozen, _ = lj.split(base, RULES, key=jax.random.key(1))
    ids, mask = _padded(PROMPTS)
    bank = lj.stack_adapters([_adapter(base, 1), _adapter(base, 2)])
    before = gen._decode._cache_size()
    llama.generate(frozen, CFG, ids, max_new_tokens=5, prompt_mask=mask, trainable=bank,
                   adapter_ids=[1, 2, 0])  # fmt: skip
    assert gen._decode._cache_size() == before + 1  # four decode steps, one compilation
    events = _count_compiles()
    # Other adapters in the bank, other slots per row, a new unmerged adapter: no compilation.
    bank2 = lj.stack_adapters([_adapter(base, 3), _adapter(base, 4)])
    llama.generate(frozen, CFG, ids, max_new_tokens=5, prompt_mask=mask, trainable=bank2,
                   adapter_ids=[0, 0, 2])  # fmt: skip
    assert events == []
    llama.generate(
        frozen, CFG, ids, max_new_tokens=5, prompt_mask=mask, trainable=_adapter(base, 5)
    )
    n = len(events)
    llama.generate(
        frozen, CFG, ids, max_new_tokens=5, prompt_mask=mask, trainable=_adapter(base, 6)
    )
    assert len(events) == n


def test_sampling_reproducible_from_key(base):
    ids, mask = _padded(PROMPTS)
    kw = dict(max_new_tokens=NEW, prompt_mask=mask, temperature=1.0, top_p=0.9)
    a = llama.generate(base, CFG, ids, key=jax.random.key(7), **kw)
    b = llama.generate(base, CFG, ids, key=jax.random.key(7), **kw)
    c = llama.generate(base, CFG, ids, key=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    # A nucleus this small holds only the top token: sampling reduces to greedy.
    tiny = llama.generate(base, CFG, ids, key=jax.random.key(7), **{**kw, "top_p": 1e-6})
    greedy = llama.generate(base, CFG, ids, max_new_tokens=NEW, prompt_mask=mask)
    np.testing.assert_array_equal(tiny, greedy)


def test_top_p_keeps_the_nucleus_with_its_renormalised_probabilities():
    """Probabilities .5 .3 .1 .06 .04, top_p .75: only tokens 0, 1 at 5/8 and 3/8."""
    probs = np.array([0.1, 0.5, 0.04, 0.3, 0.06])  # shuffled: tokens 1 and 3 are the nucleus
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (4000, 1))
    draws = jax.jit(gen._next_token, static_argnames="greedy")(
        logits, jax.random.key(0), jnp.float32(1.0), jnp.float32(0.75), greedy=False
    )
    counts = np.bincount(np.asarray(draws), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1] / 4000 - 0.625) < 0.03  # binomial sd 0.008


def test_generate_errors(base):
    ids, mask = _padded(PROMPTS)
    frozen, trainable = lj.split(base, RULES, key=jax.random.key(1))
    bank = lj.stack_adapters([trainable])
    cases = [
        (dict(prompt_ids=ids[0]), "expected integer token ids"),
        (dict(prompt_ids=ids.astype(np.float32)), "expected integer token ids"),
        (dict(prompt_mask=mask[:, 1:]), "prompt_mask has shape"),
        (dict(prompt_mask=mask[:, ::-1]), "must pad on the left"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be an int"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(temperature=0.5), "needs key=jax.random.key"),
        (dict(params=frozen, trainable=bank), "pass adapter_ids"),
        (dict(params=frozen, trainable=trainable, adapter_ids=[0, 0, 0]), "needs an AdapterBank"),
    ]
    for override, match in cases:
        kw = dict(params=base, prompt_ids=ids, prompt_mask=mask, max_new_tokens=2) | override
        params, prompt = kw.pop("params"), kw.pop("prompt_ids")
        with pytest.raises(ValueError, match=match):
            llama.generate(params, CFG, prompt, **kw)
