"""Flax NNX modules (Linear with and without bias, MultiHeadAttention, Conv, Embed, nnx.scan)."""

import jax
import numpy as np
import pytest
from flax import nnx
from library_helpers import adamw_steps, factor_leaves, with_b

import lora_jax as lj

D, VOCAB = 16, 40
IDS = jax.random.randint(jax.random.key(1), (2, 6), 0, VOCAB)


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
        self.fc = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.fc(x)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(VOCAB, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, kernel_size=(3,), padding="SAME", rngs=rngs)

        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Layer(rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, ids):
        x = self.emb(ids)
        x = x + self.conv(x)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, x):
            return layer(x)

        return self.head(body(self.layers, x))


RULES = [
    lj.LoraRule(r".*(query|value|fc|head)/kernel/value", rank=2),
    lj.LoraRule("emb/embedding/value", rank=2),
    lj.LoraRule("conv/kernel/value", rank=2),
]


@pytest.fixture(scope="module")
def net():
    model = Net(nnx.Rngs(0))
    return model, lj.nnx.split(model, RULES, key=jax.random.key(2), args=(IDS,), strict=True)


def test_axes_follow_each_layer_and_the_scan(net):
    _, (_, _, t, _) = net
    q = t["layers"]["attn"]["query"]["kernel"].value  # (layers, in, heads, head_dim)
    assert (q.stack_axes, q.in_axes, q.out_axes) == ((0,), (1,), (2, 3))
    fc = t["layers"]["fc"]["kernel"].value
    assert (fc.stack_axes, fc.in_axes) == ((0,), (1,)) and fc.a.shape == (2, D, 2)
    assert t["conv"]["kernel"].value.in_axes == (0, 1)  # (width, in, out)
    assert t["emb"]["embedding"].value.in_axes == (0,)
    assert t["head"]["kernel"].value.a.shape == (D, 2)


def test_zero_init_training_and_merge_back_into_the_module(net):
    model, (graphdef, frozen, trainable, apply) = net
    np.testing.assert_allclose(apply(frozen, trainable, IDS), model(IDS), atol=1e-6)
    target = jax.random.normal(jax.random.key(3), (2, 6, 4))
    trainable, losses = adamw_steps(apply, frozen, trainable, (IDS,), target)
    assert losses[-1] < 0.9 * losses[0]
    out = apply(frozen, trainable, IDS)
    fresh = nnx.merge(graphdef, frozen, trainable.filter(lambda p, v: False))  # a copy
    merged = lj.nnx.merge(fresh, frozen, trainable)
    assert isinstance(merged, Net)
    np.testing.assert_allclose(merged(IDS), out, atol=1e-5)
    t = trainable["head"]["kernel"].value  # independent: W0 + scale * a @ b in float64
    want = np.asarray(model.head.kernel.value, np.float64) + t.scale * (
        np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
    )
    np.testing.assert_allclose(merged.head.kernel.value, want, atol=1e-6)


def test_nf4_base_and_checkpoint_round_trip(net, tmp_path):
    _, (_, frozen, trainable, apply) = net
    stacked = lambda path, w: int(path.startswith("layers/"))  # scanned layers lead
    qfrozen = lj.quantize(frozen, r"(head|layers/fc)/kernel/value", stack_axes=stacked)
    assert isinstance(qfrozen["head"]["kernel"].value, lj.NF4Array)
    t = with_b(trainable, jax.random.key(4), 0.1)
    deq = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, lj.NF4Array) else w,
        qfrozen,
        is_leaf=lambda x: isinstance(x, lj.NF4Array),
    )
    np.testing.assert_allclose(apply(qfrozen, t, IDS), apply(deq, t, IDS), atol=1e-5)
    path = lj.save_adapters(tmp_path / "ckpt", t, rules=RULES, base=frozen)
    back = lj.load_adapters(path, like=t)
    assert type(back) is type(t)
    for x, y in zip(factor_leaves(back), factor_leaves(t)):
        np.testing.assert_array_equal(x.a, y.a)
        np.testing.assert_array_equal(x.b, y.b)


def test_module_passed_directly_with_a_bias_free_linear():
    lin = nnx.Linear(8, 4, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 8))
    frozen, trainable = lj.split(
        lin,
        lj.LoraRule("kernel/value", rank=2),
        key=jax.random.key(2),
        apply_fn=lambda m, x: m(x),
        args=(x,),
    )
    assert frozen.bias is None and trainable.bias is None
    trainable = with_b(trainable, jax.random.key(3))
    merged = lj.merge(frozen, trainable)
    assert type(merged) is nnx.Linear and merged.bias is None
    t = trainable.kernel.value
    want = np.asarray(x, np.float64) @ (
        np.asarray(lin.kernel.value, np.float64)
        + t.scale * np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)
    )
    got = lj.lora_apply(lambda m, x: m(x), strict=True)(frozen, trainable, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(merged(x), want, atol=1e-5)
    assert type(lj.combine(frozen, trainable)) is nnx.Linear
    assert lj.summary(frozen, trainable).trainable_params == 2 * (8 + 4)
