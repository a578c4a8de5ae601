"""The factored engine: structure of the compiled step, fallbacks, dropout, control flow."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import all_shapes, random_factors
from jax import lax

import lora_jax as lj
from lora_jax import LoraFactoringError, LoraMaterializeWarning
from lora_jax.models import gpt

CFG = gpt.Config(vocab=50, d_model=24, n_heads=3, d_ff=40, n_layers=2, max_len=16)
RULES = [lj.LoraRule(gpt.LORA_TARGETS, rank=4, stack_axes=(0,))]


def _gpt_pair():
    params = gpt.init(jax.random.key(0), CFG)
    frozen, trainable = lj.split(params, RULES, key=jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, CFG.vocab)
    return params, frozen, random_factors(trainable, jax.random.key(3)), tokens


def _step(frozen, materialize):
    opt = optax.adamw(1e-3)

    def step(trainable, opt_state, tokens):
        loss_fn = lambda t: lj.lora_apply(gpt.loss, materialize=materialize)(frozen, t, CFG, tokens)
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float scalars
            updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, opt


@pytest.mark.parametrize("materialize", [False, True], ids=["factored", "materialized"])
def test_step_never_forms_an_adapted_weight(materialize):
    _, frozen, trainable, tokens = _gpt_pair()
    step, opt = _step(frozen, materialize)
    jaxpr = jax.make_jaxpr(step)(trainable, opt.init(trainable), tokens).jaxpr
    adapted = set()
    for _, t in lj._src.core.trees.leaves_with_paths(trainable):
        if isinstance(t, lj.LoraFactors):
            adapted |= {t.shape, t.shape[1:]}  # stacked and per-layer
    formed = adapted & set(all_shapes(jaxpr))
    if materialize:
        assert formed, "the reference mode must form the merged weights (check can fail)"
    else:
        assert not formed, f"factored step formed arrays of adapted shapes {formed}"


def test_factored_step_needs_less_temporary_memory():
    _, frozen, trainable, tokens = _gpt_pair()
    temps = {}
    for mode in (False, True):
        step, opt = _step(frozen, mode)
        compiled = jax.jit(step).lower(trainable, opt.init(trainable), tokens).compile()
        temps[mode] = compiled.memory_analysis().temp_size_in_bytes
    adapted_bytes = sum(
        int(np.prod(t.shape)) * 4
        for _, t in lj._src.core.trees.leaves_with_paths(trainable)
        if isinstance(t, lj.LoraFactors)
    )
    assert temps[True] - temps[False] >= adapted_bytes, temps


def test_gradient_of_a_is_contracted_rank_first():
    """XLA:CPU runs ``x^T . dt`` into (d, r) outside its fast matmul library (5-10x slower):
    the compiled gradient of ``a`` must be ``dt^T . x`` into (r, d), which the optimisation
    barrier in ``lowrank.contract`` keeps XLA from folding back."""
    n, d, k, r = 64, 48, 40, 4
    w = jax.random.normal(jax.random.key(0), (d, k))
    x = jax.random.normal(jax.random.key(1), (n, d))
    rule = lj.LoraRule("w", rank=r, in_axes=(0,))
    frozen, trainable = lj.split({"w": w}, [rule], key=jax.random.key(2))
    trainable = random_factors(trainable, jax.random.key(3))
    loss = lambda t: jnp.sum(lj.lora_apply(lambda p, x: x @ p["w"])(frozen, t, x) ** 2)
    hlo = jax.jit(jax.grad(loss)).lower(trainable).compile().as_text()
    dots = set()  # (rows, columns) as laid out in memory: XLA may pick a column-major output
    for m, n, minor, _ in re.findall(r"= f32\[(\d+),(\d+)\]\{(\d),(\d)\} dot\(", hlo):
        dots.add((int(m), int(n)) if minor == "1" else (int(n), int(m)))
    assert (r, d) in dots, sorted(dots)
    assert (d, r) not in dots, sorted(dots)


def test_factored_step_matches_materialized_step():
    _, frozen, trainable, tokens = _gpt_pair()
    outs = []
    for mode in (False, True):
        step, opt = _step(frozen, mode)
        t, s = trainable, opt.init(trainable)
        step = jax.jit(step)
        for _ in range(3):
            t, s, loss = step(t, s, tokens)
        outs.append((t, loss))
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(outs[1][0])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def _weight_decay_fn(p, x):
    return jnp.sum(x @ p["w"]) + 0.1 * jnp.sum(p["w"] ** 2)


def _wd_pair():
    params = {"w": jax.random.normal(jax.random.key(0), (6, 5))}
    frozen, trainable = lj.split(params, [lj.LoraRule("w", rank=2)], key=jax.random.key(1))
    return frozen, random_factors(trainable, jax.random.key(2)), jnp.ones((3, 6))


def test_strict_mode_names_path_and_primitive():
    frozen, trainable, x = _wd_pair()
    with pytest.raises(LoraFactoringError, match=r"'w' .*'integer_pow'"):
        lj.lora_apply(_weight_decay_fn, strict=True)(frozen, trainable, x)


def test_unfactorable_use_warns_once_and_stays_correct():
    frozen, trainable, x = _wd_pair()
    apply = lj.lora_apply(_weight_decay_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = apply(frozen, trainable, x)
    hits = [w for w in caught if issubclass(w.category, LoraMaterializeWarning)]
    assert len(hits) == 1 and "'w'" in str(hits[0].message)
    ref = lj.lora_apply(_weight_decay_fn, materialize=True)(frozen, trainable, x)
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def _dense_pair(dropout=0.0):
    params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    rule = lj.LoraRule("w", rank=2, dropout=dropout)
    frozen, trainable = lj.split(params, [rule], key=jax.random.key(1))
    return params, frozen, trainable, jax.random.normal(jax.random.key(2), (16, 8))


def test_dropout_only_touches_adapter_branch():
    params, frozen, trainable, x = _dense_pair(dropout=0.5)
    fn = lambda p, x: x @ p["w"]
    apply = jax.jit(lj.lora_apply(fn))
    # b = 0: the adapter branch is zero, so dropout cannot change the output.
    np.testing.assert_array_equal(
        apply(frozen, trainable, x, lora_rng=jax.random.key(5)), fn(params, x)
    )
    trainable = random_factors(trainable, jax.random.key(3))
    plain = apply(frozen, trainable, x)
    d1 = apply(frozen, trainable, x, lora_rng=jax.random.key(5))
    d2 = apply(frozen, trainable, x, lora_rng=jax.random.key(5))
    d3 = apply(frozen, trainable, x, lora_rng=jax.random.key(6))
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, plain) and not np.allclose(d1, d3)
    # Inverted dropout: the mean over many masks approaches the deterministic output.
    keys = jax.random.split(jax.random.key(7), 400)
    samples = jax.vmap(lambda k: apply(frozen, trainable, x, lora_rng=k))(keys)
    stderr = samples.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(samples.mean(0) - plain) <= 5 * stderr + 1e-5)
    with pytest.raises(ValueError, match="dropout needs the factored engine"):
        lj.lora_apply(fn, materialize=True)(frozen, trainable, x, lora_rng=jax.random.key(0))


def _control_flow_fns():
    def while_fn(p, x):
        return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x)

    def cond_fn(p, x):
        return lax.cond(x.sum() > 0, lambda h: h @ p["w"], lambda h: -(h @ p["w"]), x)

    def switch_fn(p, x):
        branches = [lambda h: h @ p["w"], lambda h: jnp.tanh(h @ p["w"]), lambda h: h]
        return lax.switch(1, branches, x)

    def nested_jit_fn(p, x):
        return jax.jit(lambda w, h: h @ w)(p["w"], x)

    def remat_policy_fn(p, x):
        f = jax.checkpoint(
            lambda w, h: jnp.tanh(h @ w) @ w, policy=jax.checkpoint_policies.nothing_saveable
        )
        return f(p["w"], x)

    @jax.custom_jvp
    def scaled_matmul(h, w):
        return h @ w

    scaled_matmul.defjvp(lambda pr, tg: (pr[0] @ pr[1], tg[0] @ pr[1] + pr[0] @ tg[1]))

    @jax.custom_vjp
    def vjp_matmul(h, w):
        return h @ w

    vjp_matmul.defvjp(lambda h, w: (h @ w, (h, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    return {
        "while": while_fn,
        "cond": cond_fn,
        "switch": switch_fn,
        "nested_jit": nested_jit_fn,
        "remat_policy": remat_policy_fn,
        "custom_jvp": lambda p, x: scaled_matmul(x, p["w"]),
        "custom_vjp": lambda p, x: vjp_matmul(x, p["w"]),
    }


@pytest.mark.parametrize("name", list(_control_flow_fns()), ids=str)
def test_control_flow_factored_equals_materialized(name):
    fn = _control_flow_fns()[name]
    params = {"w": jax.random.normal(jax.random.key(0), (6, 6)) / 3}
    frozen, trainable = lj.split(params, [lj.LoraRule("w", rank=2)], key=jax.random.key(1))
    trainable = random_factors(trainable, jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 6))
    loss = lambda t, m: jnp.sum(lj.lora_apply(fn, materialize=m)(frozen, t, x) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraMaterializeWarning)
        warnings.simplefilter("ignore", lj.LoraCustomRuleWarning)  # tested below
        v, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(trainable, False)
    v_ref, g_ref = jax.value_and_grad(loss)(trainable, True)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_vmap_over_inputs_and_over_adapters():
    params, frozen, trainable, x = _dense_pair()
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    apply = lj.lora_apply(fn)
    trainable = random_factors(trainable, jax.random.key(4))
    per_row = jax.vmap(lambda row: apply(frozen, trainable, row))(x)
    np.testing.assert_allclose(per_row, apply(frozen, trainable, x), rtol=1e-6)
    # An ensemble of adapters on one base: vmap over the trainable tree.
    ens = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), trainable)
    outs = jax.vmap(lambda t: apply(frozen, t, x))(ens)
    doubled = jax.tree.map(lambda a: 2 * a, trainable)
    np.testing.assert_allclose(outs[1], apply(frozen, doubled, x), rtol=1e-6)


def test_views_before_use():
    # reshape, transpose, squeeze, broadcast_in_dim and convert_element_type before a matmul
    def fn(p, x):
        w = p["w"].reshape(1, 8, 2, 2).squeeze(0).transpose(0, 2, 1).reshape(8, 4)
        w = jnp.broadcast_to(w[None], (2, 8, 4)).astype(jnp.float32)
        return jnp.einsum("bi,nio->nbo", x, w)

    params, frozen, trainable, x = _dense_pair()
    trainable = random_factors(trainable, jax.random.key(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraMaterializeWarning)
        out = jax.jit(lj.lora_apply(fn))(frozen, trainable, x)
    ref = lj.lora_apply(fn, materialize=True)(frozen, trainable, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_argnum_and_kwargs_and_static_args():
    params, frozen, trainable, x = _dense_pair()
    trainable = random_factors(trainable, jax.random.key(4))
    fn = lambda scale, p, x, *, act: act(x @ p["w"]) * scale
    out = lj.lora_apply(fn, argnum=1)(frozen, trainable, 2.0, x, act=jnp.tanh)
    ref = fn(2.0, lj.merge(frozen, trainable), x, act=jnp.tanh)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_mismatched_pair_is_refused_with_path():
    _, frozen, trainable, x = _dense_pair()
    other = {
        "w": lj.LoraFactors(
            a=jnp.zeros((9, 2)),
            b=jnp.zeros((2, 4)),
            alpha=4.0,
            stack_axes=(),
            in_axes=(0,),
            out_axes=(1,),
        )
    }
    with pytest.raises(ValueError, match=r"'w': factors .* weight of shape \(9, 4\)"):
        lj.lora_apply(lambda p, x: x @ p["w"])(frozen, other, x)
    with pytest.raises(ValueError, match="does not match frozen tree"):
        lj.lora_apply(lambda p, x: x @ p["w"])(frozen, {"v": None}, x)


@pytest.mark.parametrize("name", ["custom_jvp", "custom_vjp"])
def test_custom_rule_with_adapted_weight_warns_once_or_raises_in_strict(name):
    fn = _control_flow_fns()[name]
    params, frozen, trainable, x = _dense_pair()
    x = x[:, :6]
    params = {"w": jax.random.normal(jax.random.key(0), (6, 6))}
    frozen, trainable = lj.split(params, [lj.LoraRule("w", rank=2)], key=jax.random.key(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lj.lora_apply(fn)(frozen, trainable, x)
    hits = [w for w in caught if issubclass(w.category, lj.LoraCustomRuleWarning)]
    assert len(hits) == 1 and f"'w' enters a {name}_call function" in str(hits[0].message)
    with pytest.raises(LoraFactoringError, match=f"'w' enters a {name}_call function"):
        lj.lora_apply(fn, strict=True)(frozen, trainable, x)
