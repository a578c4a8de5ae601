"""VeRA: forward, gradients, merge, checkpoints and shardings against float64 numpy, and
PEFT's VeRA tuner both ways on tiny BERT."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from peft_helpers import TOL, check_peft_loads, our_outputs, torch_outputs

import lora_jax as lj
from lora_jax._src.core import variant as V
from lora_jax._src.variants.vera import Projection
from lora_jax.models import bert

R = 3


def _params(stacked=False):
    rng = np.random.default_rng(0)
    q = (2, 8, 6) if stacked else (8, 6)
    return {
        "q": {"kernel": jnp.asarray(rng.standard_normal(q), jnp.float32)},
        "v": {"kernel": jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)},
    }


def _split(stacked=False, seed=0):
    params = _params(stacked)
    rules = [
        lj.LoraRule(
            "q/kernel", rank=R, variant=lj.Vera(seed=seed), stack_axes=(0,) if stacked else None
        ),
        lj.LoraRule("v/kernel", rank=R, variant=lj.Vera(seed=seed)),
    ]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    return params, rules, frozen, trainable


def _perturb(trainable, seed=1):
    leaves, treedef = jax.tree.flatten(trainable)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [x + jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype) for x in leaves]
    )


def _np(t):
    """float64 ``A_s (*stack, in, r)``, ``B_s (*stack, r, out)``, ``lambda_d``, ``lambda_b``."""
    p = t.variant
    return tuple(
        np.asarray(x, np.float64) for x in (t.a.value(), t.b.value(), p.lambda_d, p.lambda_b)
    )


def _weight(w0, t):
    """float64 reference: W0 + A_s diag(lambda_d) B_s diag(lambda_b)."""
    a, b, d, lb = _np(t)
    return np.asarray(w0, np.float64) + np.einsum("...ir,...r,...ro,...o->...io", a, d, b, lb)


def test_split_shares_one_pair_of_kaiming_projections():
    params, _, frozen, trainable = _split()
    q, v = trainable["q"]["kernel"], trainable["v"]["kernel"]
    # the layer starts at the base: lambda_b = 0, lambda_d = d_initial
    np.testing.assert_array_equal(q.variant.lambda_b, 0)
    np.testing.assert_allclose(q.variant.lambda_d, 0.1)
    np.testing.assert_array_equal(lj.merge(frozen, trainable)["q"]["kernel"], params["q"]["kernel"])
    # one shared A (r, max_in = 8) and B (max_out = 10, r): each weight uses a prefix slice
    a_q, a_v = np.asarray(q.a.value()), np.asarray(v.a.value())  # (8, r), (6, r)
    b_q, b_v = np.asarray(q.b.value()), np.asarray(v.b.value())  # (r, 6), (r, 10)
    np.testing.assert_array_equal(a_v, a_q[:6])
    np.testing.assert_array_equal(b_q, b_v[:, :6])
    # kaiming-uniform as PEFT's _kaiming_init: bound sqrt(6 / fan_in), fan_in = max_in or r
    assert 0.5 * np.sqrt(6 / 8) < np.abs(a_q).max() <= np.sqrt(6 / 8)
    assert 0.5 * np.sqrt(6 / R) < np.abs(b_v).max() <= np.sqrt(6 / R)
    # another seed, other projections; the same seed, the same ones
    other = _split(seed=1)[3]["q"]["kernel"]
    assert not np.allclose(other.a.value(), q.a.value())
    assert _split()[3]["q"]["kernel"].a == q.a
    # the projections are no leaves: only the vectors are trained, counted and stored
    assert lj.count_params(trainable) == (R + 6) + (R + 10)
    assert lj.summary(frozen, trainable).rows[0].kind == "vera"


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_forward_and_gradients_match_float64(stacked, jit):
    params, _, frozen, trainable = _split(stacked)
    # fn reads q only: pass q alone (strict refuses an adapted weight the function never reads)
    frozen, trainable = {"q": frozen["q"]}, {"q": _perturb(trainable)["q"]}
    t = trainable["q"]["kernel"]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    cot = rng.standard_normal((2, 4, 6) if stacked else (4, 6))

    def fn(p, x):
        return jnp.einsum("bi,...io->...bo", x, p["q"]["kernel"])

    apply = lj.lora_apply(fn, strict=True)  # strict: no weight is ever materialised
    apply = jax.jit(apply) if jit else apply
    y = apply(frozen, trainable, jnp.asarray(x))
    w = _weight(params["q"]["kernel"], t)
    np.testing.assert_allclose(y, np.einsum("bi,...io->...bo", x, w), rtol=1e-5, atol=1e-5)

    loss = lambda tr: jnp.sum(apply(frozen, tr, jnp.asarray(x)) * jnp.asarray(cot, jnp.float32))
    g = jax.grad(loss)(trainable)["q"]["kernel"].variant
    a, b, d, lb = _np(t)
    xa = np.einsum("bi,...ir->...br", x.astype(np.float64), a)  # (.., batch, r)
    want_lb = np.einsum("...br,...r,...ro,...bo->...o", xa, d, b, cot)
    want_d = np.einsum("...br,...ro,...o,...bo->...r", xa, b, lb, cot)
    np.testing.assert_allclose(g.lambda_b, want_lb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.lambda_d, want_d, rtol=1e-4, atol=1e-4)


def test_training_never_moves_the_projections_and_compiles_once():
    _, _, frozen, trainable = _split()
    x = jnp.ones((2, 8))
    fn = lambda p, x: (x @ p["q"]["kernel"]) @ p["v"]["kernel"]  # noqa: E731
    opt = optax.adamw(0.1, weight_decay=0.5)  # weight decay would move any leaf it sees
    traces = []

    @jax.jit
    def step(tr, state):
        traces.append(1)  # runs once per trace: a projection taken as a leaf would retrace
        grads = jax.grad(lambda t: jnp.sum(lj.lora_apply(fn)(frozen, t, x) ** 2))(tr)
        updates, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, updates), state

    tr, state = trainable, opt.init(trainable)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count with floats
        for _ in range(3):
            tr, state = step(tr, state)
    assert len(traces) == 1
    assert tr["q"]["kernel"].a == trainable["q"]["kernel"].a
    assert not np.allclose(tr["q"]["kernel"].variant.lambda_b, 0)


def test_merge_unmerge_round_trip():
    params, _, frozen, trainable = _split(stacked=True)
    trainable = _perturb(trainable)
    merged = lj.merge(frozen, trainable)
    for name in ("q", "v"):
        w = _weight(params[name]["kernel"], trainable[name]["kernel"])
        np.testing.assert_allclose(merged[name]["kernel"], w, rtol=1e-5, atol=1e-5)
    back = lj.unmerge(merged, trainable)
    np.testing.assert_allclose(back["q"]["kernel"], params["q"]["kernel"], atol=1e-5)


def test_orbax_checkpoint_round_trip(tmp_path):
    _, rules, frozen, trainable = _split(stacked=True)
    trainable = _perturb(trainable)
    path = lj.save_adapters(tmp_path / "ckpt", trainable, rules=rules, base=frozen)
    for like in (None, jax.eval_shape(lambda: trainable)):
        back = lj.load_adapters(path, base=frozen, like=like)
        assert jax.tree.structure(back) == jax.tree.structure(trainable)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
            np.testing.assert_array_equal(x, y)
        assert back["q"]["kernel"].a == trainable["q"]["kernel"].a
    assert lj.checkpoint.read_info(path)["rules"] == rules


def test_factor_shardings_and_sharded_split():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    _, _, _, trainable = _split()
    s = lj.factor_shardings(
        {"q": {"kernel": P(None, "model")}, "v": {"kernel": P("model", None)}}, trainable
    )
    assert (s["q"]["kernel"].variant.lambda_b, s["q"]["kernel"].variant.lambda_d) == (
        P("model"),
        P(None),
    )
    assert isinstance(s["q"]["kernel"].a, Projection)  # frozen constants keep no sharding
    mesh = jax.make_mesh((2,), ("model",))
    params = jax.tree.map(
        lambda w: jax.device_put(w, NamedSharding(mesh, P(None, "model"))), _params()
    )
    rules = [lj.LoraRule(".*", rank=R, variant=lj.Vera())]
    _, sharded = lj.split(params, rules, key=jax.random.key(0))
    assert sharded["q"]["kernel"].variant.lambda_b.sharding.spec == P("model")
    _, plain = lj.split(_params(), rules, key=jax.random.key(0))
    assert sharded["q"]["kernel"].a == plain["q"]["kernel"].a


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: lj.LoraRule("w", rank=2, alpha=4, variant=lj.Vera()), ValueError, "drop alpha=4"),
        (lambda: lj.LoraRule("w", rank=2, rslora=True, variant=lj.Vera()), ValueError,
         "drop rslora"),
        (lambda: lj.LoraRule("w", rank=2, init="kaiming", variant=lj.Vera()), ValueError,
         "drop init"),
        (lambda: lj.LoraRule("w", rank=2, dora=True, variant=lj.Vera()), ValueError,
         "dora and vera cannot be combined"),
        (lambda: lj.Vera(seed=-1), ValueError, r"Vera\(seed=-1\) must be an int >= 0"),
        (lambda: lj.Vera(d_initial=float("nan")), ValueError, "d_initial=nan"),
        (lambda: lj.LoraRule("w", rank=2, variant="vera"), TypeError,
         "variant='vera' is not the config of a registered variant"),
        (lambda: lj.LoraRule("w", full=True, variant=lj.Vera()), ValueError,
         "full=True trains the leaf fully; drop vera"),
        (lambda: V.register(object()), TypeError, "register\\(\\) needs a named Variant"),
        (lambda: V.get("nope"), ValueError, "no variant 'nope' is registered"),
    ],
)  # fmt: skip
def test_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_banks_and_lora_exports_refuse_vera():
    _, _, _, trainable = _split()
    with pytest.raises(ValueError, match="these are VeRA factors"):
        lj.stack_adapters([trainable])


def test_corrupted_vera_checkpoint_is_refused(tmp_path):
    _, rules, frozen, trainable = _split()
    path = lj.save_adapters(tmp_path / "c", trainable, rules=rules, base=frozen)
    meta_file = path / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["leaves"][0]["arrays"]["vera_lambda_b"]["shape"] = [7]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"VeRA arrays .* do not fit a \[8, 3\], b \[3, 6\]"):
        lj.load_adapters(path, base=frozen)


# --- PEFT's VeRA tuner (tiny random BERT) -------------------------------------------------


@pytest.fixture(scope="module")
def peft_bert(tiny_bert_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = transformers.BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    return torch, peft, tiny_bert_dir, model


def test_peft_vera_loads_to_the_same_outputs(peft_bert, tmp_path):
    torch, peft, d, model = peft_bert
    config = peft.VeraConfig(r=4, target_modules=["query", "value", "dense"], save_projection=True)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():  # PEFT starts at lambda_b = 0; move every vector
        for n, p in pm.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    params, _ = bert.load(d)
    trainable = lj.peft.load_pretrained(tmp_path / "peft", params, key_map=bert.PEFT_KEY_MAP)
    q = trainable["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert isinstance(q.a, Projection) and q.variant.lambda_b.shape == (32,)
    ref = torch_outputs(pm)
    assert np.abs(ref - torch_outputs(model)).max() > 1e-2
    np.testing.assert_allclose(our_outputs(bert, d, params, trainable), ref, atol=TOL, rtol=0)


def test_ours_to_peft_vera_and_back(peft_bert, tmp_path):
    _, _, d, model = peft_bert
    params, _ = bert.load(d)
    rules = [lj.LoraRule(r".*/(query|value|dense)/kernel", rank=4, variant=lj.Vera(seed=3))]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _perturb(trainable)
    lj.peft.save_pretrained(tmp_path / "ours", trainable, key_map=bert.PEFT_KEY_MAP, rules=rules)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["save_projection"]) == ("VERA", 4, True)
    check_peft_loads(model, tmp_path / "ours", our_outputs(bert, d, frozen, trainable))
    back = lj.peft.load_pretrained(tmp_path / "ours", frozen, key_map=bert.PEFT_KEY_MAP)
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(x, y)
    q = back["encoder"]["layer_1"]["attention"]["query"]["kernel"]
    assert q.a == trainable["encoder"]["layer_1"]["attention"]["query"]["kernel"].a


def test_peft_vera_errors(peft_bert, tmp_path):
    _, _, d, _ = peft_bert
    params, _ = bert.load(d)
    rules = [lj.LoraRule(r".*/query/kernel", rank=4, variant=lj.Vera())]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    lj.peft.save_pretrained(tmp_path / "a", trainable, key_map=bert.PEFT_KEY_MAP)
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "save_projection": False}))
    with pytest.raises(ValueError, match="save_projection=False: the projections would come"):
        lj.peft.load_pretrained(tmp_path / "a", frozen, key_map=bert.PEFT_KEY_MAP)
    cfg_path.write_text(json.dumps({**cfg, "r": 5}))
    with pytest.raises(ValueError, match=r"do not fit the base weight .* with r=5"):
        lj.peft.load_pretrained(tmp_path / "a", frozen, key_map=bert.PEFT_KEY_MAP)
    for bad, match in (
        ({"r": 0}, "r=0 must be a positive int"),
        ({"vera_dropout": 1.5}, r"vera_dropout=1.5 must be a number in \[0, 1\)"),
    ):
        cfg_path.write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ValueError, match=match):
            lj.peft.load_pretrained(tmp_path / "a", frozen, key_map=bert.PEFT_KEY_MAP)
    cfg_path.write_text(json.dumps(cfg))
    # a key map that stores the weights (out, in) (Equinox): refused, never read transposed
    out_in = dataclasses.replace(
        bert.PEFT_KEY_MAP,
        entries=tuple(
            e._replace(layout="linear_out_in") if e.layout == "linear" else e
            for e in bert.PEFT_KEY_MAP.entries
        ),
    )
    with pytest.raises(ValueError, match=r"query/kernel': VeRA adapters load into \(in, out\)"):
        lj.peft.load_pretrained(tmp_path / "a", frozen, key_map=out_in)
    tensors = safetensors.numpy.load_file(tmp_path / "a" / "adapter_model.safetensors")
    del tensors["base_model.vera_B"]
    safetensors.numpy.save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"but no \['base_model.vera_B'\]; the file is incomplete"):
        lj.peft.load_pretrained(tmp_path / "a", frozen, key_map=bert.PEFT_KEY_MAP)
    # VeRA and LoRA factors cannot share one PEFT adapter, nor VeRA and fully trained leaves
    both = [rules[0], lj.LoraRule(r".*/value/kernel", rank=4)]
    _, t1 = lj.split(params, both, key=jax.random.key(0))
    with pytest.raises(ValueError, match="VeRA factors cannot share a PEFT adapter"):
        lj.peft.save_pretrained(tmp_path / "c", t1, key_map=bert.PEFT_KEY_MAP)
    # two seeds in one tree: PEFT has one pair of projections per adapter
    mixed = [
        lj.LoraRule(r".*/query/kernel", rank=4, variant=lj.Vera(seed=0)),
        lj.LoraRule(r".*/value/kernel", rank=4, variant=lj.Vera(seed=1)),
    ]
    _, t2 = lj.split(params, mixed, key=jax.random.key(0))
    with pytest.raises(ValueError, match="do not share one pair of projections"):
        lj.peft.save_pretrained(tmp_path / "b", t2, key_map=bert.PEFT_KEY_MAP)
