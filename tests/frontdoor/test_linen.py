"""Flax linen: Dense, DenseGeneral, Conv with BatchNorm (mutable batch_stats), nn.scan, boxes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from library_helpers import adamw_steps, factor_leaves, with_b

import lora_jax as lj


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 4), name="heads")(x)  # kernel (8, 2, 4)
        return x + nn.DenseGeneral(8, axis=(-2, -1), name="merge")(jnp.tanh(h)), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, img, train):
        x = nn.Conv(8, (3, 3), name="conv")(img)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = x.mean((1, 2))[:, None, :].repeat(3, 1)  # (batch, 3 tokens, 8)
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = scan(name="layers")(x, None)
        boxed = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "out"))
        return nn.Dense(4, kernel_init=boxed, name="head")(x)


IMG = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
RULES = [
    lj.LoraRule(r"conv/kernel", rank=2),
    lj.LoraRule(r"layers/(heads|merge)/kernel", rank=2),
    lj.LoraRule(r"head/kernel/value", rank=2),
]


@pytest.fixture(scope="module")
def net():
    model = Net()
    variables = model.init(jax.random.key(1), IMG, train=False)

    def fwd(p, stats, img):
        return model.apply(
            {"params": p, "batch_stats": stats}, img, train=True, mutable=["batch_stats"]
        )

    params, stats = variables["params"], variables["batch_stats"]
    frozen, trainable = lj.split(
        params, RULES, key=jax.random.key(2), apply_fn=fwd, args=(stats, IMG)
    )
    return params, stats, fwd, frozen, trainable


def test_axes_and_boxes(net):
    params, _, _, frozen, trainable = net
    heads = trainable["layers"]["heads"]["kernel"]  # (layers, in, 2, 4)
    assert (heads.stack_axes, heads.in_axes, heads.out_axes) == ((0,), (1,), (2, 3))
    merge = trainable["layers"]["merge"]["kernel"]  # (layers, 2, 4, out)
    assert (merge.stack_axes, merge.in_axes) == ((0,), (1, 2))
    assert trainable["conv"]["kernel"].in_axes == (0, 1, 2)  # (kh, kw, in, out)
    box = trainable["head"]["kernel"]
    assert isinstance(box, nn.Partitioned) and box.names == ("embed", "out")
    assert isinstance(box.value, lj.LoraFactors) and box.value.a.shape == (8, 2)
    assert isinstance(lj.merge(frozen, trainable)["head"]["kernel"], nn.Partitioned)


def test_zero_init_training_with_batch_stats_and_merge(net):
    params, stats, fwd, frozen, trainable = net
    apply = lj.lora_apply(fwd, strict=True)
    out, new = apply(frozen, trainable, stats, IMG)
    ref, ref_new = fwd(params, stats, IMG)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(
        new["batch_stats"]["bn"]["mean"], ref_new["batch_stats"]["bn"]["mean"]
    )
    target = jax.random.normal(jax.random.key(3), out.shape)
    first = lambda f, t, s, x: apply(f, t, s, x)[0]
    trainable, losses = adamw_steps(first, frozen, trainable, (stats, IMG), target)
    assert losses[-1] < 0.9 * losses[0]
    merged = lj.merge(frozen, trainable)
    np.testing.assert_allclose(
        fwd(merged, stats, IMG)[0], first(frozen, trainable, stats, IMG), atol=1e-5
    )
    t = trainable["conv"]["kernel"]  # independent: W0 + scale * a @ b in float64
    want = np.asarray(params["conv"]["kernel"], np.float64) + t.scale * np.einsum(
        "hwir,ro->hwio", np.asarray(t.a, np.float64), np.asarray(t.b, np.float64)
    )
    np.testing.assert_allclose(merged["conv"]["kernel"], want, atol=1e-6)
    back = lj.unmerge(merged, trainable)
    np.testing.assert_allclose(back["conv"]["kernel"], params["conv"]["kernel"], atol=1e-6)


def test_nf4_base_and_checkpoint_round_trip(net, tmp_path):
    _, stats, fwd, frozen, trainable = net
    apply = lambda f, t: lj.lora_apply(fwd, strict=True)(f, t, stats, IMG)[0]
    q = lj.quantize(frozen, r"layers/heads/kernel", stack_axes=1)
    assert isinstance(q["layers"]["heads"]["kernel"], lj.NF4Array)
    t = with_b(trainable, jax.random.key(4), 0.1)
    deq = dict(
        frozen,
        layers=dict(
            frozen["layers"],
            heads={
                **frozen["layers"]["heads"],
                "kernel": q["layers"]["heads"]["kernel"].dequantize(),
            },
        ),
    )
    np.testing.assert_allclose(apply(q, t), apply(deq, t), atol=1e-5)
    path = lj.save_adapters(tmp_path / "ckpt", t, rules=RULES, base=frozen)
    back = lj.load_adapters(path, like=t)
    assert isinstance(back["head"]["kernel"], nn.Partitioned)
    for x, y in zip(factor_leaves(back), factor_leaves(t)):
        np.testing.assert_array_equal(x.b, y.b)
