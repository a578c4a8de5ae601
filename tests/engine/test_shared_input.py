"""Adapted weights that contract the same activation share one ``x . [a | a' | ...]`` product.

Checked: the program has one first product for q, k and v (different ranks and scales),
values and factor gradients equal a float64 dense computation of ``W0 + scale * a @ b``
(eagerly and under jit), and uses that cannot share (another contraction of the same
``x``, dropout on the adapter input) keep their own products and stay exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

D, N = 8, 6
RANKS = {"q": 2, "k": 3, "v": 4}


def _n(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) / np.sqrt(shape[0])


def _setup(dropout=0.0, k_in_axes=(0,)):
    params = {name: _n(i, (D, D)) for i, name in enumerate(RANKS)}
    rules = [
        lj.LoraRule(name, rank=r, alpha=2.0 * (i + 1), dropout=dropout,
                    in_axes=k_in_axes if name == "k" else (0,))
        for i, (name, r) in enumerate(RANKS.items())
    ]  # fmt: skip
    frozen, trainable = lj.split(params, rules, key=jax.random.key(7))
    trainable = {  # non-zero b, so the low-rank term is in the values and gradients
        k: t.with_factors(t.a, _n(50 + i, t.b.shape)) for i, (k, t) in enumerate(trainable.items())
    }
    return params, frozen, trainable


def _qkv(p, x):
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    return jnp.sum(jnp.tanh(q) * k + v**2)


def _mixed(p, x):
    """q and v contract x's last axis; k contracts its first (x is square)."""
    q, v = x @ p["q"], x @ p["v"]
    k = jnp.einsum("nd,ne->de", x, p["k"])
    return jnp.sum(jnp.tanh(q) * v) + jnp.sum(k**2)


def _check_against_dense(loss, params, frozen, trainable, x, where, transposed=()):
    """Value and factor gradients against float64 autodiff of ``W0 + scale * a @ b``
    (``(a @ b).T`` for the names in ``transposed``, whose ``a`` is on the output side)."""
    fn = lambda t, f, x: lj.lora_apply(loss, strict=True)(f, t, x)
    grad_fn = jax.value_and_grad(fn)
    value, grads = (jax.jit(grad_fn) if where == "jit" else grad_fn)(trainable, frozen, x)
    with jax.enable_x64(True):
        f64 = lambda m: jnp.asarray(m, jnp.float64)

        def dense_loss(ab):
            ws = {}
            for k, (a, b) in ab.items():
                delta = a @ b
                ws[k] = f64(params[k]) + trainable[k].scale * (
                    delta.T if k in transposed else delta
                )
            return loss(ws, f64(x))

        ab = {k: (f64(t.a), f64(t.b)) for k, t in trainable.items()}
        want, dab = jax.value_and_grad(dense_loss)(ab)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for k in trainable:
        np.testing.assert_allclose(grads[k].a, dab[k][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grads[k].b, dab[k][1], rtol=1e-4, atol=1e-6)


def _first_product_widths(loss, frozen, trainable, x, rng=None):
    """Rank widths of the contractions of ``x`` against a factor, in the forward program."""
    jaxpr = jax.make_jaxpr(lambda t, f, x: lj.lora_apply(loss)(f, t, x, lora_rng=rng))(
        trainable, frozen, x
    )
    widths = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                shapes = [v.aval.shape for v in eqn.invars]
                if shapes[0] == x.shape and shapes[1][0] == D and shapes[1][1] != D:
                    widths.append(shapes[1][1])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return sorted(widths)


@pytest.mark.parametrize("where", ["eager", "jit"])
def test_q_k_v_of_one_input_share_one_first_product(where):
    params, frozen, trainable = _setup()
    x = _n(5, (N, D))
    assert _first_product_widths(_qkv, frozen, trainable, x) == [sum(RANKS.values())]
    _check_against_dense(_qkv, params, frozen, trainable, x, where)


@pytest.mark.parametrize("where", ["eager", "jit"])
def test_another_contraction_of_the_same_input_keeps_its_own_product(where):
    params, frozen, trainable = _setup()
    x = _n(5, (D, D))  # square, so a wrong pairing would still have matching shapes
    widths = _first_product_widths(_mixed, frozen, trainable, x)
    assert widths == sorted([RANKS["k"], RANKS["q"] + RANKS["v"]])
    _check_against_dense(_mixed, params, frozen, trainable, x, where)


@pytest.mark.parametrize("where", ["eager", "jit"])
def test_a_weight_whose_output_side_factor_meets_x_first_keeps_its_own_product(where):
    """k's factors are laid out the other way round (``in_axes=(1,)``): ``x`` meets ``b``
    first, so its first product is not ``x . a`` and cannot join q's and v's."""
    params, frozen, trainable = _setup(k_in_axes=(1,))
    x = _n(5, (D, D))
    widths = _first_product_widths(_qkv, frozen, trainable, x)
    assert widths == sorted([RANKS["k"], RANKS["q"] + RANKS["v"]])
    _check_against_dense(_qkv, params, frozen, trainable, x, where, transposed=("k",))


def test_dropout_on_the_adapter_input_is_never_shared():
    """Each use draws its own dropout mask, so no use's ``x . a`` is another's."""
    _, frozen, trainable = _setup(dropout=0.5)
    x = _n(5, (N, D))
    widths = _first_product_widths(_qkv, frozen, trainable, x, rng=jax.random.key(3))
    assert widths == sorted(RANKS.values())
    # without a key, dropout is off and the three share again
    assert _first_product_widths(_qkv, frozen, trainable, x) == [sum(RANKS.values())]
