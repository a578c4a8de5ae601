"""What the per-library front-door tests (tests/frontdoor/test_<library>.py) share."""

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj

is_factors = lambda x: isinstance(x, lj.LoraFactors)


def with_b(trainable, key, scale=1.0):
    """Every factor's b (zero at init) replaced by normal values, so the adapter acts."""

    def leaf(t):
        if is_factors(t):
            return t.with_factors(t.a, scale * jax.random.normal(key, t.b.shape, t.b.dtype))
        return t

    return jax.tree.map(leaf, trainable, is_leaf=is_factors)


def adamw_steps(apply, frozen, trainable, args, target, n=6, lr=1e-2):
    """``n`` jitted AdamW steps on a mean squared error; returns (trainable, losses)."""
    opt = optax.adamw(lr)

    def loss_fn(t):
        out = apply(frozen, t, *args)
        return jnp.mean((out.astype(jnp.float32) - target) ** 2)

    @jax.jit
    def step(t, state):
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float scalars
            loss, g = jax.value_and_grad(loss_fn)(t)
            updates, state = opt.update(g, state, t)
            return optax.apply_updates(t, updates), state, loss

    state = opt.init(trainable)
    losses = []
    for _ in range(n):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    return trainable, losses


def factor_leaves(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=is_factors) if is_factors(x)]
