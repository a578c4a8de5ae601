"""Model styles users bring: Flax linen (plain, nn.scan, nn.remat), Flax NNX, plain functions."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import random_factors
from flax import nnx

import lora_jax as lj


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 8), name="qkv")(x)
        y = nn.DenseGeneral(16, axis=(-2, -1), name="out")(nn.gelu(h))
        return x + nn.Dense(16, name="mlp")(y), None


class _Linen(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(40, 16, name="emb")(ids)
        block = nn.remat(_Block) if self.remat else _Block
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="layers"
        )(x, None)
        return nn.Dense(5, name="head")(x)


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _linen(remat):
    model = _Linen(remat=remat)
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 40)
    params = model.init(jax.random.key(1), ids)
    rules = [
        lj.LoraRule(r".*/(qkv|out|mlp)/kernel", rank=2),
        lj.LoraRule(r".*/emb/embedding", rank=2),
        lj.LoraRule(r".*/head/.*", full=True),
    ]
    apply = lambda p, ids: model.apply(p, ids)
    frozen, trainable = lj.split(params, rules, key=jax.random.key(2), apply_fn=apply, args=(ids,))
    return params, apply, frozen, trainable, (ids,)


def _nnx():
    graphdef, state = nnx.split(_Nnx(nnx.Rngs(0)))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)
    frozen, trainable = lj.split(
        state, [lj.LoraRule(r".*/kernel/value", rank=3)], key=jax.random.key(1)
    )
    return state, apply, frozen, trainable, (jax.random.normal(jax.random.key(2), (5, 8)),)


STYLES = {
    "linen_scan": lambda: _linen(False),
    "linen_scan_remat": lambda: _linen(True),
    "nnx": _nnx,
}


@pytest.mark.parametrize("style", list(STYLES), ids=str)
def test_model_style(style):
    params, apply, frozen, trainable, args = STYLES[style]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lj.LoraMaterializeWarning)
        np.testing.assert_array_equal(
            jax.jit(lj.lora_apply(apply))(frozen, trainable, *args), apply(params, *args)
        )
        trainable = random_factors(trainable, jax.random.key(9))
        loss = lambda t, m: jnp.sum(lj.lora_apply(apply, materialize=m)(frozen, t, *args) ** 2)
        val, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(trainable, False)
    ref_val, ref_grads = jax.value_and_grad(loss)(trainable, True)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-4 * float(np.abs(r).max() + 1))


def test_linen_inferred_axes():
    _, _, _, trainable, _ = _linen(False)
    layers = trainable["params"]["layers"]
    assert (layers["qkv"]["kernel"].stack_axes, layers["qkv"]["kernel"].in_axes) == ((0,), (1,))
    assert (layers["out"]["kernel"].stack_axes, layers["out"]["kernel"].in_axes) == ((0,), (1, 2))
    assert layers["mlp"]["kernel"].a.shape == (3, 16, 2)
