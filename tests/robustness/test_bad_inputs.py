"""The bad-input catalogue: every public entry point called with wrong input.

Each :class:`Case` calls one public function with one kind of bad input (wrong type,
shape or dtype, empty tree, NaN/Inf, mismatched structure, rank or block size out of
range) and states the exception and a regex that the message must match: the regex
names the path, shape or dtype involved and the fix. A case with ``core`` set still
gives an unclear error because the fix belongs in a core module; it is an ``xfail``
(strict) naming the change, so it turns into a failure once the change is made.

``python tests/test_bad_inputs.py`` prints the summary table kept in
docs/RELIABILITY.md; ``test_reliability_doc_is_current`` checks it is up to date.
Hypothesis properties then cover the large spaces (shapes, ranks, block sizes).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.models import KeyEntry, KeyMap, bert, llama

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from test_hostile_files import PEFT_BASE, PEFT_MAP, write_bert, write_gguf, write_peft  # noqa: E402

KEY = jax.random.key(0)
PARAMS = {"q": {"kernel": jnp.ones((16, 8))}, "bias": jnp.zeros(8)}
RULES = [lj.LoraRule("q/kernel", rank=2)]
FROZEN, TRAINABLE = lj.split(PARAMS, RULES, key=KEY)
DORA_RULES = [lj.LoraRule("q/kernel", rank=2, dora=True)]
DORA_FROZEN, DORA_TRAINABLE = lj.split(PARAMS, DORA_RULES, key=KEY)
APPLY = lj.lora_apply(lambda p, x: x @ p["q"]["kernel"])
X = jnp.ones((1, 16))
SPECS = {"q": {"kernel": P("data", "model")}, "bias": P()}
GLORA_PARAMS = {"q": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
GLORA_RULES = [lj.LoraRule("q/kernel", rank=2, glora=True)]
GLORA_FROZEN, GLORA_TRAINABLE = lj.split(GLORA_PARAMS, GLORA_RULES, key=KEY)


class Case(NamedTuple):
    fn: str  # the public function
    id: str  # what is wrong
    call: Callable[[pathlib.Path], Any]  # the call, given a fresh temporary directory
    exc: type[BaseException]
    match: str  # the message names the path/shape/dtype and the fix
    core: str = ""  # if set: the core change still needed for a clear error (xfail)


def _other(shape):
    return {"q": {"kernel": jnp.ones(shape)}, "bias": jnp.zeros(8)}


def _save(d, **kw):
    args = dict(trainable=TRAINABLE, rules=RULES, base=FROZEN) | kw
    return lj.save_adapters(d / "c", args.pop("trainable"), **args)


def _saved(d):
    return _save(d)


def _peft_config(d, **fields):
    folder = write_peft(d / "p")
    config = json.loads((folder / "adapter_config.json").read_text()) | fields
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _bert_config(d, **fields):
    folder = write_bert(d / "b")
    config = json.loads((folder / "config.json").read_text()) | fields
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _llama_config(d, **fields):
    folder = d / "l"
    folder.mkdir()
    config = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    (folder / "config.json").write_text(json.dumps(config | fields))
    return folder


S = "q/kernel"
CASES = [
    # ---- LoraRule ------------------------------------------------------------------------
    Case("LoraRule", "rank-str", lambda d: lj.LoraRule(S, rank="8"), TypeError,
         r"LoraRule\('q/kernel'\): rank must be a positive int, got '8'"),
    Case("LoraRule", "rank-float", lambda d: lj.LoraRule(S, rank=2.0), TypeError,
         r"rank must be a positive int, got 2.0"),
    Case("LoraRule", "rank-bool", lambda d: lj.LoraRule(S, rank=True), TypeError,
         r"rank must be a positive int, got True"),
    Case("LoraRule", "rank-zero", lambda d: lj.LoraRule(S, rank=0), ValueError,
         r"rank=0 must be positive; use rank >= 1"),
    Case("LoraRule", "rank-missing", lambda d: lj.LoraRule(S), TypeError,
         r"rank must be a positive int, got None"),
    Case("LoraRule", "pattern-int", lambda d: lj.LoraRule(3, rank=2), TypeError,
         r"pattern must be a str regex, got <class 'int'>"),
    Case("LoraRule", "pattern-bad-regex", lambda d: lj.LoraRule("q/(kernel", rank=2), ValueError,
         r"LoraRule\('q/\(kernel'\): invalid regex .*escape special characters"),
    Case("LoraRule", "alpha-nan", lambda d: lj.LoraRule(S, rank=2, alpha=float("nan")), ValueError,
         r"alpha=nan must be a finite number > 0 \(default 2 \* rank = 4\)"),
    Case("LoraRule", "alpha-zero", lambda d: lj.LoraRule(S, rank=2, alpha=0), ValueError,
         r"alpha=0 must be a finite number > 0"),
    Case("LoraRule", "alpha-str", lambda d: lj.LoraRule(S, rank=2, alpha="16"), ValueError,
         r"alpha='16' must be a finite number > 0"),
    Case("LoraRule", "param-dtype-int", lambda d: lj.LoraRule(S, rank=2, param_dtype=jnp.int32),
         ValueError, r"param_dtype=.*int32.* must be a float dtype"),
    Case("LoraRule", "param-dtype-unknown", lambda d: lj.LoraRule(S, rank=2, param_dtype="f77"),
         (TypeError, ValueError), r"LoraRule\('q/kernel'\): param_dtype='f77' .*float dtype"),
    Case("LoraRule", "in-axes-str", lambda d: lj.LoraRule(S, rank=2, in_axes="0"), TypeError,
         r"in_axes must be a tuple of ints, got '0'"),
    Case("LoraRule", "dropout-one", lambda d: lj.LoraRule(S, rank=2, dropout=1.0), ValueError,
         r"dropout=1.0 must be in \[0, 1\)"),
    Case("LoraRule", "dropout-nan", lambda d: lj.LoraRule(S, rank=2, dropout=float("nan")),
         ValueError, r"dropout=nan must be in \[0, 1\)"),
    Case("LoraRule", "init-unknown", lambda d: lj.LoraRule(S, rank=2, init="xavier"), ValueError,
         r"init='xavier' is not one of \('gaussian', 'kaiming'"),
    Case("LoraRule", "full-with-rank", lambda d: lj.LoraRule(S, rank=2, full=True), ValueError,
         r"full=True trains the leaf fully; drop rank/alpha"),
    Case("LoraRule", "dora-and-adalora", lambda d: lj.LoraRule(S, rank=2, dora=True, adalora=True),
         ValueError, r"dora and adalora cannot be combined; pick one"),
    Case("LoraRule", "glora-str", lambda d: lj.LoraRule(S, rank=2, glora="yes"), TypeError,
         r"glora must be True, False or lj.Glora\(...\), got 'yes'"),
    Case("LoraRule", "glora-and-dora", lambda d: lj.LoraRule(S, rank=2, glora=True, dora=True),
         ValueError, r"dora and glora cannot be combined; pick one"),
    Case("LoraRule", "glora-pissa", lambda d: lj.LoraRule(S, rank=2, glora=True, init="pissa"),
         ValueError, r"glora starts every support tensor at zero; init='pissa' would replace"),
    Case("Glora", "form-unknown", lambda d: lj.Glora(a="diag"), ValueError,
         r"Glora\(a='diag'\): a must be one of \('lowrank', 'vector', 'scalar', 'none'\)"),
    Case("Glora", "bias-form-lowrank", lambda d: lj.Glora(d="lowrank"), ValueError,
         r"Glora\(d='lowrank'\): d must be one of \('vector', 'scalar', 'none', 'auto'\)"),
    Case("Glora", "bias-key-path", lambda d: lj.Glora(bias="q/bias"), ValueError,
         r"Glora\(bias='q/bias'\) must be the bias leaf's key, e.g. 'bias'"),
    # ---- split --------------------------------------------------------------------------
    Case("split", "glora-bias-terms-no-bias", lambda d: lj.split(
         {"q": {"kernel": jnp.ones((16, 8))}}, [lj.LoraRule(S, rank=2, glora=lj.Glora(e="vector"))],
         key=KEY), ValueError, r"'q/kernel': GLoRA's C, D and E are bias terms but there is no "
         r"'bias' leaf .* use lj.Glora\(c='none', d='none', e='none'\)"),
    Case("split", "glora-bias-shape", lambda d: lj.split(
         {"q": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(16)}}, GLORA_RULES, key=KEY),
         ValueError, r"'q/kernel': its bias 'q/bias' has shape \(16,\) but GLoRA needs the "
         r"weight's stacked output shape \(8,\); set lj.Glora\(bias=...\)"),
    Case("split", "glora-bias-trained", lambda d: lj.split(GLORA_PARAMS, GLORA_RULES + [
         lj.LoraRule("q/bias", full=True)], key=KEY), ValueError,
         r"'q/kernel': GLoRA's bias terms adapt 'q/bias', but rule 'q/bias' also targets it"),
    Case("split", "empty-tree", lambda d: lj.split({}, RULES, key=KEY), ValueError,
         r"params is an empty tree; nothing to adapt"),
    Case("split", "params-none", lambda d: lj.split(None, RULES, key=KEY), ValueError,
         r"params is an empty tree|params is None"),
    Case("split", "rules-str", lambda d: lj.split(PARAMS, S, key=KEY), TypeError,
         r"rules must be LoraRule instances, got str"),
    Case("split", "rules-empty", lambda d: lj.split(PARAMS, [], key=KEY), ValueError,
         r"no parameter is adapted or trained; every leaf would be frozen"),
    Case("split", "rule-matches-nothing", lambda d: lj.split(PARAMS, [lj.LoraRule("k", rank=1)],
         key=KEY), ValueError, r"\['k'\] matched no parameter .* such as 'bias', 'q/kernel'.*fix"),
    Case("split", "key-int", lambda d: lj.split(PARAMS, RULES, key=0), TypeError,
         r"split: key=0 .*jax.random.key"),
    Case("split", "key-none", lambda d: lj.split(PARAMS, RULES, key=None), TypeError,
         r"split: key=None .*jax.random.key"),
    Case("split", "target-1d", lambda d: lj.split(PARAMS, [lj.LoraRule("bias", rank=1)], key=KEY),
         ValueError, r"'bias' has shape \(8,\): LoRA needs a weight of at least 2 dims; use "
         r"LoraRule\(\.\.\., full=True\)"),
    Case("split", "rank-too-big", lambda d: lj.split(PARAMS, [lj.LoraRule(S, rank=9)], key=KEY),
         ValueError, r"rank=9 is larger than min\(in, out\)=min\(16, 8\) for 'q/kernel' with "
         r"shape \(16, 8\).*lower rank"),
    Case("split", "zero-size-dim", lambda d: lj.split(_other((0, 8)), RULES, key=KEY), ValueError,
         r"rank=2 is larger than min\(in, out\)=min\(0, 8\) for 'q/kernel' with shape \(0, 8\)"),
    Case("split", "int-dtype", lambda d: lj.split(_other((16, 8)) | {"q": {"kernel": jnp.ones(
         (16, 8), jnp.int32)}}, RULES, key=KEY), TypeError,
         r"'q/kernel' has dtype int32 but rule 'q/kernel' targets it; .*Narrow the pattern"),
    Case("split", "list-leaf", lambda d: lj.split({"q": {"kernel": [[1.0, 2.0]]}},
         [lj.LoraRule("q/kernel/.*", rank=1)], key=KEY), TypeError,
         r"'q/kernel/0/0' is a float, not an array"),
    Case("split", "stack-axes-out-of-range", lambda d: lj.split(PARAMS, [lj.LoraRule(
         S, rank=2, stack_axes=(5,))], key=KEY), ValueError,
         r"'q/kernel': stack=\(5,\) has axis 5 out of range for 2 dims"),
    Case("split", "in-axes-cover-all", lambda d: lj.split(PARAMS, [lj.LoraRule(
         S, rank=2, in_axes=(0, 1))], key=KEY), ValueError,
         r"'q/kernel' with shape \(16, 8\): in_axes=\(0, 1\) leave no output axis"),
    Case("split", "3d-ambiguous", lambda d: lj.split({"w": jnp.ones((2, 4, 4))},
         [lj.LoraRule("w", rank=1)], key=KEY), ValueError,
         r"'w' has shape \(2, 4, 4\) .* ambiguous. Set LoraRule\(in_axes=\.\.\., stack_axes"),
    Case("split", "quantised-full", lambda d: lj.split({"w": lj.quantize_nf4(jnp.ones((64, 64)))},
         [lj.LoraRule("w", full=True)], key=KEY), TypeError,
         r"'w' is quantised and cannot be trained fully"),
    Case("split", "quantised-pissa", lambda d: lj.split({"w": lj.quantize_nf4(jnp.ones((64, 64)))},
         [lj.LoraRule("w", rank=2, init="pissa")], key=KEY), TypeError,
         r"'w' is quantised but init='pissa' replaces the base .* then lj.quantize"),
    Case("split", "pissa-nan-weight", lambda d: lj.split({"w": jnp.ones((8, 8)).at[2, 3].set(
         jnp.nan)}, [lj.LoraRule("w", rank=2, init="pissa")], key=KEY), ValueError,
         r"'w': init='pissa' factors the base weight \(shape \(8, 8\), float32\), but it holds "
         r"1 NaN/Inf .* use init='gaussian'"),
    Case("split", "olora-inf-weight", lambda d: lj.split({"w": jnp.full((8, 8), jnp.inf)},
         [lj.LoraRule("w", rank=2, init="olora")], key=KEY), ValueError,
         r"'w': init='olora' factors the base weight .* holds 64 NaN/Inf value"),
    # ---- lora_apply ---------------------------------------------------------------------
    Case("lora_apply", "swapped-trees", lambda d: APPLY(TRAINABLE, FROZEN, X), ValueError,
         r"'q/kernel': trainable holds a fully trained array but frozen also holds one"),
    Case("lora_apply", "swapped-trees-jit", lambda d: jax.jit(APPLY)(TRAINABLE, FROZEN, X),
         ValueError, r"'q/kernel': trainable holds a fully trained array"),
    Case("lora_apply", "other-base-shape", lambda d: APPLY(_other((16, 4)), TRAINABLE, X),
         ValueError, r"'q/kernel': factors a\(16, 2\), b\(2, 8\) adapt a weight of shape \(16, 8\)"
         r", but the frozen weight has shape \(16, 4\)"),
    Case("lora_apply", "missing-leaf", lambda d: APPLY({"q": {"kernel": jnp.ones((16, 8))}},
         TRAINABLE, X), ValueError, r"at leaf 0 frozen has 'q/kernel' but trainable has 'bias'; "
         r"pass the pair returned by the same lj.split"),
    Case("lora_apply", "bf16-base-f64-factors", lambda d: APPLY(
         {"q": {"kernel": jnp.ones((16, 8), jnp.bfloat16)}, "bias": jnp.zeros(8)},
         {"q": {"kernel": TRAINABLE["q"]["kernel"].with_factors(np.ones((16, 2)),
          np.ones((2, 8)))}, "bias": None}, X),
         ValueError, r"'q/kernel': factors are float64 but the base is bfloat16; .* param_dtype"),
    Case("lora_apply", "fn-shape-error-passes-through", lambda d: APPLY(FROZEN, TRAINABLE,
         jnp.ones((1, 5))), TypeError, r"contracting dimensions to have the same shape, got "
         r"\(5,\) and \(16,\)"),
    Case("lora_apply", "fn-not-callable", lambda d: lj.lora_apply(3), TypeError,
         r"lora_apply: fn=3 is not callable"),
    Case("lora_apply", "argnum-out-of-range", lambda d: lj.lora_apply(
         lambda p, x: x @ p["q"]["kernel"], argnum=5)(FROZEN, TRAINABLE, X), ValueError,
         r"argnum=5 .* 1 positional argument"),
    Case("lora_apply", "glora-bias-terms-summed", lambda d: lj.lora_apply(
         lambda p, x: jnp.sum(p["q"]["kernel"]) + x)(GLORA_FROZEN, GLORA_TRAINABLE, 1.0),
         lj.LoraFactoringError, r"'q/kernel' \(view shape \(16, 8\)\) carries GLoRA bias terms "
         r".* by 'reduce_sum'.* Use lj.Glora\(c='none', d='none', e='none'\)"),
    Case("lora_apply", "dropout-rng-materialize", lambda d: lj.lora_apply(
         lambda p, x: x @ p["q"]["kernel"], materialize=True)(*lj.split(PARAMS, [lj.LoraRule(
             S, rank=2, dropout=0.1)], key=KEY), X, lora_rng=KEY), ValueError,
         r"LoRA dropout needs the factored engine; use materialize=False or no lora_rng"),
    # ---- merge / unmerge ----------------------------------------------------------------
    Case("merge", "swapped-trees", lambda d: lj.merge(TRAINABLE, FROZEN), ValueError,
         r"'q/kernel': trainable holds a fully trained array but frozen also holds one"),
    Case("merge", "other-base-shape", lambda d: lj.merge(_other((16, 4)), TRAINABLE), ValueError,
         r"'q/kernel': factors a\(16, 2\), b\(2, 8\) adapt .* frozen weight has shape \(16, 4\)"),
    Case("merge", "missing-leaf", lambda d: lj.merge({"q": {"kernel": jnp.ones((16, 8))}},
         TRAINABLE), ValueError, r"at leaf 0 frozen has 'q/kernel' but trainable has 'bias'"),
    Case("merge", "frozen-none", lambda d: lj.merge(None, TRAINABLE), ValueError,
         r"frozen is None"),
    Case("merge", "int-base", lambda d: lj.merge(_other((16, 8)) | {"q": {"kernel": jnp.ones(
         (16, 8), jnp.int32)}}, TRAINABLE), TypeError, r"'q/kernel'.*int32"),
    Case("unmerge", "missing-leaf", lambda d: lj.unmerge({"q": {"kernel": jnp.ones((16, 8))}},
         TRAINABLE), ValueError, r"merged tree has 1 leaves but trainable has 2; pass the tree "
         r"returned by lj.merge"),
    Case("unmerge", "other-shape", lambda d: lj.unmerge(_other((16, 4)), TRAINABLE), ValueError,
         r"'q/kernel'.*merged weight of shape \(16, 4\) does not match factors adapting shape "
         r"\(16, 8\)"),
    Case("unmerge", "not-a-tree", lambda d: lj.unmerge([1, 2], TRAINABLE), ValueError,
         r"merged tree has 2 leaves but trainable has 2|does not match"),
    Case("unmerge", "dora-without-norms", lambda d: lj.unmerge(lj.merge(DORA_FROZEN,
         DORA_TRAINABLE), DORA_TRAINABLE), ValueError,
         r"'q/kernel' is a DoRA leaf: .* pass dora_norms=lj.dora_norms\(frozen, trainable\)"),
    # ---- quantize_nf4 / quantize_int4 / quantize ---------------------------------------
    Case("quantize_nf4", "int-dtype", lambda d: lj.quantize_nf4(jnp.ones((4, 4), jnp.int32)),
         TypeError, r"quantize_nf4: x has dtype int32; only floating-point arrays"),
    Case("quantize_nf4", "list", lambda d: lj.quantize_nf4([[1.0]]), TypeError,
         r"quantize_nf4: x is a list; pass an array \(jnp.asarray\(x\)\)"),
    Case("quantize_nf4", "nan", lambda d: lj.quantize_nf4(jnp.ones((4, 64)).at[1, 3].set(jnp.nan)),
         ValueError, r"quantize_nf4: x of shape \(4, 64\) \(float32\) holds 1 NaN/Inf value\(s\)"
         r".*Fix or exclude the weight"),
    Case("quantize_nf4", "inf", lambda d: lj.quantize_nf4(jnp.full((2, 64), jnp.inf, jnp.bfloat16)),
         ValueError, r"x of shape \(2, 64\) \(bfloat16\) holds 128 NaN/Inf"),
    Case("quantize_nf4", "block-zero", lambda d: lj.quantize_nf4(jnp.ones((4, 4)), block_size=0),
         ValueError, r"quantize_nf4: block_size=0 must be a positive int \(e.g. 64\)"),
    Case("quantize_nf4", "block-float", lambda d: lj.quantize_nf4(jnp.ones((4, 4)),
         block_size=64.0), ValueError, r"block_size=64.0 must be a positive int"),
    Case("quantize_nf4", "block-bool", lambda d: lj.quantize_nf4(jnp.ones((4, 4)), block_size=True),
         ValueError, r"block_size=True must be a positive int"),
    Case("quantize_nf4", "scalar", lambda d: lj.quantize_nf4(jnp.ones(())), ValueError,
         r"stack_axes=0 must be in \[0, 0\) for x of shape \(\); at least one axis must remain"),
    Case("quantize_nf4", "stack-axes-too-many", lambda d: lj.quantize_nf4(jnp.ones((4, 4)),
         stack_axes=2), ValueError, r"stack_axes=2 must be in \[0, 2\) for x of shape \(4, 4\)"),
    Case("quantize_nf4", "zero-size", lambda d: lj.quantize_nf4(jnp.ones((0, 4))), ValueError,
         r"x of shape \(0, 4\) has no elements per matrix to quantise"),
    Case("quantize_int4", "nan", lambda d: lj.quantize_int4(jnp.full((4, 64), jnp.nan)),
         ValueError, r"quantize_int4: x of shape \(4, 64\) \(float32\) holds 256 NaN/Inf"),
    Case("quantize_int4", "block-negative", lambda d: lj.quantize_int4(jnp.ones((4, 4)),
         block_size=-1), ValueError, r"quantize_int4: block_size=-1 must be a positive int"),
    Case("quantize_int4", "stack-axes-bool", lambda d: lj.quantize_int4(jnp.ones((4, 4)),
         stack_axes=True), TypeError, r"stack_axes=True must be an int"),
    Case("quantize", "format", lambda d: lj.quantize(PARAMS, S, format="nf8"), ValueError,
         r"quantize: format='nf8' is not one of \('nf4', 'int4'\)"),
    Case("quantize", "pattern-matches-nothing", lambda d: lj.quantize(PARAMS, "nothing"),
         ValueError, r"\['nothing'\] matched no leaf .* such as 'bias', 'q/kernel'\); fix"),
    Case("quantize", "vector", lambda d: lj.quantize(PARAMS, "bias"), ValueError,
         r"'bias' has shape \(8,\) with stack_axes=0: only matrices .* exclude biases"),
    Case("quantize", "nan-names-path", lambda d: lj.quantize({"w": jnp.full((64, 64), jnp.nan)},
         "w"), ValueError, r"'w': quantize_nf4: x of shape \(64, 64\) .* holds 4096 NaN/Inf"),
    Case("quantize", "select-int", lambda d: lj.quantize(PARAMS, 3), TypeError,
         r"select must be regex strings, LoraRules or a predicate\(path, leaf\), got int"),
    Case("quantize", "select-bad-regex", lambda d: lj.quantize(PARAMS, "q/(kernel"), ValueError,
         r"select pattern 'q/\(kernel' is not a valid regex"),
    Case("quantize", "already-quantised", lambda d: lj.quantize(lj.quantize(PARAMS, S), S),
         TypeError, r"'q/kernel' is already a NF4Array; narrow the selection"),
    Case("quantize", "int-leaf", lambda d: lj.quantize({"w": jnp.ones((64, 64), jnp.int8)}, "w"),
         TypeError, r"'w' has dtype int8; only float weights can be quantised"),
    Case("quantize", "stack-axes-negative", lambda d: lj.quantize(PARAMS, S, stack_axes=-1),
         ValueError, r"stack_axes for 'q/kernel' is -1; expected an int >= 0"),
    # ---- factor_shardings ---------------------------------------------------------------
    Case("factor_shardings", "spec-missing", lambda d: lj.factor_shardings({}, TRAINABLE),
         ValueError, r"'q/kernel' is trainable but specs has no entry for it"),
    Case("factor_shardings", "spec-str", lambda d: lj.factor_shardings(
         {"q": {"kernel": "model"}, "bias": None}, TRAINABLE), TypeError,
         r"'q/kernel': expected a PartitionSpec, a NamedSharding .* got str"),
    Case("factor_shardings", "spec-too-long", lambda d: lj.factor_shardings(
         {"q": {"kernel": P("a", "b", "c")}, "bias": None}, TRAINABLE), ValueError,
         r"'q/kernel': PartitionSpec P\('a', 'b', 'c'\) has 3 entries but the weight has 2 dims"),
    Case("factor_shardings", "override-unknown", lambda d: lj.factor_shardings(SPECS, TRAINABLE,
         overrides={"q/.*": "diagonal"}), ValueError,
         r"overrides\['q/\.\*'\] = 'diagonal': expected one of \('column', 'row'\)"),
    Case("factor_shardings", "override-matches-nothing", lambda d: lj.factor_shardings(
         SPECS, TRAINABLE, overrides={"k/.*": "row"}), ValueError,
         r"override pattern\(s\) \['k/\.\*'\] matched no adapted parameter"),
    # ---- save_adapters / load_adapters --------------------------------------------------
    Case("save_adapters", "trainable-str", lambda d: _save(d, trainable="hello"), TypeError,
         r"'': trainable leaf of type str cannot be saved"),
    Case("save_adapters", "rules-none", lambda d: _save(d, rules=None), TypeError,
         r"rules must be the LoraRule\(s\) passed to lj.split, got NoneType"),
    Case("save_adapters", "base-none", lambda d: _save(d, base=None), TypeError,
         r"base is None; pass the frozen tree from lj.split"),
    Case("save_adapters", "base-other-shape", lambda d: _save(d, base=_other((16, 4))), ValueError,
         r"'q/kernel' has shape \(16, 4\) in the base but the adapter's factors adapt shape "
         r"\(16, 8\)"),
    Case("save_adapters", "metadata-not-json", lambda d: _save(d, metadata={"x": object()}),
         TypeError, r"metadata must be JSON-serialisable .*object is not JSON serializable"),
    Case("save_adapters", "metadata-nan", lambda d: _save(d, metadata={"loss": float("nan")}),
         TypeError, r"metadata must be JSON-serialisable .*finite numbers"),
    Case("save_adapters", "step-str", lambda d: _save(d, step="ten"), TypeError,
         r"step='ten' must be an int or None"),
    Case("save_adapters", "path-is-file", lambda d: (d.joinpath("c").write_text("x"), _save(d)),
         ValueError, r"/c exists and is not a directory; .* Choose another path"),
    Case("save_adapters", "path-is-other-dir", lambda d: (d.joinpath("c").mkdir(),
         d.joinpath("c", "notes.txt").write_text("x"), _save(d)), ValueError,
         r"/c is a non-empty directory that is not an adapter checkpoint; refusing"),
    Case("load_adapters", "missing", lambda d: lj.load_adapters(d / "nowhere"), ValueError,
         r"no adapter checkpoint at .*/nowhere; expected a directory"),
    Case("load_adapters", "empty-dir", lambda d: lj.load_adapters(d), ValueError,
         r"cannot read adapter checkpoint metadata in .*/meta"),
    Case("load_adapters", "base-other-shape", lambda d: lj.load_adapters(_saved(d),
         base=_other((16, 4))), ValueError, r"adapter does not fit base: 'q/kernel' has shape "
         r"\(16, 4\) in the base .* load onto the model the adapter was trained on"),
    Case("load_adapters", "like-mismatch", lambda d: lj.load_adapters(_saved(d), like=lj.split(
         PARAMS, [lj.LoraRule(S, rank=1)], key=KEY)[1]), ValueError,
         r"like= does not match the checkpoint at leaf 1: like has 'q/kernel' \(factors, shapes "
         r"\(\(16, 1\), \(1, 8\)\)\)"),
    # ---- PEFT ---------------------------------------------------------------------------
    Case("peft.load_pretrained", "missing-folder", lambda d: lj.peft.load_pretrained(
         d / "nowhere", PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"nowhere/adapter_config.json does not exist; pass a folder written by save_pretrained"),
    Case("peft.load_pretrained", "key-map-dict", lambda d: lj.peft.load_pretrained(
         write_peft(d / "p"), PEFT_BASE, key_map={"fc/kernel": "fc.weight"}), TypeError,
         r"load_pretrained: key_map is a dict without to_hf\(path, layer\)"),
    Case("peft.load_pretrained", "frozen-none", lambda d: lj.peft.load_pretrained(
         write_peft(d / "p"), None, key_map=PEFT_MAP), ValueError,
         r"load_pretrained: frozen is an empty tree \(or None\)"),
    Case("peft.load_pretrained", "frozen-other-shape", lambda d: lj.peft.load_pretrained(
         write_peft(d / "p"), {"fc": {"kernel": jnp.zeros((6, 4))}}, key_map=PEFT_MAP),
         ValueError, r"\(2, 8\) and .*\(4, 2\) do not fit the base weight 'fc/kernel' of shape "
         r"\(6, 4\).*load onto the model"),
    Case("peft.load_pretrained", "r-disagrees", lambda d: lj.peft.load_pretrained(
         _peft_config(d, r=4), PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"'base_model.model.fc.lora_A.weight' has shape \(2, 8\); r=4 in adapter_config.json "
         r"expects \(4, in\)"),
    Case("peft.load_pretrained", "r-str", lambda d: lj.peft.load_pretrained(
         _peft_config(d, r="2"), PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"adapter_config.json: r='2' must be a positive int"),
    Case("peft.load_pretrained", "dropout-out-of-range", lambda d: lj.peft.load_pretrained(
         _peft_config(d, lora_dropout=1.5), PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"lora_dropout=1.5 must be a number in \[0, 1\)"),
    Case("peft.load_pretrained", "use-dora-str", lambda d: lj.peft.load_pretrained(
         _peft_config(d, use_dora="yes"), PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"use_dora='yes' must be true or false"),
    Case("peft.load_pretrained", "peft-type", lambda d: lj.peft.load_pretrained(
         _peft_config(d, peft_type="IA3"), PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"peft_type='IA3'; only 'LORA' and 'ADALORA' load"),
    Case("peft.load_pretrained", "bias-all", lambda d: lj.peft.load_pretrained(
         _peft_config(d, bias="all"), PEFT_BASE, key_map=PEFT_MAP), ValueError,
         r"bias='all' is not supported \(only bias='none'\); retrain the adapter without it"),
    Case("peft.save_pretrained", "nothing-to-save", lambda d: lj.peft.save_pretrained(
         d, {"fc": {"kernel": None}}, key_map=PEFT_MAP), ValueError,
         r"trainable has no factors or trained leaves; nothing to save"),
    Case("peft.save_pretrained", "no-key-map-entry", lambda d: lj.peft.save_pretrained(
         d, TRAINABLE, key_map=PEFT_MAP), ValueError,
         r"no key_map entry for 'q/kernel': .*no PEFT_KEY_MAP entry for our path 'q/kernel'"),
    Case("peft.save_pretrained", "key-map-none", lambda d: lj.peft.save_pretrained(
         d, TRAINABLE, key_map=None), TypeError, r"save_pretrained: key_map is a NoneType"),
    Case("peft.save_pretrained", "glora", lambda d: lj.peft.save_pretrained(d, GLORA_TRAINABLE,
         key_map=KeyMap((KeyEntry("q/kernel", "q.weight", "linear"),))), ValueError,
         r"'q/kernel': GLoRA factors have no PEFT format .* export lj.merge\(frozen, trainable\)"),
    Case("stack_adapters", "glora", lambda d: lj.stack_adapters([GLORA_TRAINABLE] * 2),
         ValueError, r"'q/kernel': stack_adapters works on low-rank updates .* GLoRA factors"),
    Case("stack_adapters", "adapter-id-outside-bank", lambda d: APPLY(FROZEN, lj.stack_adapters(
         [TRAINABLE]), jnp.ones((3, 16)), adapter_ids=jnp.array([0, 5, 1])), ValueError,
         r"adapter_ids has slot 5 but the bank has slots 0...1; load the adapter with bank.set"),
    Case("combine_adapters", "dora", lambda d: lj.combine_adapters([DORA_TRAINABLE] * 2, [1, 1]),
         ValueError, r"'q/kernel': combine_adapters works on low-rank updates .* DoRA factors"),
    Case("peft.save_pretrained", "mixed-rslora", lambda d: lj.peft.save_pretrained(d, lj.split(
         {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4))}, [lj.LoraRule("a", rank=2, rslora=True),
         lj.LoraRule("b", rank=2)], key=KEY)[1], key_map=KeyMap((KeyEntry("a", "a.weight",
         "linear"), KeyEntry("b", "b.weight", "linear")))), ValueError,
         r"PEFT has one use_rslora per adapter but the factors use \[False, True\]"),
    # ---- model loaders ------------------------------------------------------------------
    Case("bert.load", "missing-folder", lambda d: bert.load(d / "nowhere"), FileNotFoundError,
         r"nowhere/config.json does not exist; pass a folder written by save_pretrained"),
    Case("bert.load", "path-int", lambda d: bert.load(123), TypeError,
         r"expected str, bytes or os.PathLike object, not int"),
    Case("bert.load", "dtype-int", lambda d: bert.load(write_bert(d / "b"), dtype=jnp.int8),
         TypeError, r"bert.load: dtype=.*int8.* is not a float dtype; pass jnp.float32"),
    Case("bert.load", "no-weights", lambda d: (write_bert(d / "b"), (d / "b" /
         "model.safetensors").unlink(), bert.load(d / "b")), FileNotFoundError,
         r"has neither model.safetensors nor .*safe_serialization=True"),
    Case("bert.load", "config-heads-str", lambda d: bert.load(_bert_config(
         d, num_attention_heads="2")), ValueError,
         r"BERT config.json: num_attention_heads='2' must be a positive int"),
    Case("bert.load", "config-heads-indivisible", lambda d: bert.load(_bert_config(
         d, num_attention_heads=3)), ValueError,
         r"hidden_size=16 is not divisible by num_attention_heads=3"),
    Case("bert.load", "config-relative-positions", lambda d: bert.load(_bert_config(
         d, position_embedding_type="relative_key")), ValueError,
         r"position_embedding_type='relative_key' is not supported; only 'absolute'"),
    Case("bert.load", "config-more-layers", lambda d: bert.load(_bert_config(
         d, num_hidden_layers=3)), KeyError,
         r"has no tensor 'encoder.layer.2.attention.self.query.weight'.* right model class"),
    Case("llama.load", "missing-folder", lambda d: llama.load(d / "nowhere"), FileNotFoundError,
         r"nowhere/config.json does not exist"),
    Case("llama.load", "rope-scaling", lambda d: llama.load(_llama_config(
         d, rope_scaling={"rope_type": "yarn"})), ValueError,
         r"config.json has rope_type='yarn'; this reference Llama supports only "
         r"rope_type='default'"),
    Case("llama.load", "config-layers-zero", lambda d: llama.load(_llama_config(
         d, num_hidden_layers=0)), ValueError,
         r"Llama config.json: num_hidden_layers=0 must be a positive int"),
    Case("llama.load", "kv-heads-indivisible", lambda d: llama.load(_llama_config(
         d, num_key_value_heads=3)), ValueError,
         r"num_attention_heads=2 is not a multiple of num_key_value_heads=3"),
    Case("llama.load", "dtype-str", lambda d: llama.load(_llama_config(d), dtype="float77"),
         TypeError, r"llama.load: dtype='float77' is not a float dtype"),
    Case("llama.load_gguf", "missing-file", lambda d: llama.load_gguf(d / "none.gguf"),
         ValueError, r"none.gguf does not exist or is not a file; expected a .gguf file"),
    Case("llama.load_gguf", "text-file", lambda d: (d.joinpath("t.gguf").write_text("hello"),
         llama.load_gguf(d / "t.gguf")), ValueError, r"t.gguf starts with b'hell', not b'GGUF'"),
    Case("llama.load_gguf", "other-arch", lambda d: llama.load_gguf(write_gguf(d / "g.gguf",
         arch="gpt2")), ValueError, r"general.architecture is 'gpt2'; load_gguf reads 'llama'"),
    Case("llama.load_gguf", "dtype-int", lambda d: llama.load_gguf(write_gguf(d / "g.gguf"),
         dtype=jnp.int32), TypeError, r"llama.load_gguf: dtype=.*int32.* is not a float dtype"),
]  # fmt: skip


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.core)] if case.core else []
    return pytest.param(case, id=f"{case.fn}-{case.id}", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_gives_clear_error(case, tmp_path):
    with pytest.raises(case.exc, match=case.match):
        case.call(tmp_path)


def test_case_ids_are_unique():
    ids = [(c.fn, c.id) for c in CASES]
    assert len(ids) == len(set(ids))


# ---- accepted on purpose ----------------------------------------------------------------


def test_split_accepts_nan_weights():
    """split copies weights, it does not inspect them: NaN bases are allowed (checking would
    sync every weight to the host); lj.finite_guard reports the non-finite loss they cause."""
    nan = {"q": {"kernel": jnp.full((16, 8), jnp.nan)}, "bias": jnp.zeros(8)}
    frozen, trainable = lj.split(nan, RULES, key=KEY)
    assert bool(jnp.isnan(frozen["q"]["kernel"]).all())
    assert bool(jnp.isfinite(trainable["q"]["kernel"].a).all())


def test_quantize_under_jit_skips_the_finite_check():
    """Under jit the values are unknown: NaN goes through (into NaN scales), no error."""
    q = jax.jit(lj.quantize_nf4)(jnp.full((2, 64), jnp.nan))
    assert bool(jnp.isnan(lj.dequantize_nf4(q, jnp.float32)).all())
    with pytest.raises(ValueError, match="holds 128 NaN/Inf"):
        lj.quantize_nf4(jnp.full((2, 64), jnp.nan))


# ---- hypothesis: the large input spaces -------------------------------------------------

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@PROPERTY
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), rank=st.integers(-3, 16))
def test_split_rank_property(d_in, d_out, rank):
    """Any rank: valid ones give factors of the right shapes, others a clear error."""
    params = {"w": jnp.ones((d_in, d_out))}
    if rank < 1:
        with pytest.raises(ValueError, match=rf"rank={rank} must be positive; use rank >= 1"):
            lj.LoraRule("w", rank=rank)
        return
    rule = lj.LoraRule("w", rank=rank)
    if rank > min(d_in, d_out):
        with pytest.raises(
            ValueError,
            match=rf"rank={rank} is larger than min\(in, out\)="
            rf"min\({d_in}, {d_out}\) for 'w' with shape \({d_in}, {d_out}\)",
        ):
            lj.split(params, [rule], key=KEY)
        return
    _, trainable = lj.split(params, [rule], key=KEY)
    assert trainable["w"].a.shape == (d_in, rank) and trainable["w"].b.shape == (rank, d_out)


BLOCKS = st.one_of(st.integers(-4, 300), st.sampled_from([0.5, 64.0, True, None, "64"]))


@PROPERTY
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    block=BLOCKS,
    stack=st.one_of(st.integers(-2, 4), st.just(False)),
    fn=st.sampled_from(["nf4", "int4"]),
)
def test_quantize_args_property(shape, block, stack, fn):
    """Any shape, block size and stack_axes: a round trip of the right shape or a clear error
    that names the argument at fault."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    quantize = lj.quantize_nf4 if fn == "nf4" else lj.quantize_int4
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    valid = (
        is_int(block)
        and block > 0
        and is_int(stack)
        and 0 <= stack < len(shape)
        and math.prod(shape[stack:]) > 0
    )  # the documented contract: valid inputs must be accepted, invalid ones refused
    try:
        q = quantize(x, block_size=block, stack_axes=stack)
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert not valid, f"valid arguments refused: {msg}"
        assert msg.startswith(f"quantize_{fn}: ")
        assert any(name in msg for name in ("block_size=", "stack_axes=", "no elements")), msg
        return
    assert valid, (shape, block, stack)
    assert q.shape == x.shape
    assert q.dequantize(jnp.float32).shape == x.shape


FIELDS = {
    "rank": st.one_of(st.integers(-2, 70), st.floats(allow_nan=True), st.text(max_size=2),
                      st.none(), st.booleans()),
    "alpha": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-5, 64), st.text(max_size=2)),
    "dropout": st.one_of(st.floats(-1, 2), st.just(float("nan")), st.integers(-1, 2)),
}  # fmt: skip


@PROPERTY
@given(rank=FIELDS["rank"], alpha=FIELDS["alpha"], dropout=FIELDS["dropout"])
def test_lora_rule_fields_property(rank, alpha, dropout):
    """Any rank/alpha/dropout: a valid rule, or an error naming the field and the value."""
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    valid = (
        isinstance(rank, int)
        and not isinstance(rank, bool)
        and rank >= 1
        and (alpha is None or (number(alpha) and math.isfinite(alpha) and alpha > 0))
        and number(dropout)
        and 0 <= dropout < 1
    )  # the documented contract: valid fields must be accepted, invalid ones refused
    try:
        rule = lj.LoraRule("w", rank=rank, alpha=alpha, dropout=dropout)
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert not valid, f"valid fields refused: {msg}"
        assert msg.startswith("LoraRule('w'): ")
        assert any(f"{name}" in msg for name in ("rank", "alpha=", "dropout=")), msg
        return
    assert valid, (rank, alpha, dropout)
    assert rule.scale == (2 * rank if alpha is None else alpha) / rank


# ---- the table in docs/RELIABILITY.md ---------------------------------------------------


def table() -> str:
    """Markdown summary of the catalogue: cases and clear errors per function."""
    rows = collections.OrderedDict()
    for c in CASES:
        total, clear = rows.get(c.fn, (0, 0))
        rows[c.fn] = (total + 1, clear + (not c.core))
    lines = ["| function | bad-input cases | clear errors |", "|---|---:|---:|"]
    lines += [f"| `{fn}` | {n} | {k} |" for fn, (n, k) in rows.items()]
    n, k = len(CASES), sum(not c.core for c in CASES)
    lines.append(f"| **all** | **{n}** | **{k}** |")
    gaps = [f"- `{c.fn}` {c.id}: {c.core}" for c in CASES if c.core]
    if not gaps:
        return "\n".join(lines)
    return "\n".join(lines) + "\n\nStill unclear (core changes needed):\n\n" + "\n".join(gaps)


def test_reliability_doc_is_current():
    doc = pathlib.Path(__file__).parents[2] / "docs" / "RELIABILITY.md"
    assert table() in doc.read_text(), "run `python tests/test_bad_inputs.py` and paste the table"


if __name__ == "__main__":
    print(table())
