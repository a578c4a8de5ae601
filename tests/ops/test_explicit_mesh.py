"""Training and serving on a mesh with Explicit axes (``jax.make_mesh``'s default), 8 devices.

On such a mesh a value's sharding is part of its type: the traced program of ``fn`` must
see the dense weight's sharding, and every product the engine adds (``x @ a``, ``@ b``, a
dequantised NF4 base) must come out typed as the equation it stands for. References are
float64 dense computations on one device (no lora_jax code).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj

R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def mesh():
    m = jax.make_mesh((2, 4), ("data", "model"))  # no axis_types: Explicit
    assert set(m.axis_types) == {jax.sharding.AxisType.Explicit}
    return m


def _params():
    rng = np.random.default_rng(0)
    return {
        "l1": {"kernel": rng.standard_normal((64, 32)).astype(np.float32)},
        "l2": {"kernel": rng.standard_normal((32, 64)).astype(np.float32)},
    }


def _mlp(quantised, seen=None):
    """A tensor-parallel MLP written for Explicit axes: a product over a sharded axis names
    its output. LoRA: ``x @ W1`` is column-parallel, ``(data, model)`` by itself.

    ``seen`` collects the hidden activation's type as ``fn`` is traced."""

    def mlp(p, x):
        first = P("data", None) if quantised else None
        h = jax.nn.relu(jnp.dot(x, p["l1"]["kernel"], out_sharding=first))
        if seen is not None:
            seen.append(jax.typeof(h).sharding.spec)
        return jnp.dot(h, p["l2"]["kernel"], out_sharding=P("data", None))

    return mlp


def _place(mesh, params, quantised):
    # LoRA: Megatron column/row split. NF4: whole rows per shard (nf4_shardings' layout).
    specs = {"l1": P(None, "model"), "l2": P("model", None)}
    out = {}
    for name, w in params.items():
        w = jnp.asarray(w["kernel"])
        if quantised:
            q = lj.quantize_nf4(w)
            rows = NamedSharding(mesh, P("model", None))
            out[name] = {"kernel": jax.device_put(q, lj.nf4_shardings(q, rows))}
        else:
            out[name] = {"kernel": jax.device_put(w, NamedSharding(mesh, specs[name]))}
    return out


def _randomize(trainable):
    leaves, tree = jax.tree.flatten(trainable)
    rng = np.random.default_rng(1)
    return jax.tree.unflatten(
        tree,
        [x + jax.device_put(0.1 * rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
         for x in leaves],
    )  # fmt: skip


def _reference(bases, factors, x):
    """float64 loss and factor gradients of mean(mlp(W0 + s a@b, x)^2), by jax.grad in x64."""
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda v: jnp.asarray(np.asarray(v), jnp.float64), t)  # noqa: E731
        w0, ab, x = f64(bases), f64(factors), f64(x)

        def loss(ab):
            w = {k: w0[k] + (ALPHA / R) * ab[k][0] @ ab[k][1] for k in w0}
            h = jax.nn.relu(x @ w["l1"])
            return jnp.mean((h @ w["l2"]) ** 2)

        value, grads = jax.value_and_grad(loss)(ab)
        return float(value), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("quantised", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_training_step_matches_float64_and_keeps_every_type(mesh, quantised, jit):
    raw = _params()
    with jax.set_mesh(mesh):
        params = _place(mesh, raw, quantised)
        frozen, trainable = lj.split(params, lj.LoraRule(".*kernel", rank=R, alpha=ALPHA),
                                     key=jax.random.key(0))  # fmt: skip
        trainable = _randomize(trainable)
        x = jax.device_put(
            jnp.asarray(np.random.default_rng(2).standard_normal((8, 64)), jnp.float32),
            NamedSharding(mesh, P("data", None)),
        )
        seen = []
        mlp = _mlp(quantised, seen)
        loss = lambda t, x: jnp.mean(lj.lora_apply(mlp, strict=True)(frozen, t, x) ** 2)  # noqa: E731
        grad = jax.jit(jax.value_and_grad(loss)) if jit else jax.value_and_grad(loss)
        value, grads = grad(trainable, x)
        opt = optax.sgd(0.1)
        step = jax.jit(lambda t, s, g: optax.apply_updates(t, opt.update(g, s, t)[0]))
        moved = step(trainable, opt.init(trainable), grads)

    dense = {k: np.asarray(lj.dequantize_nf4(frozen[k]["kernel"]) if quantised
                           else frozen[k]["kernel"]) for k in raw}  # fmt: skip
    factors = {k: (trainable[k]["kernel"].a, trainable[k]["kernel"].b) for k in raw}
    want_value, want_grads = _reference(dense, factors, x)
    np.testing.assert_allclose(float(value), want_value, rtol=2e-5)
    for k in raw:
        g = grads[k]["kernel"]
        for got, want, like in zip((g.a, g.b), want_grads[k], factors[k]):
            atol = 2e-4 * np.abs(want).max()
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=atol)
            # a gradient is typed as its factor (optax and the next step see the same types)
            assert jax.typeof(got).sharding.spec == jax.typeof(like).sharding.spec
    for k in raw:
        assert jax.typeof(moved[k]["kernel"].b).sharding == jax.typeof(factors[k][1]).sharding
    # fn saw the dense weight's type: the column-parallel activation stays sharded over
    # 'model' (traced without the base's sharding it would be gathered to (data, None))
    assert set(seen) == {P("data", None) if quantised else P("data", "model")}
    if not quantised:  # the column-parallel factor stays sharded, never gathered
        assert trainable["l1"]["kernel"].b.sharding.spec == P(None, "model")
        assert grads["l1"]["kernel"].b.sharding.spec == P(None, "model")


def test_adapter_bank_forward_on_an_explicit_mesh():
    # Serving: replicated weights, the batch and its adapter ids sharded over 8 devices. The
    # bank runs fn per example (a batch of one), so fn names no batch sharding itself.
    mesh = jax.make_mesh((8,), ("data",))
    raw = _params()
    mlp = lambda p, x: jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
    with jax.set_mesh(mesh):
        replicated = NamedSharding(mesh, P())
        params = jax.tree.map(lambda w: jax.device_put(jnp.asarray(w), replicated), raw)
        frozen, t1 = lj.split(params, lj.LoraRule(".*kernel", rank=R, alpha=ALPHA),
                              key=jax.random.key(0))  # fmt: skip
        adapters = [_randomize(t1), jax.tree.map(lambda v: 2 * v, _randomize(t1))]
        bank = lj.stack_adapters(adapters)
        x = jax.device_put(
            jnp.asarray(np.random.default_rng(3).standard_normal((16, 64)), jnp.float32),
            NamedSharding(mesh, P("data", None)),
        )
        ids = jax.device_put(jnp.array([0, 1, 2, 2] * 4, jnp.int32), NamedSharding(mesh, P("data")))
        run = jax.jit(lambda b, i, x: lj.lora_apply(mlp, strict=True)(frozen, b, x, adapter_ids=i))
        y = run(bank, ids, x)
        # Every example on one slot: the batch runs as one call (the bank's lax.cond).
        same = jax.device_put(jnp.full((16,), 2, jnp.int32), NamedSharding(mesh, P("data")))
        y_same = run(bank, same, x)
    assert jax.typeof(y).sharding.spec == P("data", None)
    xs = np.asarray(x, np.float64)
    for out, slots in ((y, ids), (y_same, same)):
        for row, slot in enumerate(np.asarray(slots)):  # slot 0 is the base, k adapter k - 1
            t = adapters[slot - 1]
            f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
            w = {k: f64(raw[k]["kernel"]) + (slot > 0) * (ALPHA / R)
                 * f64(t[k]["kernel"].a) @ f64(t[k]["kernel"].b) for k in raw}  # fmt: skip
            want = np.maximum(xs[row] @ w["l1"], 0) @ w["l2"]
            np.testing.assert_allclose(np.asarray(out)[row], want, rtol=1e-4, atol=1e-4)


def test_quantising_a_weight_sharded_inside_the_matrix_names_the_fix(mesh):
    w = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P(None, "model")))
    with pytest.raises(ValueError, match=r"sharded P\(None, 'model'\) over Explicit mesh axes"):
        lj.quantize_nf4(w)
    replicated = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P()))
    assert lj.quantize_nf4(replicated).shape == (64, 32)


def _model(name):
    """(params, rules, fn(p, ids) -> logits or hidden) of a tiny reference model."""
    from lora_jax.models import bert, gpt, llama

    key = jax.random.key(0)
    if name == "llama":
        cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2)  # fmt: skip
        rule = lj.LoraRule(r"layers/.*/kernel", rank=R, alpha=ALPHA, stack_axes=(0,), in_axes=(1,))
        rules = [rule, lj.LoraRule("embed_tokens/embedding", rank=R, alpha=ALPHA)]
        return llama.init(key, cfg), rules, lambda p, i: llama.forward(p, cfg, i)
    if name == "bert":
        cfg = bert.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64)  # fmt: skip
        rules = [lj.LoraRule(r".*/(query|value)/kernel|word_embeddings/embedding", rank=R,
                             alpha=ALPHA)]  # fmt: skip
        return bert.init(key, cfg), rules, lambda p, i: bert.forward(p, cfg, i)
    cfg = gpt.Config(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=16)
    rules = [lj.LoraRule(r"layers/.*/kernel", rank=R, alpha=ALPHA, stack_axes=(0,), in_axes=(1,))]
    return gpt.init(key, cfg), rules, lambda p, i: gpt.forward(p, cfg, i)


def _dense_weights(frozen, trainable):
    """W0 + scale * a @ b per adapted leaf, by einsum (no lora_jax code), float32."""

    def one(w, t):
        if not isinstance(t, lj.LoraFactors):
            return w
        letters = "abcdefgh"[: w.ndim]
        st = "".join(letters[i] for i in t.stack_axes)
        ins = "".join(letters[i] for i in t.in_axes)
        outs = "".join(letters[i] for i in t.out_axes)
        delta = jnp.einsum(f"{st}{ins}r,{st}r{outs}->{letters}", t.a, t.b)
        return w + t.scale * delta

    return jax.tree.map(one, frozen, trainable, is_leaf=lambda x: isinstance(x, lj.LoraFactors))


@pytest.mark.parametrize("name", ["llama", "bert", "gpt"])
def test_reference_models_train_on_an_explicit_data_mesh(name):
    """The reference models' lookups and reshapes name their output sharding: a LoRA
    step (embedding adapted too) runs on an 8-way Explicit data mesh, strict, and equals
    the dense weights' step off the mesh."""
    params, rules, fn = _model(name)
    frozen, trainable = lj.split(params, rules, key=jax.random.key(1))
    trainable = _randomize(trainable)
    ids = jax.random.randint(jax.random.key(2), (8, 6), 0, 64)

    def loss(tr, fr, i):
        return (lj.lora_apply(fn, strict=True)(fr, tr, i) ** 2).mean()

    def dense_loss(tr, fr, i):
        return (fn(_dense_weights(fr, tr), i) ** 2).mean()

    want_l, want_g = jax.jit(jax.value_and_grad(dense_loss))(trainable, frozen, ids)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        rep = NamedSharding(mesh, P())
        ids_s = jax.device_put(ids, NamedSharding(mesh, P("data")))
        got_l, got_g = jax.jit(jax.value_and_grad(loss))(
            jax.device_put(trainable, rep), jax.device_put(frozen, rep), ids_s
        )
        out = jax.jit(lj.lora_apply(fn, strict=True))(
            jax.device_put(frozen, rep), jax.device_put(trainable, rep), ids_s
        )
    assert jax.typeof(out).sharding.spec[0] == "data"  # rows stay with their device
    np.testing.assert_allclose(got_l, want_l, rtol=2e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6)
