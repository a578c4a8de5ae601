"""GLoRA (Chavan et al., 2023) on the one code path: split, lora_apply, merge, checkpoints.

The reference is the authors' formula written out in torch float64, in torch's
``(out, in)`` layout, differentiated by torch autograd:
``F.linear(x, W0 + W0 * A + B, b0 + b0 * D + E + W0 @ C)``. Our float32 results must
match it to ``rtol = 1e-4``, ``atol = 1e-5`` (forward and every gradient).
"""

import dataclasses
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from cases import CASES, all_shapes
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

TOL = {"rtol": 1e-4, "atol": 1e-5}
CONFIGS = {
    "default": lj.Glora(),
    "lowrank-a": lj.Glora(a="lowrank", c="vector"),
    "scalars": lj.Glora(a="scalar", c="lowrank", d="scalar", e="scalar"),
    "b-only": lj.Glora(a="none", d="none", e="none"),
}


def _w(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) / 3, jnp.float32)


def _perturb(trainable, seed=0, scale=0.3):
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def _model(stacked):
    """Two tanh layers (scanned when stacked) with biases, and the rule that adapts them."""
    if stacked:
        params = {"layers": {"kernel": _w((2, 8, 8), 0), "bias": _w((2, 8), 1)}}

        def f(p, x):
            def body(h, layer):
                return jnp.tanh(h @ layer["kernel"] + layer["bias"]), None

            return jax.lax.scan(body, x, p["layers"])[0]

        return params, f, "layers/kernel"
    params = {
        "l0": {"kernel": _w((8, 12), 0), "bias": _w((12,), 1)},
        "l1": {"kernel": _w((12, 5), 2), "bias": _w((5,), 3)},
    }

    def f(p, x):
        h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        return h @ p["l1"]["kernel"] + p["l1"]["bias"]

    return params, f, "l./kernel"


def _torch_reference(params, trainable, x, c, stacked):
    """Output and gradients (by array name, our layout) of ``sum(f(x) * c)`` in float64."""
    t64 = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)  # noqa: E731
    names = ["layers"] if stacked else ["l0", "l1"]
    leaves = {}
    h = torch.tensor(np.asarray(x, np.float64))
    n_layers = 2 if stacked else 1
    for name in names:
        t = trainable[name]["kernel"]
        g = t.glora
        leaves[name] = {"a": t64(t.a), "b": t64(t.b)} | {k: t64(v) for k, v in g.arrays().items()}
        for layer in range(n_layers):
            pick = lambda v, i=layer: v[i] if stacked else v  # noqa: E731
            lv = {k: pick(v) for k, v in leaves[name].items()}
            w0 = torch.tensor(np.asarray(pick(params[name]["kernel"]), np.float64)).T  # (out, in)
            b0 = torch.tensor(np.asarray(pick(params[name]["bias"]), np.float64))
            s = t.scale
            B = s * (lv["a"] @ lv["b"]).T
            A = 0.0
            if g.forms[0] == "lowrank":
                A = s * (lv["scale_in"] @ lv["scale_out"]).T  # the authors' Ad @ Au
            elif g.forms[0] == "vector":
                A = lv["scale"][:, None]  # the authors' Ad[:, 0].unsqueeze(1)
            elif g.forms[0] == "scalar":
                A = lv["scale"]
            C = torch.zeros(w0.shape[1], dtype=torch.float64)
            if g.forms[1] == "vector":
                C = lv["prompt"]
            elif g.forms[1] == "lowrank":
                C = s * lv["prompt_in"] @ lv["prompt_out"]
            D = lv.get("bias_scale", 0.0)
            E = lv.get("bias_shift", 0.0)
            y = torch.nn.functional.linear(h, w0 + w0 * A + B, b0 + b0 * D + E + w0 @ C)
            h = torch.tanh(y) if (stacked or name == "l0") else y
    loss = (h * torch.tensor(np.asarray(c, np.float64))).sum()
    loss.backward()
    grads = {n: {k: v.grad.numpy() for k, v in lv.items()} for n, lv in leaves.items()}
    return h.detach().numpy(), grads


@pytest.mark.filterwarnings("error::lora_jax.LoraMaterializeWarning")
@pytest.mark.parametrize("stacked", [False, True], ids=["2d", "stacked"])
@pytest.mark.parametrize("mode", ["factored", "factored-jit", "materialized"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_matches_the_authors_formula_in_torch_float64(config, mode, stacked):
    params, f, pattern = _model(stacked)
    stack = (0,) if stacked else None
    rule = lj.LoraRule(pattern, rank=2, stack_axes=stack, glora=CONFIGS[config])
    frozen, trainable = lj.split(params, [rule], key=jax.random.key(0))
    trainable = _perturb(trainable)
    x, c = _w((4, 8), 7), _w((4, 8 if stacked else 5), 8)
    apply = lj.lora_apply(f, materialize=mode == "materialized")
    loss = lambda t: jnp.sum(apply(frozen, t, x) * c)  # noqa: E731
    run = jax.jit if mode == "factored-jit" else (lambda g: g)
    y = run(apply)(frozen, trainable, x)
    grads = run(jax.grad(loss))(trainable)
    y_ref, g_ref = _torch_reference(params, trainable, x, c, stacked)
    np.testing.assert_allclose(np.asarray(y), y_ref, **TOL)
    for name, ref in g_ref.items():
        got = grads[name]["kernel"]
        arrays = {"a": got.a, "b": got.b} | got.glora.arrays()
        assert set(arrays) == set(ref)
        for k, v in ref.items():
            np.testing.assert_allclose(np.asarray(arrays[k]), v, err_msg=f"{name}.{k}", **TOL)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_starts_at_the_base_and_merge_unmerge_round_trip(config):
    params, f, pattern = _model(False)
    frozen, trainable = lj.split(
        params, [lj.LoraRule(pattern, rank=2, glora=CONFIGS[config])], key=jax.random.key(0)
    )
    x = _w((4, 8), 7)
    y0 = f(params, x)
    np.testing.assert_array_equal(lj.lora_apply(f)(frozen, trainable, x), y0)
    trainable = _perturb(trainable)
    merged = lj.merge(frozen, trainable)
    factored = lj.lora_apply(f)(frozen, trainable, x)
    np.testing.assert_allclose(f(merged, x), factored, **TOL)
    assert not np.allclose(factored, y0, atol=1e-3), "the adapter must change the output"
    if CONFIGS[config].d != "none":  # the bias terms are folded into the bias leaf
        assert not np.allclose(merged["l0"]["bias"], params["l0"]["bias"])
    back = lj.unmerge(merged, trainable)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _mlp_step(frozen, materialize):
    def loss(params, x):
        h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"])
        return jnp.mean(h @ params["l1"]["kernel"] + params["l1"]["bias"])

    def step(trainable, x):
        grads = jax.grad(lambda t: lj.lora_apply(loss, materialize=materialize)(frozen, t, x))(
            trainable
        )
        return jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)

    return step


@pytest.mark.parametrize(
    "config, forms_weight",
    [("default", False), ("scalars", False), ("lowrank-a", True)],
    ids=["default", "scalars", "lowrank-a"],
)
def test_training_step_forms_a_weight_only_for_a_lowrank_a(config, forms_weight):
    params, _, pattern = _model(False)
    frozen, trainable = lj.split(
        params, [lj.LoraRule(pattern, rank=2, glora=CONFIGS[config])], key=jax.random.key(0)
    )
    x = _w((5, 3, 8), 9)
    shapes = {(8, 12), (12, 5)}
    factored = set(all_shapes(jax.make_jaxpr(_mlp_step(frozen, False))(trainable, x).jaxpr))
    assert bool(shapes & factored) == forms_weight
    merged = set(all_shapes(jax.make_jaxpr(_mlp_step(frozen, True))(trainable, x).jaxpr))
    assert shapes & merged, "the check must be able to fail"


@pytest.mark.filterwarnings("error::lora_jax.LoraMaterializeWarning")
@pytest.mark.parametrize("config", ["default", "lowrank-a"])
def test_quantised_base_matches_its_dequantised_merge(config):
    params = {"dense": {"kernel": _w((64, 32), 0), "bias": _w((32,), 1)}}
    f = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]  # noqa: E731
    rule = lj.LoraRule("dense/kernel", rank=4, glora=CONFIGS[config])
    frozen, trainable = lj.split(params, [rule], key=jax.random.key(0))
    frozen = lj.quantize(frozen, r".*/kernel")
    assert isinstance(frozen["dense"]["kernel"], lj.NF4Array)
    trainable = _perturb(trainable)
    x = _w((3, 64), 2)
    factored = jax.jit(lj.lora_apply(f))(frozen, trainable, x)
    np.testing.assert_allclose(factored, f(lj.merge(frozen, trainable), x), **TOL)


@pytest.mark.filterwarnings("error::lora_jax.LoraMaterializeWarning")
def test_conv_layer_applies_scale_and_bias_terms_per_output_channel():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(6, (3, 3))(x)

    x = _w((2, 5, 5, 3), 0)
    params = Net().init(jax.random.key(0), x)
    rule = lj.LoraRule(".*/kernel", rank=2, in_axes=(0, 1, 2), glora=lj.Glora(c="vector"))
    frozen, trainable = lj.split(params, [rule], key=jax.random.key(1))
    trainable = _perturb(trainable)
    factored = lj.lora_apply(Net().apply)(frozen, trainable, x)
    np.testing.assert_allclose(factored, Net().apply(lj.merge(frozen, trainable), x), **TOL)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(16)(x))
        return nn.Dense(2, use_bias=False)(x).sum(-1)


def test_linen_training_summary_and_checkpoint(tmp_path):
    x = _w((64, 4), 0)
    y = jnp.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2]
    params = _MLP().init(jax.random.key(0), x)
    rules = [lj.LoraRule(".*/kernel", rank=2, glora=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(1))
    forms = {
        p: t.glora.forms
        for p, t in lj._src.core.trees.leaves_with_paths(trainable)
        if t is not None
    }
    assert forms == {  # D and E only where a bias exists (the fixed configuration)
        "params/Dense_0/kernel": ("vector", "none", "vector", "vector"),
        "params/Dense_1/kernel": ("vector", "none", "none", "none"),
    }
    s = lj.summary(frozen, trainable)
    assert {r.kind for r in s.rows} == {"glora"}
    expected = (4 * 2 + 2 * 16 + 16 * 3) + (16 * 2 + 2 * 2 + 2)  # a, b, A, D, E per layer
    assert s.trainable_params == lj.count_params(trainable) == expected
    opt = optax.adam(0.05)
    loss = lambda t: jnp.mean((lj.lora_apply(_MLP().apply)(frozen, t, x) - y) ** 2)  # noqa: E731

    @jax.jit
    def step(t, state):
        value, grads = jax.value_and_grad(loss)(t)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grads, state, t)
        return optax.apply_updates(t, updates), state, value

    state, first = opt.init(trainable), float(loss(trainable))
    for _ in range(60):
        trainable, state, _ = step(trainable, state)
    assert float(loss(trainable)) < 0.5 * first
    path = lj.save_adapters(tmp_path / "glora", trainable, rules=rules, base=frozen, step=60)
    back = lj.load_adapters(path, base=frozen)
    assert jax.tree.structure(back) == jax.tree.structure(trainable)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert lj.checkpoint.read_info(path)["rules"] == rules


def test_sharded_split_places_every_part():
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    params = {"d": {"kernel": _w((8, 16), 0), "bias": _w((16,), 1)}}
    sharded = {"d": {"kernel": put(params["d"]["kernel"], "fsdp", "model"),
                     "bias": put(params["d"]["bias"], "model")}}  # fmt: skip
    rule = lj.LoraRule("d/kernel", rank=2, glora=lj.Glora(a="lowrank", c="vector"))
    _, t = lj.split(sharded, [rule], key=jax.random.key(0))
    _, ref = lj.split(params, [rule], key=jax.random.key(0))
    g = t["d"]["kernel"].glora
    specs = {n: x.sharding.spec for n, x in g.arrays().items()}
    assert specs == {
        "scale_in": P("fsdp", None),
        "scale_out": P(None, "model"),
        "prompt": P("fsdp"),
        "bias_scale": P("model"),
        "bias_shift": P("model"),
    }
    for got, want in zip(jax.tree.leaves(t), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_lora_plus_groups_glora_parts():
    params, _, pattern = _model(False)
    rule = lj.LoraRule(pattern, rank=2, glora=lj.Glora(a="lowrank", c="lowrank"))
    _, trainable = lj.split(params, [rule], key=jax.random.key(0))
    labels = lj.lora_plus_labels(trainable)["l0"]["kernel"].glora
    assert labels.arrays() == {
        "scale_in": "base",
        "scale_out": "fast",
        "prompt_in": "fast",
        "prompt_out": "base",
        "bias_scale": "fast",
        "bias_shift": "fast",
    }
    opt = lj.lora_plus(optax.sgd, 0.1, ratio=4.0)
    grads = jax.tree.map(jnp.ones_like, trainable)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = opt.update(grads, opt.init(trainable), trainable)
    g = updates["l0"]["kernel"].glora
    np.testing.assert_allclose(g.scale_in, -0.1)
    np.testing.assert_allclose(g.bias_shift, -0.4)


def _split(rule, params=None):
    params = params or _model(False)[0]
    return lj.split(params, [rule], key=jax.random.key(0))


def test_bias_terms_refuse_a_use_without_output_columns():
    """(The other GLoRA error messages are in the catalogue of tests/test_bad_inputs.py.)"""
    params, f, pattern = _model(False)
    frozen, trainable = _split(lj.LoraRule(pattern, rank=2, glora=True), params)
    # A weight whose bias terms reach a use with no output columns (a reduction) refuses.
    total = lj.lora_apply(lambda p, x: jnp.sum(p["l0"]["kernel"]) + f(p, x).sum())
    with pytest.raises(lj.LoraFactoringError, match="carries GLoRA bias terms"):
        total(frozen, trainable, _w((2, 8), 3))
    # Without bias terms the same use is materialised, with the usual warning.
    frozen, trainable = _split(
        lj.LoraRule(pattern, rank=2, glora=lj.Glora(d="none", e="none")), params
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total(frozen, _perturb(trainable), _w((2, 8), 3))
    assert any(issubclass(w.category, lj.LoraMaterializeWarning) for w in caught)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda g: g.update(forms=["vector", "none", "vector"]), "not valid GLoRA metadata"),
        (lambda g: g.update(forms=["diag", "none", "vector", "vector"]), "not valid GLoRA"),
        (lambda g: g.update(forms=["lowrank", "none", "vector", "vector"]), "do not fit forms"),
        (lambda g: g.update(bias_path=None), "do not fit forms"),
    ],
    ids=["short", "unknown-form", "arrays-differ", "bias-path"],
)
def test_corrupted_glora_metadata_is_refused(tmp_path, edit, match):
    params, _, pattern = _model(False)
    rules = [lj.LoraRule(pattern, rank=2, glora=True)]
    frozen, trainable = _split(rules[0], params)
    path = lj.save_adapters(tmp_path / "g", trainable, rules=rules, base=frozen)
    meta_file = path / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(next(e for e in meta["leaves"] if "glora" in e)["glora"])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        lj.load_adapters(path, base=frozen)


@pytest.mark.parametrize("a_form", ["vector", "scalar", "lowrank"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_weight_kind_factored_equals_materialized(case, a_form):
    """The conformance suite's weight kinds (no biases there: A and B only), values and grads."""
    k = jax.random.key(0)
    rules = [r if r.full else dataclasses.replace(r, glora=lj.Glora(a=a_form)) for r in case.rules]
    frozen, trainable = lj.split(case.params(k), rules, key=jax.random.fold_in(k, 7))
    trainable = _perturb(trainable)
    inputs = case.inputs(jax.random.fold_in(k, 9))

    def run(materialize):
        apply = lj.lora_apply(case.fn, materialize=materialize)
        loss = lambda t: jnp.sum(jnp.sin(apply(frozen, t, *inputs)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(trainable)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(False)
    warned = any(issubclass(w.category, lj.LoraMaterializeWarning) for w in caught)
    # Only a per-column scale of a weight that is also contracted over its columns (the tied
    # embedding's output projection) has to be materialised.
    assert warned == (case.name == "tied_embedding" and a_form != "lowrank")
    want = run(True)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_glora_arrays_without_their_metadata_are_refused(tmp_path):
    params, _, pattern = _model(False)
    rules = [lj.LoraRule(pattern, rank=2, glora=True)]
    frozen, trainable = _split(rules[0], params)
    path = lj.save_adapters(tmp_path / "g", trainable, rules=rules, base=frozen)
    meta_file = path / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del next(e for e in meta["leaves"] if "glora" in e)["glora"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has glora_\\* arrays but no glora metadata"):
        lj.load_adapters(path, base=frozen)
