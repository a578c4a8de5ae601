"""PEFT interop: adapters made by peft load here, and ours load in peft, with equal outputs."""

import copy
import dataclasses
import json
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft_helpers import TOL, check_peft_loads, our_outputs, torch_outputs
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from lora_jax.models import bert, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir):
    return tiny_bert_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return d


def _peft_adapter(model, tmp, **kwargs):
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    if "modules_to_save" in kwargs:  # make the saved copies differ from the base
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp)
    return pm


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["query", "value"]},
        {
            "target_modules": ["query", "value", "word_embeddings", "dense"],
            "rank_pattern": {"encoder.layer.1.attention.self.query": 2, "intermediate.dense": 3},
            "alpha_pattern": {"value": 16},
            "use_rslora": True,
        },
    ],
    ids=["qv", "mixed-rank-rslora-embedding"],
)
def test_peft_to_ours_bert(bert_dir, tmp_path, kwargs):
    model = transformers.BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    pm = _peft_adapter(model, tmp_path, **kwargs)
    params, _ = bert.load(bert_dir)
    trainable = lj.peft.load_pretrained(tmp_path, params, key_map=bert.PEFT_KEY_MAP)
    q1 = trainable["encoder"]["layer_1"]["attention"]["query"]["kernel"]
    assert q1.rank == (2 if "rank_pattern" in kwargs else 4)
    ours = our_outputs(bert, bert_dir, params, trainable)
    ref = torch_outputs(pm)
    base = torch_outputs(model)
    assert np.abs(ref - base).max() > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_peft_to_ours_llama_stacked_modules_to_save(llama_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    pm = _peft_adapter(
        model,
        tmp_path,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 16},
        modules_to_save=["lm_head"],
    )
    params, _ = llama.load(llama_dir)
    frozen, _ = lj.split(params, [lj.LoraRule("lm_head/kernel", full=True)], key=jax.random.key(0))
    trainable = lj.peft.load_pretrained(tmp_path, frozen, key_map=llama.PEFT_KEY_MAP)
    att = trainable["layers"]["attention"]
    assert att["v_proj"]["kernel"].a.shape == (2, 32, 2) and att["q_proj"]["kernel"].alpha == 16
    assert att["k_proj"]["kernel"] is None and trainable["lm_head"]["kernel"].shape == (32, 128)
    ref = torch_outputs(pm)
    assert np.abs(ref - torch_outputs(model)).max() > 1e-2
    np.testing.assert_allclose(
        our_outputs(llama, llama_dir, frozen, trainable), ref, atol=TOL, rtol=0
    )


def _randomise(trainable, seed=0, scale=0.3):
    """Non-zero factors (and perturbed fully trained leaves)."""
    key = jax.random.key(seed)
    leaves, treedef = jax.tree.flatten(trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))
    out = []
    for i, t in enumerate(leaves):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        if isinstance(t, lj.LoraFactors):
            out.append(t.with_factors(t.a, scale * jax.random.normal(k2, t.b.shape, t.b.dtype)))
        else:
            out.append(t + 0.1 * jax.random.normal(k1, t.shape, t.dtype))
    return jax.tree.unflatten(treedef, out)


BERT_RULES = [
    lj.LoraRule(r".*/attention/(query|value)/kernel", rank=4, alpha=8, rslora=True),
    lj.LoraRule(r"encoder/layer_1/output/dense/kernel", rank=2, alpha=6, rslora=True),
    lj.LoraRule(r"embeddings/word_embeddings/embedding", rank=3, alpha=8, rslora=True),
]


def test_ours_to_peft_bert_rslora_mixed_ranks(bert_dir, tmp_path):
    params, _ = bert.load(bert_dir)
    frozen, trainable = lj.split(params, BERT_RULES, key=jax.random.key(0))
    trainable = _randomise(trainable)
    lj.peft.save_pretrained(
        tmp_path,
        trainable,
        key_map=bert.PEFT_KEY_MAP,
        rules=BERT_RULES,
        base_model_name_or_path="x",
    )
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, True)
    assert cfg["rank_pattern"] == {
        "embeddings.word_embeddings": 3,
        "encoder.layer.1.output.dense": 2,
    }
    assert cfg["alpha_pattern"] == {"encoder.layer.1.output.dense": 6}
    assert cfg["init_lora_weights"] == "gaussian"
    model = transformers.BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    check_peft_loads(model, tmp_path, our_outputs(bert, bert_dir, frozen, trainable))
    # And back: our own file loads bit-exactly.
    back = lj.peft.load_pretrained(tmp_path, frozen, key_map=bert.PEFT_KEY_MAP)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


LLAMA_RULES = [
    lj.LoraRule(r"layers/attention/(q|v)_proj/kernel", rank=4, stack_axes=(0,), in_axes=(1,)),
    lj.LoraRule(r"layers/mlp/down_proj/kernel", rank=2, alpha=8, stack_axes=(0,), in_axes=(1,)),
    lj.LoraRule(r"embed_tokens/embedding", rank=3),
    lj.LoraRule(r"lm_head/kernel|layers/input_layernorm/scale", full=True),
]


def test_ours_to_peft_llama_stacked(llama_dir, tmp_path):
    params, _ = llama.load(llama_dir)
    frozen, trainable = lj.split(params, LLAMA_RULES, key=jax.random.key(0))
    trainable = _randomise(trainable)
    lj.peft.save_pretrained(tmp_path, trainable, key_map=llama.PEFT_KEY_MAP, task_type="CAUSAL_LM")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 3)
    assert keys["base_model.model.lm_head.weight"].shape == (128, 32)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == [
        "lm_head",
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
    ]
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    check_peft_loads(model, tmp_path, our_outputs(llama, llama_dir, frozen, trainable))
    back = lj.peft.load_pretrained(tmp_path, frozen, key_map=llama.PEFT_KEY_MAP)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("variant", ["dora", "adalora"])
def test_ours_to_peft_llama_stacked_variants(llama_dir, tmp_path, variant):
    """Per-layer variant arrays of a stacked leaf land on each layer's module: PEFT agrees."""
    params, _ = llama.load(llama_dir)
    rule = lj.LoraRule(
        r"layers/attention/(q_proj|v_proj)/kernel", rank=4, alpha=8, stack_axes=(0,),
        in_axes=(1,), **{variant: True},
    )  # fmt: skip
    frozen, trainable = lj.split(params, rule, key=jax.random.key(0))
    trainable = _randomise(trainable)

    # Each layer gets its own magnitudes (DoRA) or singular values (AdaLoRA: zero at init).
    def per_layer(t):
        n_layers, d_out = t.b.shape[0], t.b.shape[2]
        u = jax.random.uniform(jax.random.key(7), (n_layers, d_out), t.b.dtype, 0.5, 1.5)
        if variant == "dora":
            return dataclasses.replace(t, magnitude=t.magnitude * u)
        return dataclasses.replace(t, singular=u[:, : t.rank])

    trainable = jax.tree.map(per_layer, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))
    lj.peft.save_pretrained(tmp_path, trainable, key_map=llama.PEFT_KEY_MAP, task_type="CAUSAL_LM")
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    check_peft_loads(model, tmp_path, our_outputs(llama, llama_dir, frozen, trainable))
    back = lj.peft.load_pretrained(tmp_path, frozen, key_map=llama.PEFT_KEY_MAP)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Target(NamedTuple):
    key: str
    layout: str
    transposed: bool

    @property
    def module(self) -> str:
        return self.key.rsplit(".", 1)[0]


class DictKeyMap:
    """A minimal key map: {path regex: (torch key template, layout, transposed)}.

    ``{layer}`` in a template with no group in the regex marks a stacked leaf; regex
    groups fill ``{0}``, ``{1}``...
    """

    def __init__(self, entries):
        self.entries = entries

    def to_hf(self, path, layer=None):
        for pattern, (key, layout, transposed) in self.entries.items():
            m = re.fullmatch(pattern, path)
            if m is None:
                continue
            if "{layer}" in key and layer is None:
                raise ValueError(f"'{path}' is stacked; pass layer=")
            return Target(key.format(*m.groups(), layer=layer), layout, transposed)
        raise KeyError(f"no entry for '{path}'")


GPT2_MAP = DictKeyMap(
    {
        r"h/(\d+)/attn/c_attn/kernel": ("h.{0}.attn.c_attn.weight", "conv1d", False),
        r"h/(\d+)/mlp/c_fc/kernel": ("h.{0}.mlp.c_fc.weight", "conv1d", False),
        r"h/(\d+)/mlp/c_fc/bias": ("h.{0}.mlp.c_fc.bias", "vector", False),
    }
)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    model = transformers.GPT2Model(cfg).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = {
        "h": [
            {
                "attn": {"c_attn": {"kernel": jnp.asarray(sd[f"h.{i}.attn.c_attn.weight"])}},
                "mlp": {
                    "c_fc": {
                        "kernel": jnp.asarray(sd[f"h.{i}.mlp.c_fc.weight"]),
                        "bias": jnp.asarray(sd[f"h.{i}.mlp.c_fc.bias"]),
                    }
                },
            }
            for i in range(2)
        ]
    }
    return model, params


def _merged_torch(pm):
    return {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}


def test_gpt2_conv1d_fan_in_fan_out_both_ways(gpt2, tmp_path):
    """Conv1D stores (in, out) like us: factors as for Linear, full leaves untransposed."""
    model, params = gpt2
    pm = _peft_adapter(model, tmp_path / "p", target_modules=["c_attn"], fan_in_fan_out=True)
    trainable = lj.peft.load_pretrained(tmp_path / "p", params, key_map=GPT2_MAP)
    want = _merged_torch(pm)["h.1.attn.c_attn.weight"]
    got = jax.jit(lj.merge)(params, trainable)["h"][1]["attn"]["c_attn"]["kernel"]
    assert np.abs(want - np.asarray(params["h"][1]["attn"]["c_attn"]["kernel"])).max() > 1e-3
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)

    rules = [lj.LoraRule(r".*/c_attn/kernel", rank=4), lj.LoraRule(r"h/1/mlp/.*", full=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _randomise(trainable)
    lj.peft.save_pretrained(tmp_path / "o", trainable, key_map=GPT2_MAP, fan_in_fan_out=True)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "o")
    merged = lj.merge(frozen, trainable)["h"][1]
    want = _merged_torch(pm)
    np.testing.assert_allclose(
        want["h.1.attn.c_attn.weight"], np.asarray(merged["attn"]["c_attn"]["kernel"]), atol=1e-6
    )
    np.testing.assert_array_equal(want["h.1.mlp.c_fc.weight"], merged["mlp"]["c_fc"]["kernel"])
    np.testing.assert_array_equal(want["h.1.mlp.c_fc.bias"], merged["mlp"]["c_fc"]["bias"])


# --- errors, on a toy model with a hand-written key map (no torch needed) ---

TOY_MAP = DictKeyMap(
    {
        r"l(\d)/kernel": ("l{0}.weight", "linear", True),
        r"l(\d)/bias": ("l{0}.bias", "vector", False),
        r"stack/kernel": ("s.{layer}.weight", "linear", True),
        r"stack/bias": ("s.{layer}.bias", "vector", False),
    }
)


def _toy():
    rng = np.random.default_rng(0)
    return {
        "l0": {
            "kernel": jnp.asarray(rng.standard_normal((8, 6), np.float32)),
            "bias": jnp.zeros(6),
        },
        "l1": {"kernel": jnp.asarray(rng.standard_normal((6, 4), np.float32))},
        "stack": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 4), np.float32))},
    }


def _toy_adapter(tmp_path, rules=None):
    rules = rules or [lj.LoraRule(r"l\d/kernel", rank=2)]
    frozen, trainable = lj.split(_toy(), rules, key=jax.random.key(0))
    lj.peft.save_pretrained(tmp_path, _randomise(trainable), key_map=TOY_MAP)
    return frozen


def _edit_config(tmp_path, **changes):
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(tmp_path, fn):
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_toy_stacked_round_trip_with_missing_layer(tmp_path):
    rules = [lj.LoraRule("stack/kernel", rank=2, stack_axes=(0,), in_axes=(1,))]
    frozen = _toy_adapter(tmp_path, rules)
    _edit_tensors(
        tmp_path, lambda t: [t.pop(f"base_model.model.s.1.lora_{x}.weight") for x in "AB"]
    )
    back = lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)["stack"]["kernel"]
    assert back.stack_axes == (0,) and back.a.shape == (3, 4, 2)
    assert np.all(np.asarray(back.b[1]) == 0) and np.any(np.asarray(back.b[0]) != 0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: os.remove(d / "adapter_config.json"), "adapter_config.json does not exist"),
        (lambda d: _edit_config(d, peft_type="IA3"), "peft_type='IA3'; only 'LORA' and"),
        (
            lambda d: _edit_config(d, use_dora=True),
            r"use_dora=True but 'base_model.model.l0.lora_magnitude_vector' is missing",
        ),
        (lambda d: _edit_config(d, bias="all"), "bias='all' is not supported"),
        (
            lambda d: _edit_config(d, r=3),
            r"'base_model.model.l0.lora_A.weight' has shape \(2, 8\); r=3 in adapter_config.json",
        ),
        (
            lambda d: _edit_tensors(d, lambda t: t.pop("base_model.model.l1.lora_B.weight")),
            "has 'base_model.model.l1.lora_A.weight' but no 'base_model.model.l1.lora_B.weight'",
        ),
        (
            lambda d: _edit_tensors(
                d,
                lambda t: t.update(
                    {"base_model.model.zz.weight": t["base_model.model.l1.lora_B.weight"]}
                ),
            ),
            r"1 tensor\(s\) in adapter_model.safetensors map to no leaf .*zz.weight",
        ),
        (
            lambda d: _edit_tensors(
                d, lambda t: t.update({"base_model.model.l0.bias": np.ones(6, np.float32)})
            ),
            "trains 'base_model.model.l0.bias' fully .* frozen holds a weight at 'l0/bias'",
        ),
    ],
    ids=[
        "no-config",
        "peft-type",
        "dora",
        "bias",
        "rank",
        "missing-B",
        "unmapped",
        "full-vs-frozen",
    ],
)
def test_load_errors(tmp_path, edit, match):
    frozen = _toy_adapter(tmp_path)
    edit(tmp_path)
    with pytest.raises(ValueError, match=match):
        lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)


def test_load_onto_other_base_names_key_and_shapes(tmp_path):
    _toy_adapter(tmp_path)
    other = _toy()
    other["l1"]["kernel"] = jnp.zeros((6, 5))
    with pytest.raises(
        ValueError,
        match=r"'base_model.model.l1.lora_A.weight' \(2, 6\) and .*lora_B.weight' \(4, 2\) "
        r"do not fit the base weight 'l1/kernel' of shape \(6, 5\)",
    ):
        lj.peft.load_pretrained(tmp_path, other, key_map=TOY_MAP)


def test_load_full_leaf_errors(tmp_path):
    frozen = _toy_adapter(tmp_path)
    frozen["l1"]["bias"] = None  # the adapter has no l1.bias
    with pytest.raises(ValueError, match="frozen has None at 'l1/bias' .* has no tensor"):
        lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)
    frozen = _toy_adapter(tmp_path)
    frozen["extra"] = None  # unmapped: a hole of the model's own tree (eqx.partition), kept
    assert lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)["extra"] is None


def test_stacked_mixed_ranks_raise(tmp_path):
    rules = [lj.LoraRule("stack/kernel", rank=2, stack_axes=(0,), in_axes=(1,))]
    frozen = _toy_adapter(tmp_path, rules)
    _edit_config(tmp_path, rank_pattern={"s.1": 1})

    def shrink(t):
        for x, sl in (("A", np.s_[:1]), ("B", np.s_[:, :1])):
            key = f"base_model.model.s.1.lora_{x}.weight"
            t[key] = np.ascontiguousarray(t[key][sl])

    _edit_tensors(tmp_path, shrink)
    with pytest.raises(ValueError, match="'stack/kernel' stacks 3 layers but .* different ranks"):
        lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)


def _save(tmp_path, rules, params=None):
    _, trainable = lj.split(params or _toy(), rules, key=jax.random.key(0))
    lj.peft.save_pretrained(tmp_path, trainable, key_map=TOY_MAP)


@pytest.mark.parametrize(
    "rules, params, match",
    [
        (
            [lj.LoraRule("l0/kernel", rank=2, rslora=True), lj.LoraRule("l1/kernel", rank=2)],
            None,
            r"one use_rslora per adapter but the factors use \[False, True\]",
        ),
        (
            [lj.LoraRule("l0/kernel", rank=2, dropout=0.1), lj.LoraRule("l1/kernel", rank=2)],
            None,
            "one lora_dropout",
        ),
        (
            [lj.LoraRule("stack/kernel", rank=2)],
            {"stack": {"kernel": jnp.ones((4, 4))}},
            r"stack_axes=\(\) but the key_map stacks this leaf",
        ),
        (
            [lj.LoraRule("l0/kernel", rank=2, stack_axes=(0,), in_axes=(1,))],
            {"l0": {"kernel": jnp.ones((2, 4, 4))}},
            r"stack_axes=\(0,\) but the key_map does not stack",
        ),
        (
            [lj.LoraRule("stack/kernel", rank=1, stack_axes=(0, 1), in_axes=(2,))],
            {"stack": {"kernel": jnp.ones((2, 2, 4, 4))}},
            "has 2 stack axes",
        ),
        (
            [lj.LoraRule("other", rank=2)],
            {"other": jnp.ones((4, 4))},
            "no key_map entry for 'other'",
        ),
        (
            [lj.LoraRule("stack/bias", full=True)],
            {"stack": {"bias": jnp.ones(())}, "l0": {"kernel": jnp.ones((4, 4))}},
            "'stack/bias' is stacked; pass layer=",
        ),
    ],
    ids=[
        "rslora-mix",
        "dropout-mix",
        "stacked-map",
        "unstacked-map",
        "two-stack-axes",
        "unmapped",
        "scalar-stacked",
    ],
)
def test_save_errors(tmp_path, rules, params, match):
    with pytest.raises(ValueError, match=match):
        _save(tmp_path, rules, params)


def test_save_nothing_raises(tmp_path):
    with pytest.raises(ValueError, match="nothing to save"):
        lj.peft.save_pretrained(tmp_path, {"l0": None}, key_map=TOY_MAP)


@pytest.mark.parametrize("same", [True, False], ids=["equal", "modified"])
def test_base_layer_copy_is_checked(tmp_path, same):
    """PEFT saves adapted embeddings' base weights (``base_layer.weight``); they must match."""
    frozen = _toy_adapter(tmp_path)
    torch_w = np.ascontiguousarray(np.asarray(frozen["l0"]["kernel"]).T) + (0.0 if same else 1.0)
    _edit_tensors(tmp_path, lambda t: t.update({"base_model.model.l0.base_layer.weight": torch_w}))
    if same:
        assert lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)["l0"]["kernel"].rank == 2
    else:
        with pytest.raises(
            ValueError,
            match=r"'base_model.model.l0.base_layer.weight' \(6, 8\) .* differs from frozen "
            r"'l0/kernel'",
        ):
            lj.peft.load_pretrained(tmp_path, frozen, key_map=TOY_MAP)
