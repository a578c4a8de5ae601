"""LoRA variants on the one code path: rsLoRA, DoRA, AdaLoRA, PiSSA/OLoRA inits, LoRA+.

Each variant is checked against a dense float64 numpy reference (forward and gradient;
float32 results to ``rtol = 1e-4``, ``atol = 1e-5``), for conformance (identity at init,
factored == materialized, merge/unmerge, jit), and against PEFT where PEFT implements it
(outputs to ``1e-4``, as in test_peft.py).
"""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.models import bert, gpt

sys.path.insert(0, str(Path(__file__).parents[1]))
from cases import all_shapes  # noqa: E402
from peft_helpers import check_peft_loads, our_outputs, torch_outputs  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-5}
PEFT_TOL = 1e-4
VARIANTS = {
    "lora": {},
    "rslora": {"rslora": True},
    "dora": {"dora": True},
    "dora-rslora": {"dora": True, "rslora": True},
    "adalora": {"adalora": True},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
}


def _perturb(trainable, seed=0, scale=0.3):
    """Every factor array moved by noise, so no variant sits at its initial point."""
    key = jax.random.key(seed)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def _weights(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- the float64 reference: W = m * V / ||V||, V = W0 + s * a @ diag(lambda) @ b -------------


def _np(t):
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    return f(t.a), f(t.b), f(t.singular), f(t.magnitude)


def _ref_weight(w0, t):
    a, b, sing, mag = _np(t)
    b_eff = b if sing is None else sing[..., :, None] * b
    v = np.asarray(w0, np.float64) + t.scale * a @ b_eff
    if mag is None:
        return v, v, None
    norm = np.linalg.norm(v, axis=-2, keepdims=True)
    return mag[..., None, :] * v / norm, v, norm


def _ref_grads(w0, t, x, c):
    """Gradients of ``sum((x @ W) * c)`` w.r.t. the factors; the DoRA norm is a constant."""
    a, b, sing, mag = _np(t)
    g = np.swapaxes(np.asarray(x, np.float64), -1, -2) @ np.asarray(c, np.float64)  # dL/dW
    _, v, norm = _ref_weight(w0, t)
    out = {}
    if mag is not None:
        out["magnitude"] = np.sum(g * v, axis=-2) / norm[..., 0, :]
        g = g * mag[..., None, :] / norm
    b_eff = b if sing is None else sing[..., :, None] * b
    out["a"] = t.scale * g @ np.swapaxes(b_eff, -1, -2)
    d_beff = t.scale * np.swapaxes(a, -1, -2) @ g
    out["b"] = d_beff if sing is None else sing[..., :, None] * d_beff
    if sing is not None:
        out["singular"] = np.sum(b * d_beff, axis=-1)
    return out


def _stacked_fn(p, x):  # x (L, batch, in), w (L, in, out): each layer its own matmul
    return jnp.einsum("lbi,lio->lbo", x, p["w"])


def _plain_fn(p, x):
    return x @ p["w"]


# Every variant stays factored, stacked weights in a batched dot_general included.
@pytest.mark.filterwarnings("error::lora_jax.LoraMaterializeWarning")
@pytest.mark.parametrize("stacked", [False, True], ids=["2d", "stacked"])
@pytest.mark.parametrize(
    "jit, materialize",
    [(False, False), (True, False), (True, True)],
    ids=["eager", "jit", "jit-materialized"],
)
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_forward_and_gradient_match_float64(variant, jit, materialize, stacked):
    shape, fn = ((3, 12, 10), _stacked_fn) if stacked else ((12, 10), _plain_fn)
    rule = lj.LoraRule("w", rank=4, alpha=6.0, stack_axes=(0,) if stacked else None)
    rule = dataclasses.replace(rule, **VARIANTS[variant])
    w = _weights(shape)
    frozen, trainable = lj.split({"w": w}, rule, key=jax.random.key(0))
    trainable = _perturb(trainable)
    x = _weights(shape[:-2] + (5, 12), seed=1)
    c = _weights(shape[:-2] + (5, 10), seed=2)
    apply = lj.lora_apply(fn, materialize=materialize)
    loss = lambda t: jnp.sum(apply(frozen, t, x) * c)  # noqa: E731
    value_and_grad = jax.value_and_grad(loss)
    if jit:
        value_and_grad = jax.jit(value_and_grad)
    value, grads = value_and_grad(trainable)
    t = trainable["w"]
    w_ref, _, _ = _ref_weight(frozen["w"], t)
    want = np.sum((np.asarray(x, np.float64) @ w_ref) * np.asarray(c, np.float64))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    for name, ref in _ref_grads(frozen["w"], t, x, c).items():
        np.testing.assert_allclose(np.asarray(getattr(grads["w"], name)), ref, **TOL)


@pytest.mark.filterwarnings("error::lora_jax.LoraMaterializeWarning")
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_starts_at_the_base_and_merge_unmerge_round_trip(variant):
    rule = dataclasses.replace(lj.LoraRule("w", rank=3), **VARIANTS[variant])
    w = _weights((3, 16, 8))
    rule = dataclasses.replace(rule, stack_axes=(0,))
    frozen, trainable = lj.split({"w": w}, rule, key=jax.random.key(1))
    x = _weights((3, 4, 16), seed=3)
    out = jax.jit(lj.lora_apply(_stacked_fn))(frozen, trainable, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_stacked_fn({"w": w}, x)), **TOL)
    np.testing.assert_allclose(np.asarray(lj.merge(frozen, trainable)["w"]), w, **TOL)
    trained = _perturb(trainable, seed=4)
    norms = lj.dora_norms(frozen, trained)
    merged = jax.jit(lj.merge)(frozen, trained)
    back = lj.unmerge(merged, trained, dora_norms=norms)
    np.testing.assert_allclose(np.asarray(back["w"]), np.asarray(frozen["w"]), atol=2e-5)


def test_rslora_scale_is_alpha_over_sqrt_rank():
    _, t = lj.split({"w": _weights((8, 8))}, lj.LoraRule("w", rank=4, alpha=6, rslora=True),
                    key=jax.random.key(0))  # fmt: skip
    assert t["w"].scale == 3.0 and lj.LoraRule("w", rank=4, alpha=6).scale == 1.5


def test_dora_step_never_forms_an_adapted_weight():
    cfg = gpt.Config(vocab=50, d_model=24, n_heads=3, d_ff=40, n_layers=2, max_len=16)
    params = gpt.init(jax.random.key(0), cfg)
    rules = [lj.LoraRule(gpt.LORA_TARGETS, rank=4, stack_axes=(0,), dora=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, cfg.vocab)
    opt = optax.sgd(1e-2)

    def step(trainable, state):
        loss, grads = jax.value_and_grad(lambda t: lj.lora_apply(gpt.loss)(frozen, t, cfg, tokens))(
            trainable
        )
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    adapted = set()
    for _, t in lj._src.core.trees.leaves_with_paths(trainable):
        if isinstance(t, lj.LoraFactors):
            adapted |= {t.shape, t.shape[1:]}
    jaxpr = jax.make_jaxpr(step)(trainable, opt.init(trainable)).jaxpr
    assert not adapted & set(all_shapes(jaxpr))
    merged_step = jax.make_jaxpr(
        lambda t: jax.grad(lambda t: lj.lora_apply(gpt.loss, materialize=True)(frozen, t, cfg,
                                                                             tokens))(t)
    )(trainable).jaxpr  # fmt: skip
    assert adapted & set(all_shapes(merged_step)), "the check must be able to fail"


# --- PiSSA / OLoRA initialisation -----------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"], ids=str)
@pytest.mark.parametrize(
    "shape, extra",
    [
        ((12, 10), {}),
        ((3, 12, 10), {"stack_axes": (0,)}),
        ((12, 2, 5), {"in_axes": (0,)}),
        ((2, 3, 4, 10), {"stack_axes": (0,), "in_axes": (1, 2)}),
    ],
    ids=["2d", "stacked", "multi-out", "stacked-multi-in"],
)
def test_principal_init_keeps_the_original_weights(init, shape, extra):
    w = _weights(shape)
    rule = lj.LoraRule("w", rank=3, init=init, **extra)
    frozen, trainable = jax.jit(lambda p: lj.split(p, rule, key=jax.random.key(0)))({"w": w})
    assert float(jnp.abs(frozen["w"] - w).max()) > 0.1  # the base changed
    np.testing.assert_allclose(np.asarray(lj.merge(frozen, trainable)["w"]), w, atol=1e-5)


def _matrices(w, stack):
    w = np.asarray(w, np.float64)
    return w.reshape((-1,) + w.shape[stack:]) if stack else w[None]


@pytest.mark.parametrize("stacked", [False, True], ids=["2d", "stacked"])
def test_pissa_is_the_top_r_svd(stacked):
    shape, r, alpha = ((3, 14, 9) if stacked else (14, 9)), 4, 6.0
    w = _weights(shape)
    rule = lj.LoraRule("w", rank=r, alpha=alpha, init="pissa", stack_axes=(0,) if stacked else None)
    frozen, trainable = lj.split({"w": w}, rule, key=jax.random.key(0))
    t = trainable["w"]
    a, b = _matrices(t.a, stacked), _matrices(t.b, stacked)
    for i, m in enumerate(_matrices(w, stacked)):
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        top = (u[:, :r] * s[:r]) @ vt[:r]
        np.testing.assert_allclose(t.scale * a[i] @ b[i], top, atol=1e-5)
        # a = U_r sqrt(S_r / scale): a^T a = diag(S_r) / scale
        np.testing.assert_allclose(a[i].T @ a[i], np.diag(s[:r]) / t.scale, atol=1e-4)
        res = np.linalg.svd(_matrices(frozen["w"], stacked)[i], compute_uv=False)
        np.testing.assert_allclose(res[: len(s) - r], s[r:], atol=1e-4)


def test_pissa_niter_approximates_the_svd_of_a_decaying_spectrum():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    s = 2.0 ** -np.arange(30)
    w = jnp.asarray((u[:, :30] * s) @ v.T, jnp.float32)
    exact = lj.split({"w": w}, lj.LoraRule("w", rank=4, init="pissa"), key=jax.random.key(0))
    fast = lj.split({"w": w}, lj.LoraRule("w", rank=4, init="pissa_niter_4"),
                    key=jax.random.key(0))  # fmt: skip
    # error of 4 power iterations with no oversampling: ~ (s5 / s4)^9 * s5 = 2^-9 * 2^-4
    np.testing.assert_allclose(np.asarray(fast[0]["w"]), np.asarray(exact[0]["w"]), atol=2e-4)
    assert float(jnp.linalg.norm(fast[0]["w"] - w)) > 0.9  # the top part (s1 = 1) moved out


@pytest.mark.parametrize("stacked", [False, True], ids=["2d", "stacked"])
def test_olora_is_the_qr_of_the_torch_layout(stacked):
    shape, r = ((2, 10, 12) if stacked else (10, 12)), 3
    w = _weights(shape)
    rule = lj.LoraRule("w", rank=r, init="olora", stack_axes=(0,) if stacked else None)
    _, trainable = lj.split({"w": w}, rule, key=jax.random.key(0))
    t = trainable["w"]
    a, b = _matrices(t.a, stacked), _matrices(t.b, stacked)
    for i, m in enumerate(_matrices(w, stacked)):
        q, rr = np.linalg.qr(m.T)  # torch layout (out, in) = Q R
        sign = np.sign(np.diag(rr)[:r]) * np.sign(np.diag(a[i].T[:, :r]))  # LAPACK sign choice
        np.testing.assert_allclose(a[i], (rr[:r] * sign[:, None]).T, atol=1e-5)
        np.testing.assert_allclose(b[i], (q[:, :r] * sign).T, atol=1e-5)


def test_principal_init_with_dora_keeps_the_original_weights():
    w = _weights((12, 10))
    rule = lj.LoraRule("w", rank=3, init="pissa", dora=True)
    frozen, trainable = lj.split({"w": w}, rule, key=jax.random.key(0))
    np.testing.assert_allclose(trainable["w"].magnitude, np.linalg.norm(w, axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lj.merge(frozen, trainable)["w"]), w, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_principal_to_lora_applies_to_the_original_weights(rslora):
    w = _weights((3, 12, 10))
    rule = lj.LoraRule("w|v", rank=3, init="olora", stack_axes=(0,), rslora=rslora)
    params = {"w": w, "v": _weights((3, 12, 10), seed=5)}
    frozen, initial = lj.split(params, [rule], key=jax.random.key(0))
    trained = _perturb(initial, seed=1, scale=0.05)
    plain = lj.principal_to_lora(initial, trained)
    assert plain["w"].rank == 6 and plain["w"].scale == pytest.approx(trained["w"].scale)
    want = lj.merge(frozen, trained)
    got = lj.merge(params, plain)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-5)
    plain_rule = lj.LoraRule("w", rank=2, init="kaiming", stack_axes=(0,))
    kaiming = lj.split(params, plain_rule, key=jax.random.key(0))[1]
    assert lj.principal_to_lora(kaiming, kaiming)["w"] is kaiming["w"]


def test_kaiming_matches_peft_default_init():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=["0"]))
    theirs = pm.base_model.model[0].lora_A["default"].weight.detach().numpy().T  # (in, r)
    _, t = lj.split({"w": _weights((256, 64))}, lj.LoraRule("w", rank=16, init="kaiming"),
                    key=jax.random.key(0))  # fmt: skip
    ours = np.asarray(t["w"].a)
    bound = 1 / np.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    for x in (ours, theirs):
        assert x.shape == (256, 16) and 0.98 * bound < np.abs(x).max() <= bound
        np.testing.assert_allclose(x.std(), bound / np.sqrt(3), rtol=0.05)
        np.testing.assert_allclose(np.quantile(x, [0.25, 0.75]), [-bound / 2, bound / 2],
                                   atol=0.05 * bound)  # fmt: skip
    assert not np.any(np.asarray(t["w"].b))


# --- LoRA+ -----------------------------------------------------------------------------------


def _mixed_trainable():
    params = {
        "q": _weights((8, 6)),
        "d": _weights((8, 6), 1),
        "s": _weights((8, 6), 2),
        "head": _weights((6, 2), 3),
        "bias": jnp.zeros(2),
    }
    rules = [
        lj.LoraRule("q", rank=2),
        lj.LoraRule("d", rank=2, dora=True),
        lj.LoraRule("s", rank=2, adalora=True),
        lj.LoraRule("head|bias", full=True),
    ]
    return lj.split(params, rules, key=jax.random.key(0))


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
def test_lora_plus_update_sizes(schedule):
    _, trainable = _mixed_trainable()
    lr = optax.constant_schedule(0.01) if schedule else 0.01
    opt = lj.lora_plus(optax.sgd, lr, ratio=16)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = jax.jit(opt.update)(grads, opt.init(trainable), trainable)
    fast, base = -0.16, -0.01
    expect = {
        "q": {"a": base, "b": fast},
        "d": {"a": base, "b": fast, "magnitude": fast},
        "s": {"a": base, "b": fast, "singular": base},
    }
    for leaf, fields in expect.items():
        for name, want in fields.items():
            np.testing.assert_allclose(getattr(updates[leaf], name), want, rtol=1e-6)
    np.testing.assert_allclose(updates["head"], base, rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], base, rtol=1e-6)


def test_lora_plus_with_adamw_first_step():
    _, trainable = _mixed_trainable()
    opt = lj.lora_plus(lambda lr: optax.adamw(lr, weight_decay=0.0), 1e-3, ratio=4)
    grads = _perturb(jax.tree.map(jnp.zeros_like, trainable), seed=3)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float scalars
        updates, _ = opt.update(grads, opt.init(trainable), trainable)
    # Adam's first step is lr * sign(g) (up to eps): |update| = lr for a, ratio * lr for b
    np.testing.assert_allclose(np.abs(updates["q"].a), 1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.abs(updates["q"].b), 4e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ratio": 0}, ValueError, "ratio=0 must be a finite number > 0"),
        ({"ratio": float("inf")}, ValueError, "ratio=inf must be a finite number > 0"),
        ({"ratio": True}, ValueError, "ratio=True must be"),
        ({"optimizer": "adam"}, TypeError, "optimizer must build a transformation"),
    ],
    ids=["zero", "inf", "bool", "not-callable"],
)
def test_lora_plus_errors(kwargs, error, match):
    args = {"optimizer": optax.sgd, "learning_rate": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        lj.lora_plus(args.pop("optimizer"), args.pop("learning_rate"), **args)


# --- AdaLoRA -----------------------------------------------------------------------------------


def _np_orth(trainable, squared):
    terms = []
    for _, t in lj._src.core.trees.leaves_with_paths(trainable):
        if not (isinstance(t, lj.LoraFactors) and t.singular is not None):
            continue
        ns = len(t.stack_axes)
        p = np.asarray(t.a, np.float64).reshape((-1, int(np.prod(t.a.shape[ns:-1])), t.rank))
        q = np.asarray(t.b, np.float64).reshape((-1, t.rank, int(np.prod(t.b.shape[ns + 1 :]))))
        for i in range(p.shape[0]):
            for gram in (p[i].T @ p[i], q[i] @ q[i].T):
                sq = np.sum((gram - np.eye(t.rank)) ** 2)
                terms.append(sq if squared else np.sqrt(sq))
    return np.sum(terms) if squared else np.mean(terms)


@pytest.mark.parametrize("squared", [True, False], ids=["paper", "peft"])
def test_orthogonal_regularizer_matches_float64(squared):
    params = {"s": _weights((2, 8, 6)), "m": _weights((8, 2, 3)), "q": _weights((8, 6))}
    rules = [
        lj.LoraRule("s", rank=3, adalora=True, stack_axes=(0,)),
        lj.LoraRule("m", rank=2, adalora=True, in_axes=(0,)),
        lj.LoraRule("q", rank=2),
    ]
    _, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _perturb(trainable, scale=0.4)
    fn = jax.jit(lambda t: lj.orthogonal_regularizer(t, squared=squared))
    np.testing.assert_allclose(float(fn(trainable)), _np_orth(trainable, squared), rtol=1e-5)
    grads = jax.grad(fn)(trainable)
    assert np.all(np.isfinite(np.asarray(grads["s"].a))) and not np.any(grads["q"].a)


def test_orthogonal_regularizer_is_zero_for_orthonormal_factors():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((8, 8)))
    t = lj.LoraFactors(
        a=jnp.asarray(q[:, :3], jnp.float32),
        b=jnp.eye(3, 6),
        alpha=1.0,
        stack_axes=(),
        in_axes=(0,),
        out_axes=(1,),
        singular=jnp.ones(3),
    )
    assert float(lj.orthogonal_regularizer({"w": t})) < 1e-10
    g = jax.grad(lambda t: lj.orthogonal_regularizer(t, squared=False))({"w": t})
    assert np.all(np.isfinite(np.asarray(g["w"].a)))


def _adalora_problem():
    params = {"s": _weights((2, 8, 6)), "m": _weights((8, 6), 1), "q": _weights((8, 6), 2)}
    rules = [
        lj.LoraRule("s", rank=4, adalora=True, stack_axes=(0,)),
        lj.LoraRule("m", rank=4, adalora=True),
        lj.LoraRule("q", rank=2),
    ]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))

    def fn(p, x):
        h = jnp.tanh(x @ p["s"][0]) + jnp.tanh(x @ p["m"])
        return jnp.tanh(h @ p["s"][1].T) @ p["q"]

    return frozen, trainable, fn


def test_adalora_training_prunes_to_budget_without_recompiling():
    frozen, trainable, fn = _adalora_problem()
    alloc = lj.RankAllocator(target_rank=2, total_steps=14, tinit=2, tfinal=4, delta_t=2)
    opt = optax.adam(3e-2)
    x, y = _weights((16, 8), 3), _weights((16, 6), 4)
    traces = []

    def step(t, opt_state, alloc_state):
        traces.append(1)
        loss_fn = lambda t: (  # noqa: E731
            jnp.mean((lj.lora_apply(fn)(frozen, t, x) - y) ** 2)
            + 0.1 * lj.orthogonal_regularizer(t)
        )
        loss, grads = jax.value_and_grad(loss_fn)(t)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update(grads, opt_state, t)
        t = optax.apply_updates(t, updates)
        t, alloc_state = alloc.update(t, grads, alloc_state)
        return t, opt_state, alloc_state, loss

    step = jax.jit(step)
    t, opt_state, state = trainable, opt.init(trainable), alloc.init(trainable)
    budgets, mask_now = alloc.schedule(12, 6)
    for i in range(18):
        t, opt_state, state, _ = step(t, opt_state, state)
        kept = sum(sum(v) for v in alloc.rank_pattern(state).values())
        if i > alloc.tinit and (i >= 10 or mask_now[i]):
            assert kept == budgets[min(i, 14)], (i, kept)
        nonzero = sum(int(np.count_nonzero(t[k].singular)) for k in ("s", "m"))
        if i >= 10:  # final phase: the fixed mask is reapplied every step
            assert nonzero == kept == 6
    assert len(traces) == 1
    assert int(state.step) == 18 and t["q"].singular is None


def test_adalora_schedule_shape():
    alloc = lj.RankAllocator(target_rank=2, total_steps=20, tinit=4, tfinal=5, delta_t=3)
    budget, mask_now = alloc.schedule(40, 10)
    assert list(budget[:5]) == [40] * 5 and list(budget[15:]) == [10] * 6
    assert np.all(np.diff(budget) <= 0) and not mask_now[:5].any() and mask_now[16:].all()
    # cubic: b(t) = int(30 * (1 - (t - 4) / 11) ** 3 + 10)
    assert budget[9] == int(30 * (1 - 5 / 11) ** 3 + 10) and mask_now[9] and not mask_now[10]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_rank": 0}, "target_rank=0 must be an int >= 1"),
        ({"total_steps": 2.5}, "total_steps=2.5 must be an int >= 1"),
        ({"delta_t": True}, "delta_t=True must be an int >= 1"),
        ({"tinit": -1}, "tinit=-1 must be an int >= 0"),
        ({"tinit": 6, "tfinal": 4}, "tinit=6 >= total_steps - tfinal = 6 leaves no budgeting"),
        ({"beta1": 1.0}, r"beta1=1.0 must be in \(0, 1\)"),
        ({"beta2": "x"}, r"beta2='x' must be in \(0, 1\)"),
    ],
    ids=["target", "total", "delta-bool", "tinit", "no-phase", "beta1", "beta2"],
)
def test_rank_allocator_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.RankAllocator(**{"target_rank": 2, "total_steps": 10, **kwargs})


def test_rank_allocator_tree_errors():
    _, plain = lj.split({"w": _weights((8, 6))}, lj.LoraRule("w", rank=2), key=jax.random.key(0))
    alloc = lj.RankAllocator(target_rank=3, total_steps=10)
    with pytest.raises(ValueError, match="no AdaLoRA leaves .* adalora=True"):
        alloc.init(plain)
    with pytest.raises(ValueError, match="no AdaLoRA leaves"):
        lj.orthogonal_regularizer(plain)
    _, ada = lj.split({"w": _weights((8, 6))}, lj.LoraRule("w", rank=2, adalora=True),
                      key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="'w' has rank 2 < target_rank=3; AdaLoRA only prunes"):
        alloc.init(ada)


# --- rule / split errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init": "pissa_niter_x"}, "init='pissa_niter_x' is not one of"),
        ({"init": "pissa", "adalora": True}, "adalora uses its own init .* drop init='pissa'"),
    ],
    ids=["bad-niter", "adalora-pissa"],
)
def test_rule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lj.LoraRule("w", rank=2, **kwargs)


def test_principal_init_of_a_quantised_base_raises():
    params = {"w": lj.quantize_nf4(_weights((64, 64)))}
    with pytest.raises(TypeError, match="'w' is quantised but init='olora' replaces the base"):
        lj.split(params, lj.LoraRule("w", rank=2, init="olora"), key=jax.random.key(0))


def test_principal_to_lora_errors():
    rule = lj.LoraRule("w", rank=2, init="pissa")
    _, t = lj.split({"w": _weights((8, 6))}, rule, key=jax.random.key(0))
    _, t3 = lj.split({"w": _weights((8, 6))}, dataclasses.replace(rule, rank=3),
                     key=jax.random.key(0))  # fmt: skip
    _, ada = lj.split({"w": _weights((8, 6))}, lj.LoraRule("w", rank=2, adalora=True),
                      key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="initial and trainable have different leaves"):
        lj.principal_to_lora({"v": t["w"]}, t)
    with pytest.raises(ValueError, match=r"'w': the initial leaf is not factors of the same"):
        lj.principal_to_lora(t3, t)
    with pytest.raises(ValueError, match="'w': AdaLoRA factors have no PiSSA/OLoRA"):
        lj.principal_to_lora(ada, ada)


# --- adapter checkpoints -------------------------------------------------------------------


def test_checkpoint_round_trip_with_magnitude_and_singular(tmp_path):
    frozen, trainable = _mixed_trainable()
    trainable = _perturb(trainable)
    rules = [lj.LoraRule("q", rank=2)]
    path = lj.save_adapters(tmp_path / "ckpt", trainable, rules=rules, base=frozen, step=3)
    lj.save_adapters(path, trainable, rules=rules, base=frozen, step=4)  # replace in place
    like = jax.eval_shape(lambda: trainable)
    for back in (lj.load_adapters(path, base=frozen), lj.load_adapters(path, like=like)):
        assert jax.tree.structure(back) == jax.tree.structure(trainable)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trainable)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert lj.checkpoint.read_info(path)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging leftovers
    plain = jax.eval_shape(lambda: lj.split(*_plain_pair(), key=jax.random.key(0))[1])
    with pytest.raises(ValueError, match="like= does not match the checkpoint at leaf"):
        lj.load_adapters(path, like=plain)


def _plain_pair():
    frozen, _ = _mixed_trainable()
    params = {**frozen, "head": _weights((6, 2), 3), "bias": jnp.zeros(2)}
    rules = [lj.LoraRule("q|d|s", rank=2), lj.LoraRule("head|bias", full=True)]
    return params, rules


# --- PEFT cross-checks (tiny random BERT, as in test_peft.py) -------------------------------

QV = r".*/attention/(query|value)/kernel"


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return torch, transformers, peft


@pytest.fixture(scope="module")
def bert_model(hf, tiny_bert_dir):
    _, transformers, _ = hf
    d = tiny_bert_dir
    return d, transformers.BertModel.from_pretrained(d, add_pooling_layer=False).eval()


def _bitwise_equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True], ids=["dora", "dora-rslora"])
def test_dora_both_ways_with_peft(hf, bert_model, tmp_path, rslora):
    torch, _, peft = hf
    d, model = bert_model
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        use_dora=True,
        use_rslora=rslora,
        target_modules=["query", "value", "dense"],
    )
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    params, _ = bert.load(d)
    trainable = lj.peft.load_pretrained(tmp_path / "peft", params, key_map=bert.PEFT_KEY_MAP)
    q = trainable["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert q.magnitude.shape == (32,) and q.rslora == rslora
    np.testing.assert_allclose(
        our_outputs(bert, d, params, trainable), torch_outputs(pm), atol=PEFT_TOL
    )

    rules = [lj.LoraRule(QV, rank=4, alpha=8, dora=True, rslora=rslora)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _perturb(trainable, scale=0.2)
    lj.peft.save_pretrained(tmp_path / "ours", trainable, key_map=bert.PEFT_KEY_MAP, rules=rules)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is rslora
    check_peft_loads(model, tmp_path / "ours", our_outputs(bert, d, frozen, trainable))
    back = lj.peft.load_pretrained(tmp_path / "ours", frozen, key_map=bert.PEFT_KEY_MAP)
    _bitwise_equal(back, trainable)


def _module(pm, path):
    parts = path.split("/")  # encoder/layer_<i>/attention/<name>/kernel
    layer = pm.base_model.model.encoder.layer[int(parts[1].removeprefix("layer_"))]
    return getattr(layer.attention.self, parts[3])


def _from_torch(pm, template, grads=False):
    """Our AdaLoRA tree (or its gradient) from PEFT's lora_A (r, in), lora_B (out, r), lora_E."""

    def leaf(key_path, t):
        if not isinstance(t, lj.LoraFactors):
            return t
        m = _module(pm, lj._src.core.rules.path_str(key_path))
        get = lambda p: (p.grad if grads else p).detach().numpy()  # noqa: E731
        a, b, e = (get(x["default"]) for x in (m.lora_A, m.lora_B, m.lora_E))
        return dataclasses.replace(
            t, a=jnp.asarray(a.T), b=jnp.asarray(b.T), singular=jnp.asarray(e[:, 0])
        )

    return jax.tree_util.tree_map_with_path(leaf, template, is_leaf=lj._src.core.trees.is_node)


@pytest.mark.slow
def test_adalora_allocator_and_files_match_peft(hf, bert_model, tmp_path):
    torch, _, peft = hf
    d, model = bert_model
    torch.manual_seed(2)
    config = peft.AdaLoraConfig(
        init_r=6,
        target_r=3,
        lora_alpha=8,
        target_modules=["query", "value"],
        total_step=12,
        tinit=2,
        tfinal=3,
        deltaT=2,
    )
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for _, p in lora:
            p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "init")
    params, _ = bert.load(d)
    trainable = lj.peft.load_pretrained(tmp_path / "init", params, key_map=bert.PEFT_KEY_MAP)
    assert trainable["encoder"]["layer_1"]["attention"]["value"]["kernel"].singular.shape == (6,)
    np.testing.assert_allclose(
        our_outputs(bert, d, params, trainable), torch_outputs(pm), atol=PEFT_TOL
    )

    allocator = pm.base_model.rankallocator
    alloc = lj.RankAllocator(target_rank=3, total_steps=12, tinit=2, tfinal=3, delta_t=2)
    budgets, mask_now = alloc.schedule(allocator.init_bgt, allocator.target_bgt)
    for t in range(13):
        assert (budgets[t], mask_now[t]) == allocator.budget_schedule(t) or t == 12
    update = jax.jit(alloc.update)
    state = alloc.init(trainable)
    rng = torch.Generator().manual_seed(3)
    for step in range(15):
        with torch.no_grad():
            for _, p in lora:  # an "optimiser step", then this step's gradients
                p.add_(0.05 * torch.randn(p.shape, generator=rng))
                p.grad = torch.randn(p.shape, generator=rng)
        ours = _from_torch(pm, trainable)
        grads = _from_torch(pm, trainable, grads=True)
        pm.base_model.update_and_allocate(step)
        ours, state = update(ours, grads, state)
        for path, t in lj._src.core.trees.leaves_with_paths(ours):
            if isinstance(t, lj.LoraFactors):
                e = _module(pm, path).lora_E["default"].detach().numpy()[:, 0]
                np.testing.assert_array_equal(np.asarray(t.singular) == 0, e == 0)
                np.testing.assert_allclose(np.asarray(t.singular), e, rtol=1e-6)
                if 0 < step < 9:
                    name = f"{_module_name(path)}.lora_E.default"
                    ipt = allocator.exp_avg_ipt[name].numpy()[:, 0]
                    np.testing.assert_allclose(np.asarray(state.ipt[path][2]), ipt, rtol=1e-5)
    assert sum(sum(v) for v in alloc.rank_pattern(state).values()) == allocator.target_bgt

    # PEFT saves the final rank pattern with pruned tensors; we load them padded to init_r
    pm.save_pretrained(tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["rank_pattern"]
    loaded = lj.peft.load_pretrained(tmp_path / "pruned", params, key_map=bert.PEFT_KEY_MAP)
    for x, y in zip(
        jax.tree.leaves(lj.merge(params, loaded)), jax.tree.leaves(lj.merge(params, ours))
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    np.testing.assert_allclose(
        our_outputs(bert, d, params, loaded), torch_outputs(pm), atol=PEFT_TOL
    )


def _module_name(path):
    parts = path.split("/")
    return f"encoder.layer.{parts[1].removeprefix('layer_')}.attention.self.{parts[3]}"


@pytest.mark.slow
def test_adalora_ours_to_peft(hf, bert_model, tmp_path):
    d, model = bert_model
    params, _ = bert.load(d)
    rules = [lj.LoraRule(QV, rank=4, alpha=8, adalora=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    trainable = _perturb(trainable, scale=0.3)
    lj.peft.save_pretrained(tmp_path, trainable, key_map=bert.PEFT_KEY_MAP, rules=rules)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["init_r"], cfg["lora_alpha"]) == ("ADALORA", 4, 8)
    check_peft_loads(model, tmp_path, our_outputs(bert, d, frozen, trainable))
    _bitwise_equal(lj.peft.load_pretrained(tmp_path, frozen, key_map=bert.PEFT_KEY_MAP), trainable)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"], ids=str)
def test_principal_init_matches_peft(hf, bert_model, tmp_path, init):
    torch, _, peft = hf
    d, model = bert_model
    config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=init, target_modules=["query", "value"]
    )
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    params, _ = bert.load(d)
    frozen, trainable = lj.split(params, [lj.LoraRule(QV, rank=4, alpha=8, init=init)],
                                 key=jax.random.key(0))  # fmt: skip
    for path, t in lj._src.core.trees.leaves_with_paths(trainable):
        if not isinstance(t, lj.LoraFactors):
            continue
        m = _module(pm, path)
        residual = m.base_layer.weight.detach().numpy().T
        w = dict(lj._src.core.trees.leaves_with_paths(frozen))[path]
        np.testing.assert_allclose(np.asarray(w), residual, atol=1e-5)
        delta = (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().numpy().T
        np.testing.assert_allclose(np.asarray(t.a @ t.b), delta, atol=1e-5)
    np.testing.assert_allclose(
        our_outputs(bert, d, frozen, trainable), torch_outputs(model), atol=PEFT_TOL
    )
    # trained factors from PEFT apply to our residual base as to theirs
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.2 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    loaded = lj.peft.load_pretrained(tmp_path, frozen, key_map=bert.PEFT_KEY_MAP)
    np.testing.assert_allclose(
        our_outputs(bert, d, frozen, loaded), torch_outputs(pm), atol=PEFT_TOL
    )


# --- PEFT file errors (toy model, hand-written key map) ---------------------------------------


class _Target:
    def __init__(self, key, layout="linear"):
        self.key, self.layout, self.transposed = key, layout, True

    @property
    def module(self):
        return self.key.rsplit(".", 1)[0]


class _ToyMap:
    def to_hf(self, path, layer=None):
        if path == "emb":
            return _Target("emb.weight", "embedding")
        if path == "stack":
            if layer is None:
                raise ValueError("stacked; pass layer=")
            return _Target(f"s.{layer}.weight")
        if path in ("l0", "l1"):
            return _Target(f"{path}.weight")
        raise KeyError(path)


def _toy_params():
    return {
        "emb": _weights((10, 4)),
        "l0": _weights((8, 6), 1),
        "l1": _weights((8, 6), 2),
        "stack": _weights((3, 4, 4), 3),
    }


@pytest.mark.parametrize(
    "rules, match",
    [
        ([lj.LoraRule("emb", rank=2, dora=True)], "'emb' is an embedding with DoRA factors"),
        ([lj.LoraRule("emb", rank=2, adalora=True)], "'emb' is an embedding with AdaLoRA"),
        (
            [lj.LoraRule("l0", rank=2, dora=True), lj.LoraRule("l1", rank=2)],
            r"PEFT has one use_dora per adapter but the factors use \[False, True\]",
        ),
        (
            [lj.LoraRule("l0", rank=2, adalora=True), lj.LoraRule("l1", rank=2)],
            r"one AdaLoRA \(singular values\) per adapter",
        ),
        (
            [lj.LoraRule("l0", rank=2, adalora=True), lj.LoraRule("l1", rank=3, adalora=True)],
            r"one init_r \(AdaLoRA rank\) per adapter but the factors use \[2, 3\]",
        ),
        (
            [lj.LoraRule("l0|l1", rank=2, adalora=True, rslora=True)],
            "AdaLoRA factors with rslora=True cannot be exported",
        ),
    ],
    ids=["dora-embedding", "adalora-embedding", "mixed-dora", "mixed-adalora", "ranks", "rslora"],
)
def test_peft_save_errors(tmp_path, rules, match):
    _, trainable = lj.split(_toy_params(), rules, key=jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        lj.peft.save_pretrained(tmp_path, trainable, key_map=_ToyMap())


def _edit(d, tensors=None, config=None):
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "adapter_model.safetensors")
    if tensors:
        tensors(t)
    save_file(t, d / "adapter_model.safetensors")
    c = json.loads((d / "adapter_config.json").read_text())
    c.update(config or {})
    (d / "adapter_config.json").write_text(json.dumps(c))


def _prune_l0(t):
    kept = np.array([True, False, True])
    for k, sl in (("lora_A", np.s_[kept]), ("lora_B", np.s_[:, kept]), ("lora_E", np.s_[kept])):
        t[f"base_model.model.l0.{k}"] = np.ascontiguousarray(t[f"base_model.model.l0.{k}"][sl])


@pytest.mark.parametrize(
    "rule, edit, match",
    [
        (
            lj.LoraRule("l0|l1", rank=3, adalora=True),
            lambda d: _edit(d, lambda t: t.pop("base_model.model.l1.lora_E")),
            r"has 'base_model.model.l1.lora_A' \(3, 8\) but 'base_model.model.l1.lora_E' is "
            r"missing",
        ),
        (
            lj.LoraRule("l0|l1", rank=3, adalora=True),
            lambda d: _edit(d, _prune_l0, {"rank_pattern": {"l0.lora_E": [True, True, True]}}),
            r"rank_pattern\['l0.lora_E'\] keeps 3 of 3 ranks but 'base_model.model.l0.lora_A' "
            r"has 2 rows",
        ),
        (
            lj.LoraRule("l0|l1", rank=3, dora=True),
            lambda d: _edit(
                d, lambda t: t.update({"base_model.model.l0.lora_magnitude_vector": np.ones(2)})
            ),
            r"'base_model.model.l0.lora_magnitude_vector' \(2,\); expected shape \(6,\)",
        ),
        (
            lj.LoraRule("stack", rank=2, dora=True, stack_axes=(0,)),
            lambda d: _edit(
                d,
                lambda t: [
                    t.pop(f"base_model.model.s.1.{k}")
                    for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
                ],
            ),
            "'stack' stacks 3 layers but the DoRA adapter covers only 2",
        ),
    ],
    ids=["no-lora-E", "bad-rank-pattern", "magnitude-shape", "dora-missing-layer"],
)
def test_peft_load_errors(tmp_path, rule, edit, match):
    frozen, trainable = lj.split(_toy_params(), rule, key=jax.random.key(0))
    lj.peft.save_pretrained(tmp_path, _perturb(trainable), key_map=_ToyMap())
    edit(tmp_path)
    with pytest.raises(ValueError, match=match):
        lj.peft.load_pretrained(tmp_path, frozen, key_map=_ToyMap())


def test_peft_loads_a_pruned_adalora_file(tmp_path):
    frozen, trainable = lj.split(_toy_params(), lj.LoraRule("l0|l1", rank=3, adalora=True),
                                 key=jax.random.key(0))  # fmt: skip
    trainable = _perturb(trainable)
    l0 = trainable["l0"]
    trainable["l0"] = dataclasses.replace(l0, singular=l0.singular.at[1].set(0.0))
    lj.peft.save_pretrained(tmp_path, trainable, key_map=_ToyMap())
    _edit(tmp_path, _prune_l0, {"rank_pattern": {"l0.lora_E": [True, False, True]}})
    back = lj.peft.load_pretrained(tmp_path, frozen, key_map=_ToyMap())
    assert back["l0"].rank == 3 and float(back["l0"].a[:, 1].sum()) == 0.0
    np.testing.assert_array_equal(lj.merge(frozen, back)["l0"], lj.merge(frozen, trainable)["l0"])


@pytest.mark.slow
def test_experiment_smoke():
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(root / "experiments" / "variants.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=420,  # eight tiny rows, each compiling its step
        cwd=root,
        env={**env, "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "LoRA r=8",
        "rsLoRA r=64",
        "DoRA r=8",
        "AdaLoRA r=12->8",
        "GLoRA r=8",
        "GLoRA r=8, low-rank A",
        "PiSSA r=8",
        "VeRA r=256",
    ]
    params = {r.split(" | ")[0][2:]: int(r.split(" | ")[2].replace(",", "")) for r in rows}
    qv = 6 * 2  # query and value in 6 layers, 384 x 384
    assert params["LoRA r=8"] == params["PiSSA r=8"] == qv * 8 * (384 + 384)
    assert params["rsLoRA r=64"] == qv * 64 * 768
    assert params["DoRA r=8"] == qv * (8 * 768 + 384)
    assert params["AdaLoRA r=12->8"] == qv * (12 * 768 + 12)
    assert params["GLoRA r=8"] == qv * (8 * 768 + 3 * 384)  # B; A, D, E vectors
    assert params["GLoRA r=8, low-rank A"] == qv * (2 * 8 * 768 + 3 * 384)  # B, A; C, D, E
    assert params["VeRA r=256"] == qv * (256 + 384)  # lambda_d, lambda_b; projections frozen
    assert "1.00x" in rows[0]
