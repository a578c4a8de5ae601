"""Equinox models built from eqx.nn layers: layouts, training, NF4, checkpoints, PEFT (torch)."""

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from library_helpers import adamw_steps, with_b

import lora_jax as lj
from lora_jax.models import KeyEntry, KeyMap

T, D, VOCAB = 6, 16, 40


class Net(eqx.Module):
    emb: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    conv: eqx.nn.Conv2d
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.emb = eqx.nn.Embedding(VOCAB, D, key=k[0])
        self.attn = eqx.nn.MultiheadAttention(2, D, key=k[1])
        self.conv = eqx.nn.Conv2d(1, 3, kernel_size=3, padding=1, key=k[2])
        self.mlp = eqx.nn.MLP(D, 4, 32, 2, key=k[3])

    def __call__(self, ids):  # ids (T,) -> (T, 4)
        h = jax.vmap(self.emb)(ids)
        h = h + self.attn(h, h, h)
        h = h + self.conv(h[None]).mean(0)
        return jax.vmap(self.mlp)(h)


RULES = [
    lj.LoraRule(r"mlp/layers/\d/weight", rank=4),
    lj.LoraRule(r"attn/(query|value)_proj/weight", rank=2),
    lj.LoraRule("emb/weight", rank=2),
    lj.LoraRule("conv/weight", rank=2),
]
IDS = jax.random.randint(jax.random.key(9), (3, T), 0, VOCAB)
batched = lambda m, ids: jax.vmap(m)(ids)


@pytest.fixture(scope="module")
def net():
    model = Net(jax.random.key(0))
    split = lj.eqx.split(
        model, RULES, key=jax.random.key(1), args=(IDS,), call=batched, strict=True
    )
    return model, split


def test_layouts_are_read_from_each_first_use(net):
    _, (frozen, trainable, static, _) = net
    t = trainable
    # eqx.nn.Linear.weight is (out, in) and computes weight @ x: `a` takes axis 1.
    assert t.mlp.layers[0].weight.in_axes == (1,)
    assert t.mlp.layers[0].weight.a.shape == (D, 4) and t.mlp.layers[0].weight.b.shape == (4, 32)
    assert t.attn.query_proj.weight.in_axes == (1,)
    assert t.emb.weight.in_axes == (0,)  # looked up by row
    assert t.conv.weight.in_axes == (1, 2, 3)  # (out_c, in_c, kh, kw)
    # Kaiming-uniform `a` bounded by 1/sqrt(fan_in) with fan_in = in_features = D.
    rules = [lj.LoraRule(r"layers/0/weight", rank=4, init="kaiming")]
    mlp = net[0].mlp
    _, kt, _, _ = lj.eqx.split(
        mlp, rules, key=jax.random.key(1), args=(jnp.ones((3, D)),), call=batched
    )
    a = np.asarray(kt.layers[0].weight.a)
    assert np.abs(a).max() <= 1 / np.sqrt(D) and np.abs(a).max() > 0.8 / np.sqrt(D)
    # The static half and the holes: bias-free attention projections stay None.
    assert frozen.attn.query_proj.bias is None and trainable.attn.query_proj.bias is None
    assert static.mlp.activation is jax.nn.relu


def test_without_apply_fn_split_warns_that_it_assumed_in_out():
    with pytest.warns(
        lj.LoraLayoutWarning, match=r"assumed the \(in, out\) layout.*in_axes=\(1,\)"
    ):
        lj.eqx.split(
            eqx.nn.MLP(D, 4, 32, 2, key=jax.random.key(0)),
            lj.LoraRule(r"layers/\d/weight", rank=4),
            key=jax.random.key(1),
        )


def test_zero_init_training_and_merge(net):
    model, (frozen, trainable, static, apply) = net
    np.testing.assert_allclose(apply(frozen, trainable, IDS), batched(model, IDS), atol=1e-6)
    target = jax.random.normal(jax.random.key(3), (3, T, 4))
    trainable, losses = adamw_steps(apply, frozen, trainable, (IDS,), target)
    assert losses[-1] < 0.9 * losses[0]
    merged = lj.eqx.merge(static, frozen, trainable)
    assert isinstance(merged, Net)
    np.testing.assert_allclose(batched(merged, IDS), apply(frozen, trainable, IDS), atol=1e-5)
    # Independent: the (out, in) weight's update is (a @ b).T, formed in float64.
    t = trainable.mlp.layers[0].weight
    want = (
        np.asarray(model.mlp.layers[0].weight, np.float64)
        + t.scale * (np.asarray(t.a, np.float64) @ np.asarray(t.b, np.float64)).T
    )
    np.testing.assert_allclose(merged.mlp.layers[0].weight, want, atol=1e-6)
    unmerged = lj.unmerge(eqx.partition(merged, eqx.is_array)[0], trainable)
    np.testing.assert_allclose(unmerged.mlp.layers[0].weight, model.mlp.layers[0].weight, atol=1e-6)


def test_nf4_base_and_checkpoint_round_trip(net, tmp_path):
    _, (frozen, trainable, static, apply) = net
    qfrozen = lj.quantize(frozen, r"mlp/layers/[01]/weight")
    assert isinstance(qfrozen.mlp.layers[0].weight, lj.NF4Array)
    t = with_b(trainable, jax.random.key(5), 0.1)
    dense = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, lj.NF4Array) else w,
        qfrozen,
        is_leaf=lambda x: isinstance(x, lj.NF4Array),
    )
    np.testing.assert_allclose(apply(qfrozen, t, IDS), apply(dense, t, IDS), atol=1e-5)
    path = lj.save_adapters(tmp_path / "ckpt", t, rules=RULES, base=frozen)
    back = lj.load_adapters(path, like=t)
    assert type(back) is Net
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(t)):
        np.testing.assert_array_equal(x, y)


class _TorchMLP:
    """torch twin of eqx.nn.MLP(D, 4, 32, 2): Linear-ReLU-Linear-ReLU-Linear."""

    @staticmethod
    def build(mlp):
        import torch

        layers = []
        for i, lin in enumerate(mlp.layers):
            t = torch.nn.Linear(lin.in_features, lin.out_features)
            with torch.no_grad():
                t.weight.copy_(torch.tensor(np.asarray(lin.weight)))
                t.bias.copy_(torch.tensor(np.asarray(lin.bias)))
            layers += [t] + ([torch.nn.ReLU()] if i < len(mlp.layers) - 1 else [])
        return torch.nn.Sequential(*layers).eval()


KEY_MAP = KeyMap(
    tuple(
        KeyEntry(f"layers/{i}/{name}", f"{2 * i}.{name}", kind)
        for i in range(3)
        for name, kind in (("weight", "linear_out_in"), ("bias", "vector"))
    )
)


def test_peft_export_and_import_of_a_torch_layout_model(tmp_path):
    import peft
    import torch

    mlp = eqx.nn.MLP(D, 4, 32, 2, key=jax.random.key(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, D)))
    rules = [lj.LoraRule(r"layers/[02]/weight", rank=4, alpha=8)]  # mlp paths
    frozen, trainable, static, apply = lj.eqx.split(
        mlp, rules, key=jax.random.key(2), args=(x,), call=batched, strict=True
    )
    trainable = with_b(trainable, jax.random.key(4))
    ours = np.asarray(apply(frozen, trainable, x))
    base = _TorchMLP.build(mlp)
    lj.peft.save_pretrained(tmp_path / "ours", trainable, key_map=KEY_MAP)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        ref, plain = pm(torch.tensor(x)).numpy(), base(torch.tensor(x)).numpy()
    assert np.abs(ref - plain).max() > 1e-2
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # The other way: an adapter PEFT made (random A and B) reads back to PEFT's outputs.
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "4"], init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = lj.peft.load_pretrained(tmp_path / "theirs", frozen, key_map=KEY_MAP)
    assert loaded.layers[0].weight.in_axes == (1,) and loaded.layers[0].weight.rank == 2
    with torch.no_grad():
        want = theirs(torch.tensor(x)).numpy()
    np.testing.assert_allclose(apply(frozen, loaded, x), want, atol=1e-4)


def test_peft_export_refuses_factors_on_the_wrong_side(tmp_path):
    mlp = eqx.nn.MLP(D, 4, 32, 2, key=jax.random.key(0))
    params, _ = eqx.partition(mlp, eqx.is_array)
    rules = lj.LoraRule("layers/0/weight", rank=2, in_axes=(0,))  # wrong for (out, in)
    _, trainable = lj.split(params, rules, key=jax.random.key(1))
    with pytest.raises(
        ValueError, match=r"'layers/0/weight': the key map's layout 'linear_out_in'"
    ):
        lj.peft.save_pretrained(tmp_path / "x", trainable, key_map=KEY_MAP)
