"""Every weight kind x every variant against a float64 torch reference written from the papers.

The reference (:mod:`formulas`, :mod:`kinds`) shares no code with lora_jax: it reads only the
arrays that ``lj.split`` returns and the axes this file expects. Each case checks

* the merged weight (and GLoRA's merged bias) of ``lj.merge``,
* the forward output, factored (``lj.lora_apply``, eager and jit) and materialised,
* the gradients of every trainable array, factored and materialised,
* for PiSSA/OLoRA, the initial factors and residual of ``lj.split``.

Tolerances: float32 computations of O(1) values against float64, so about 1e-5 relative;
outputs are tanh values kept out of saturation (asserted), gradients compared relative to
their largest entry.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from formulas import F64, effective, olora, pissa
from kinds import KINDS

import lora_jax as lj

RANK, ALPHA = 2, 3.0
GLORA = {  # (A, C, D, E): together every form of every part
    "glora_lr_lr_vec_vec": ("lowrank", "lowrank", "vector", "vector"),
    "glora_vec_vec_sca_sca": ("vector", "vector", "scalar", "scalar"),
    "glora_sca_none_none_vec": ("scalar", "none", "none", "vector"),
    "glora_none_lr_vec_none": ("none", "lowrank", "vector", "none"),
}
VARIANTS = ["lora", "rslora", "dora", "adalora", *GLORA, "pissa", "olora"]
EAGER = ("lora", "dora", "glora_lr_lr_vec_vec")
GLORA_PARTS = ("scale", "scale_in", "scale_out", "prompt", "prompt_in", "prompt_out")
GLORA_BIAS = ("bias_scale", "bias_shift")


def _forms(kind, variant):
    forms = GLORA[variant]
    return forms if kind.has_bias else (forms[0], "none", "none", "none")


def _cases():
    return [
        pytest.param(k, v, id=f"{k.name}-{v}") for k in KINDS for v in VARIANTS if k in _kinds(v)
    ]


def _rule(kind, variant):
    kw = dict(rank=RANK, alpha=ALPHA, **kind.rule_axes())
    if variant == "rslora":
        kw["rslora"] = True
    elif variant in ("dora", "adalora"):
        kw[variant] = True
    elif variant in ("pissa", "olora"):
        kw["init"] = variant
    elif variant in GLORA:
        a, c, d, e = _forms(kind, variant)
        kw["glora"] = lj.Glora(a=a, c=c, d=d, e=e)
    return lj.LoraRule(kind.path, **kw)


def _scale(variant):
    return ALPHA / (math.sqrt(RANK) if variant == "rslora" else RANK)


def _w0_std(kind):
    return 0.6 if kind.name == "embedding" else 1.0 / math.sqrt(kind.layout.n_in)


def _params(kind, rng):
    lay = kind.layout
    w = (rng.standard_normal(lay.shape) * _w0_std(kind)).astype(np.float32)
    p = {"w": w}
    if kind.has_bias:
        p["bias"] = (rng.standard_normal(lay.sizes(lay.stack + lay.outs)) * 0.3).astype(np.float32)
    p = jax.tree.map(jnp.asarray, p)
    return {"layers": p} if kind.nested else p


def _layer(tree, kind):
    return tree["layers"] if kind.nested else tree


def _randomise(t, kind, variant, params, rng):
    """Random values for every trainable array, sized so the update is ~40% of W0."""
    s, lay = _scale(variant), kind.layout
    std = _w0_std(kind)
    normal = lambda shape, sd: jnp.asarray(rng.standard_normal(shape) * sd, jnp.float32)
    changes = {}
    if variant not in ("pissa", "olora"):
        changes["a"] = normal(t.a.shape, 1.0)
        changes["b"] = normal(t.b.shape, 0.4 * std / (s * math.sqrt(RANK)))
    else:  # keep the principal part, move it by ~10%
        changes["a"] = t.a * (1 + normal(t.a.shape, 0.1))
        changes["b"] = t.b * (1 + normal(t.b.shape, 0.1))
    if t.magnitude is not None:
        w = np.asarray(_layer(params, kind)["w"], np.float64)
        mats = np.transpose(w, lay.perm).reshape(lay.s, lay.n_in, lay.n_out)
        norms = np.linalg.norm(mats, axis=1).reshape(t.magnitude.shape)
        changes["magnitude"] = jnp.asarray(norms * (1 + rng.standard_normal(norms.shape) * 0.2),
                                           jnp.float32)  # fmt: skip
    if t.singular is not None:
        changes["singular"] = normal(t.singular.shape, 1.0)
        changes["b"] = normal(t.b.shape, 0.4 * std / (s * math.sqrt(RANK)))
    if t.glora is not None:
        g = t.glora
        gch = {}
        for name in GLORA_PARTS + GLORA_BIAS:
            x = getattr(g, name)
            if x is None:
                continue
            if name in ("scale_in", "prompt_in"):
                gch[name] = normal(x.shape, 1.0)
            elif name in ("scale_out", "prompt_out"):
                gch[name] = normal(x.shape, 0.2 / (s * math.sqrt(RANK)))
            else:
                gch[name] = normal(x.shape, 0.2)
        changes["glora"] = dataclasses.replace(g, **gch)
    return dataclasses.replace(t, **changes)


def _kinds(variant):
    """The kinds a variant applies to (a bias-free layer has no GLoRA bias forms)."""
    skip = lambda k: variant in GLORA and not k.has_bias and GLORA[variant][0] == "none"
    return [k for k in KINDS if not skip(k)]


@functools.cache
def _batch(variant, seed=0):
    """One split of every kind's layer (a subtree per kind) with random trainable values.

    All kinds go through one ``lj.split`` and one compiled step per mode: compiling is
    most of this suite's time.
    """
    rng = np.random.default_rng(seed)
    kinds = _kinds(variant)
    params = {k.name: _params(k, rng) for k in kinds}
    rules = [dataclasses.replace(_rule(k, variant), pattern=f"{k.name}/{k.path}") for k in kinds]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(seed))
    xs, cots = {}, {}
    for k in kinds:
        t = _layer(trainable[k.name], k)["w"]
        assert isinstance(t, lj.LoraFactors), k.name
        lay = k.layout
        assert (t.stack_axes, t.in_axes, t.out_axes) == (lay.stack, lay.ins, lay.outs), k.name
        assert t.a.shape == lay.sizes(lay.stack + lay.ins) + (RANK,)
        assert t.b.shape == lay.sizes(lay.stack) + (RANK,) + lay.sizes(lay.outs)
        _layer(trainable[k.name], k)["w"] = _randomise(t, k, variant, params[k.name], rng)
        xs[k.name] = jnp.asarray(k.make_input(rng))
        cots[k.name] = rng.standard_normal(np.shape(k.jax_fn(params[k.name], xs[k.name])))
    return params, frozen, trainable, xs, cots


def _all_kinds(p, xs):
    return {k.name: k.jax_fn(p[k.name], xs[k.name]) for k in KINDS if k.name in xs}


@functools.cache
def _case(kind, variant):
    """One kind's (params, frozen, trainable, x, cot, float64 reference) from the batch."""
    params, frozen, trainable, xs, cots = _batch(variant)
    n = kind.name
    p, f, t, x, cot = params[n], frozen[n], trainable[n], xs[n], cots[n]
    return p, f, t, x, cot, _reference(kind, variant, p, t, x, cot)


def _base_w0(kind, variant, params):
    """W0 the formulas start from: the weight, or the PiSSA/OLoRA residual (float64)."""
    w = np.asarray(_layer(params, kind)["w"], np.float64)
    if variant not in ("pissa", "olora"):
        return w
    lay = kind.layout
    a, b = pissa(w, lay, RANK, _scale(variant)) if variant == "pissa" else olora(w, lay, RANK)
    mats = np.transpose(w, lay.perm).reshape(lay.s, lay.n_in, lay.n_out)
    residual = mats - _scale(variant) * a @ b
    full = residual.reshape(lay.sizes(lay.stack) + lay.sizes(lay.ins) + lay.sizes(lay.outs))
    return np.transpose(full, [lay.perm.index(i) for i in range(len(lay.shape))])


def _torch_parts(t):
    names = {"a": t.a, "b": t.b, "magnitude": t.magnitude, "singular": t.singular}
    if t.glora is not None:
        names.update({n: getattr(t.glora, n) for n in GLORA_PARTS + GLORA_BIAS})
    return {
        n: torch.tensor(np.asarray(x, np.float64), dtype=F64, requires_grad=True)
        for n, x in names.items()
        if x is not None
    }


def _reference(kind, variant, params, trainable, x, cot):
    """(output, {array name: gradient}, effective weight, effective bias) in float64."""
    t = _layer(trainable, kind)["w"]
    parts = _torch_parts(t)
    w0 = torch.tensor(_base_w0(kind, variant, params), dtype=F64)
    bias0 = None
    if kind.has_bias:
        bias0 = torch.tensor(np.asarray(_layer(params, kind)["bias"], np.float64), dtype=F64)
    forms = _forms(kind, variant) if variant in GLORA else None
    formula = "glora" if variant in GLORA else variant
    w, bias = effective(kind.layout, w0, parts, formula, _scale(variant), bias0, forms)
    xt = torch.tensor(np.asarray(x, np.float64)) if x.dtype != np.int32 else np.asarray(x)
    out = kind.torch_fn(w, bias, xt)
    (out * torch.tensor(cot, dtype=F64)).sum().backward()
    grads = {n: p.grad.numpy() for n, p in parts.items()}
    return out.detach().numpy(), grads, w.detach().numpy(), None if bias is None else bias.detach()


def _grads_of(t):
    g = {"a": t.a, "b": t.b, "magnitude": t.magnitude, "singular": t.singular}
    if t.glora is not None:
        g.update({n: getattr(t.glora, n) for n in GLORA_PARTS + GLORA_BIAS})
    return {n: np.asarray(x) for n, x in g.items() if x is not None}


CASES = _cases()


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_merge_matches_reference(kind, variant):
    _, _, _, _, _, (_, _, w_ref, bias_ref) = _case(kind, variant)
    merged = _layer(_merged(variant)[kind.name], kind)
    np.testing.assert_allclose(merged["w"], w_ref, rtol=1e-5, atol=1e-6)
    if bias_ref is not None:
        np.testing.assert_allclose(merged["bias"], bias_ref.numpy(), rtol=1e-5, atol=1e-6)


@functools.cache
def _run_batch(variant, materialize):
    """Outputs and gradients of every kind (one jitted vjp) in one mode."""
    _, frozen, trainable, xs, cots = _batch(variant)
    apply = lj.lora_apply(_all_kinds, materialize=materialize)

    def out_and_grads(frozen, trainable, xs, cots):
        out, vjp = jax.vjp(lambda t: apply(frozen, t, xs), trainable)
        return out, vjp(cots)[0]

    cots = {n: jnp.asarray(c, jnp.float32) for n, c in cots.items()}
    return jax.jit(out_and_grads)(frozen, trainable, xs, cots)


@functools.cache
def _merged(variant):
    _, frozen, trainable, _, _ = _batch(variant)
    return lj.merge(frozen, trainable)


@functools.cache
def _eager(variant, materialize):
    _, frozen, trainable, xs, _ = _batch(variant)
    return lj.lora_apply(_all_kinds, materialize=materialize)(frozen, trainable, xs)


def _run(kind, variant, materialize):
    out, grads = _run_batch(variant, materialize)
    return np.asarray(out[kind.name]), _grads_of(_layer(grads[kind.name], kind)["w"])


MODES = [False, True]
MODE_IDS = ["factored", "materialised"]


@pytest.mark.parametrize(("kind", "variant"), CASES)
@pytest.mark.parametrize("materialize", MODES, ids=MODE_IDS)
def test_forward_matches_reference(kind, variant, materialize):
    params, _, _, x, _, (ref, _, _, _) = _case(kind, variant)
    # Not saturated (at least 80% of the tanh outputs below 0.9): a wrong value moves them.
    assert np.mean(np.abs(ref) < 0.9) > 0.8, np.mean(np.abs(ref) < 0.9)
    base = np.asarray(kind.jax_fn(params, x))
    assert np.abs(ref - base).max() > 0.05  # the adapter changes the output
    out, _ = _run(kind, variant, materialize)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    if variant in EAGER:  # eager calls (the interpreter op by op) are slow; a few suffice
        out = _eager(variant, materialize)[kind.name]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg="eager")


@pytest.mark.parametrize(("kind", "variant"), CASES)
@pytest.mark.parametrize("materialize", MODES, ids=MODE_IDS)
def test_gradients_match_reference(kind, variant, materialize):
    _, _, _, _, _, (_, ref, _, _) = _case(kind, variant)
    _, grads = _run(kind, variant, materialize)
    assert sorted(grads) == sorted(ref)
    for name, r in ref.items():
        scale = float(np.abs(r).max())
        assert scale > 1e-6, name  # every array gets a gradient
        np.testing.assert_allclose(grads[name] / scale, r / scale, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_init_matches_reference(kind, init):
    rng = np.random.default_rng(1)
    params = _params(kind, rng)
    frozen, trainable = lj.split(params, [_rule(kind, init)], key=jax.random.key(1))
    t = _layer(trainable, kind)["w"]
    lay, s = kind.layout, _scale(init)
    w = np.asarray(_layer(params, kind)["w"], np.float64)
    a_ref, b_ref = pissa(w, lay, RANK, s) if init == "pissa" else olora(w, lay, RANK)
    a = np.asarray(t.a, np.float64).reshape(a_ref.shape)
    b = np.asarray(t.b, np.float64).reshape(b_ref.shape)
    # Singular vectors (and QR columns) are defined up to a sign shared by a[:, i] and b[i].
    sign = np.sign(np.einsum("sir,sir->sr", a, a_ref))
    np.testing.assert_allclose(a * sign[:, None, :], a_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b * sign[:, :, None], b_ref, rtol=1e-4, atol=1e-5)
    residual = np.asarray(_layer(frozen, kind)["w"], np.float64)
    np.testing.assert_allclose(residual, _base_w0(kind, init, params), rtol=1e-4, atol=1e-5)
    # At init the adapted layer is the original one.
    x = jnp.asarray(kind.make_input(rng))
    out = lj.lora_apply(kind.jax_fn)(frozen, trainable, x)
    np.testing.assert_allclose(out, kind.jax_fn(params, x), rtol=1e-5, atol=2e-5)
