"""The engine on the code real models are made of: every pattern factored exactly (strict=True).

Each case is a small function written the way model code writes it (fused QKV, MoE experts,
tensor-parallel MLP, stacked layers, remat policies, vmapped lookups, quantised stacks).
Values and gradients of the factors are checked, eagerly and under jit, against a float64
dense computation written from the formula ``W = W0 + scale * a @ b`` (independent of the
engine), under both settings of ``jax_remat3`` and ``jax_custom_vjp3``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax._src.core.factors import factor_specs
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.trees import is_node

D, H, HD, T, B = 16, 4, 4, 5, 2


@pytest.fixture(params=[False, True], ids=["jax-default", "remat3+custom_vjp3"])
def hi_flags(request):
    """Run a test with ``jax_remat3`` and ``jax_custom_vjp3`` both off, then both on."""
    old = jax.config.jax_remat3, jax.config.jax_custom_vjp3
    jax.config.update("jax_remat3", request.param)
    jax.config.update("jax_custom_vjp3", request.param)
    yield request.param
    jax.config.update("jax_remat3", old[0])
    jax.config.update("jax_custom_vjp3", old[1])


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    params: dict
    fn: Callable[..., jax.Array]
    rules: tuple
    inputs: tuple
    quantize: tuple = ()  # paths to quantise (NF4) before the run


def _n(i, shape):
    return jax.random.normal(jax.random.key(i), shape, jnp.float32) * 0.3


def _x(i=100):
    return _n(i, (B, T, D))


# ----------------------------------------------------------------------------- model code


def _attention(x, q, k, v):
    sh = lambda t: t.reshape(B, T, H, HD)
    return jax.nn.dot_product_attention(sh(x @ q), sh(x @ k), sh(x @ v)).reshape(B, T, D)


def _fused_qkv_split(p, x):  # a fused projection split into q, k, v (Llama-style fused)
    q, k, v = jnp.split(p["qkv"], 3, axis=1)
    return jnp.tanh(_attention(x, q, k, v)) @ p["out"]


def _neox_qkv(p, x):  # GPT-NeoX: (d, heads, 3, head_dim) interleaved, sliced per head
    w = p["qkv"].reshape(D, H, 3, HD)
    proj = [jnp.einsum("btd,dhk->bthk", x, w[:, :, i]) for i in range(3)]
    return jax.nn.dot_product_attention(*proj).reshape(B, T, D) @ p["out"]


def _concat_qkv(p, x):  # separate weights fused at run time for one matmul
    qkv = jnp.concatenate([p["q"], p["k"], p["v"]], axis=1)
    q, k, v = jnp.split(x @ qkv, 3, axis=-1)
    sh = lambda t: t.reshape(B, T, H, HD)
    return jax.nn.dot_product_attention(sh(q), sh(k), sh(v)).reshape(B, T, D)


def _stacked_scan(p, x):  # per-layer weights stacked for a scan
    ws = jnp.stack([p["l0"], p["l1"], p["l2"]])
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


def _scaled(p, x):  # scalar, broadcast vector, stop_gradient
    gain = jnp.linspace(0.5, 1.5, D)
    w = p["w"]
    return x @ (0.5 * w) + jnp.tanh(x @ (w * gain)) + x @ lax.stop_gradient(w)


def _moe_ragged(p, x):  # grouped experts (MoE): tokens sorted by expert
    tokens = x.reshape(B * T, D)
    groups = jnp.array([3, 2, 4, 1], jnp.int32)
    h = jax.nn.gelu(lax.ragged_dot(tokens, p["up"], groups))
    return lax.ragged_dot(h, p["down"], groups)


def _moe_einsum(p, x):  # dense-dispatch experts: (experts, capacity, d)
    e = x.reshape(4, -1, D)[:, :2]
    h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", e, p["up"]))
    return jnp.einsum("ecf,efd->ecd", h, p["down"])


def _remat_policies(p, x):
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

    @jax.checkpoint
    def inner(w, h):
        return jnp.tanh(h @ w)

    outer = jax.checkpoint(lambda w, h: inner(w, h) @ w, policy=policy, prevent_cse=(True, False))
    return outer(p["w"], x)


def _barrier(p, x):
    w, h = lax.optimization_barrier((p["w"], x))
    return jnp.tanh(h @ w)


def _embed_vmapped(p, ids):  # eqx.nn.Embedding style: one row per example, vmapped
    h = jax.vmap(jax.vmap(lambda i: p["table"][i]))(ids)
    return h @ p["head"]


def _qlora_stack_cast(p, x):  # a quantised (L, in, out) stack cast before the scan
    ws = p["w"].astype(x.dtype)  # the stack is stored (quantised from) bfloat16
    return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


@jax.custom_vjp
def _act(h):
    return jnp.tanh(h)


_act.defvjp(lambda h: (jnp.tanh(h), h), lambda h, g: (g * (1 - jnp.tanh(h) ** 2),))


def _custom_activation(p, x):  # a custom_vjp on activations (the weight stays outside)
    return _act(x @ p["w"]) @ p["head"]


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D, use_bias=False)(h)), None


class _LinenModel(nn.Module):  # linen nn.scan over nn.remat layers (params stacked on axis 0)
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            nn.remat(_LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True},
            length=3,
        )  # fmt: skip
        return stack(name="layers")(x, None)[0]


_LINEN = _LinenModel()
_LINEN_PARAMS = _LINEN.init(jax.random.key(20), _x())


def _linen(p, x):
    return _LINEN.apply(p, x)


class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, h):
        return jnp.tanh(self.lin(h))


_NNX_DEF, _NNX_STATE = nnx.split(
    nnx.vmap(lambda k: _NnxBlock(nnx.Rngs(k)))(jax.random.split(jax.random.key(21), 3))
)


def _nnx(p, x):  # nnx.scan over nnx.remat: the scan also returns each layer's state
    blocks = nnx.merge(_NNX_DEF, nnx.State(p))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def step(h, block):
        return block(h)

    return step(x, blocks)


@jax.jit
def attention_block(w, x):
    return jnp.tanh(x @ w)


def _inner_jit(p, x):  # a jitted layer called inside the model
    return attention_block(p["w"], x) @ p["head"]


def _rule(pattern, rank=2, **kw):
    return lj.LoraRule(pattern, rank=rank, **kw)


CASES = [
    Case("fused_qkv_split", {"qkv": _n(1, (D, 3 * D)), "out": _n(2, (D, D))}, _fused_qkv_split,
         (_rule("qkv"), _rule("out")), (_x(),)),
    Case("neox_qkv", {"qkv": _n(3, (D, 3 * D)), "out": _n(4, (D, D))}, _neox_qkv,
         (_rule("qkv"),), (_x(),)),
    Case("concat_qkv", {k: _n(i, (D, D)) for i, k in enumerate("qkv")}, _concat_qkv,
         (_rule("q"), _rule("v", rank=3)), (_x(),)),
    Case("stacked_scan", {f"l{i}": _n(10 + i, (D, D)) for i in range(3)}, _stacked_scan,
         (_rule("l0"), _rule("l1"), _rule("l2")), (_x(),)),
    Case("scaled_stop_gradient", {"w": _n(5, (D, D))}, _scaled, (_rule("w"),), (_x(),)),
    Case("moe_ragged_dot", {"up": _n(6, (4, D, 8)), "down": _n(7, (4, 8, D))}, _moe_ragged,
         (_rule("up", stack_axes=(0,)), _rule("down", stack_axes=(0,))), (_x(),)),
    Case("moe_einsum", {"up": _n(8, (4, D, 8)), "down": _n(9, (4, 8, D))}, _moe_einsum,
         (_rule("up", stack_axes=(0,)), _rule("down", stack_axes=(0,))), (_n(99, (4, 4, D)),)),
    Case("remat_policies", {"w": _n(13, (D, D))}, _remat_policies, (_rule("w"),), (_x(),)),
    Case("barrier_weight_first", {"w": _n(14, (D, D))}, _barrier, (_rule("w"),), (_x(),)),
    Case("embedding_vmapped", {"table": _n(15, (20, D)), "head": _n(16, (D, 3))}, _embed_vmapped,
         (_rule("table"), _rule("head")), (jnp.array([[1, 4, 19], [0, 7, 7]], jnp.int32),)),
    Case("qlora_stack_cast", {"w": _n(17, (3, D, D)).astype(jnp.bfloat16)}, _qlora_stack_cast,
         (_rule("w", stack_axes=(0,)),), (_x(),), quantize=("w",)),
    Case("linen_scan_remat", _LINEN_PARAMS, _linen, (_rule(".*kernel", stack_axes=(0,)),),
         (_x(),)),
    Case("nnx_scan_remat", nnx.to_pure_dict(_NNX_STATE), _nnx,
         (_rule(".*kernel", stack_axes=(0,)),), (_x(),)),
    Case("inner_jit", {"w": _n(22, (D, D)), "head": _n(23, (D, 3))}, _inner_jit,
         (_rule("w"),), (_x(),)),
    Case("custom_vjp_activation", {"w": _n(18, (D, D)), "head": _n(19, (D, 3))},
         _custom_activation, (_rule("w"), _rule("head")), (_x(),)),
]  # fmt: skip


def _prepare(case: Case):
    frozen, trainable = lj.split(case.params, list(case.rules), key=jax.random.key(0))
    trainable = jax.tree.map(
        lambda t: t.with_factors(t.a, _n(7, t.b.shape)) if isinstance(t, lj.LoraFactors) else t,
        trainable,
        is_leaf=lambda t: isinstance(t, lj.LoraFactors),
    )
    if case.quantize:
        frozen = lj.quantize(frozen, list(case.quantize), stack_axes=1)
    return frozen, trainable


def _dense64(case: Case, frozen: Any, trainable: Any):
    """loss(a, b) and its gradient in float64, from W = W0 + scale * einsum(a, b)."""
    leaves = jax.tree.leaves(trainable, is_leaf=lambda t: isinstance(t, lj.LoraFactors))
    factors = [t for t in leaves if isinstance(t, lj.LoraFactors)]
    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))

        def loss(ab):
            it = iter(ab)

            def eff(w, t):
                if isinstance(w, QuantizedArray):
                    w = w.dequantize()
                if not isinstance(t, lj.LoraFactors):
                    return f64(t if w is None else w)
                a, b = next(it)
                sa, sb, sw = factor_specs(t)
                return f64(w) + t.scale * jnp.einsum(f"{sa},{sb}->{sw}", a, b)

            params = jax.tree.map(eff, frozen, trainable, is_leaf=is_node)
            x = [f64(x) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in case.inputs]
            with jax.numpy_dtype_promotion("standard"):  # library float32 constants
                out = case.fn(params, *x)
            return jnp.sum(jnp.sin(out)), out

        ab = [(f64(t.a), f64(t.b)) for t in factors]
        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(ab)
        return np.asarray(out), float(value), [(np.asarray(a), np.asarray(b)) for a, b in grads]


def _factored(case: Case, frozen: Any, trainable: Any, jit: bool):
    apply = lj.lora_apply(case.fn, strict=True)

    def loss(t):
        out = apply(frozen, t, *case.inputs)
        return jnp.sum(jnp.sin(out)), out

    step = jax.value_and_grad(loss, has_aux=True)
    (value, out), grads = (jax.jit(step) if jit else step)(trainable)
    g = [t for t in jax.tree.leaves(grads, is_leaf=lambda t: isinstance(t, lj.LoraFactors))]
    return np.asarray(out), float(value), [(np.asarray(t.a), np.asarray(t.b)) for t in g]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pattern_matches_float64_dense(case, hi_flags):
    frozen, trainable = _prepare(case)
    out64, value64, grads64 = _dense64(case, frozen, trainable)
    for jit in (True,) if hi_flags else (False, True):  # eager once, with jax's defaults
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no materialisation warning either
            out, value, grads = _factored(case, frozen, trainable, jit)
        np.testing.assert_allclose(out, out64, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(value, value64, rtol=2e-4, atol=1e-4)
        assert len(grads) == len(grads64) > 0
        for (ga, gb), (ra, rb) in zip(grads, grads64):
            np.testing.assert_allclose(ga, ra, rtol=2e-3, atol=2e-4)
            np.testing.assert_allclose(gb, rb, rtol=2e-3, atol=2e-4)


def _dot_shapes(jaxpr) -> set:
    """Output shapes of every dot_general / ragged_dot (sub-jaxprs included)."""
    from jax.extend import core as jcore

    shapes = set()
    for eqn in jaxpr.eqns:
        if "dot" in eqn.primitive.name:
            shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for sub in jcore.jaxprs_in_params(eqn.params):
            shapes |= _dot_shapes(sub)
    return shapes


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_no_product_of_weight_shape_is_formed(case):
    """No matmul outputs an adapted weight's shape (a @ b, or a dense weight gradient)."""
    frozen, trainable = _prepare(case)
    apply = lj.lora_apply(case.fn, strict=True)
    grad = jax.grad(lambda t: jnp.sum(apply(frozen, t, *case.inputs)))
    jaxpr = jax.make_jaxpr(grad)(trainable).jaxpr
    weights = set()
    for t in jax.tree.leaves(trainable, is_leaf=lambda t: isinstance(t, lj.LoraFactors)):
        if isinstance(t, lj.LoraFactors):
            weights |= {t.shape, t.shape[1:]} if t.stack_axes else {t.shape}
    assert not weights & _dot_shapes(jaxpr)


# ----------------------------------------------------------------------------- meshes


def _auto_mesh():
    return jax.make_mesh((8,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))


def test_tensor_parallel_mlp_under_shard_map(hi_flags):
    """Megatron-style MLP by hand: column-parallel up, row-parallel down, psum."""
    mesh = _auto_mesh()

    def mlp(p, x):
        body = lambda x, w1, w2: lax.psum(jax.nn.gelu(x @ w1) @ w2, "tp")
        specs = (P(), P(None, "tp"), P("tp", None))
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())(x, p["up"], p["dn"])

    case = Case("tp_mlp", {"up": _n(30, (D, 32)), "dn": _n(31, (32, D))}, mlp,
                (_rule("up"), _rule("dn")), (_x(),))  # fmt: skip
    test_pattern_matches_float64_dense(case, hi_flags)


def _lowered(fn, params, rules, x):
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    apply = lj.lora_apply(fn, strict=True)
    return jax.jit(apply).lower(frozen, trainable, x).as_text(debug_info=True)


def test_lowered_program_keeps_named_scope_and_sharding_constraint():
    mesh = _auto_mesh()

    def fn(p, x):
        with jax.named_scope("decoder_layer_7"):
            w = lax.with_sharding_constraint(p["w"], NamedSharding(mesh, P(None, "tp")))
            return jnp.tanh(x @ w)

    text = _lowered(fn, {"w": _n(40, (D, 32))}, [_rule("w")], _x())
    assert "decoder_layer_7" in text
    constraints = [ln for ln in text.splitlines() if "sharding_constraint" in ln]
    # the base (16, 32) keeps P(None, 'tp'); b (2, 32) gets the same column spec
    assert any('[{}, {"tp"}]> : tensor<16x32xf32>' in ln for ln in constraints), constraints
    assert any('[{}, {"tp"}]> : tensor<2x32xf32>' in ln for ln in constraints), constraints


# ----------------------------------------------------------------------------- losses


def test_while_loop_dropout_is_fresh_per_iteration():
    params = {"w": _n(50, (D, D))}
    frozen, trainable = lj.split(params, [_rule("w", dropout=0.5)], key=jax.random.key(0))
    trainable = jax.tree.map(
        lambda t: t.with_factors(t.a, _n(51, t.b.shape)) if isinstance(t, lj.LoraFactors) else t,
        trainable,
        is_leaf=lambda t: isinstance(t, lj.LoraFactors),
    )

    def fn(p, x):
        def body(state):
            i, buf = state
            return i + 1, lax.dynamic_update_index_in_dim(buf, x @ p["w"], i, 0)

        return lax.while_loop(lambda s: s[0] < 3, body, (0, jnp.zeros((3, *x.shape))))[1]

    out = lj.lora_apply(fn)(frozen, trainable, _n(52, (4, D)), lora_rng=jax.random.key(9))
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])


def test_unread_adapted_weight_warns_and_strict_raises():
    params = {"w": _n(60, (D, D)), "head": _n(61, (D, 2))}
    captured = params["w"]
    frozen, trainable = lj.split(params, [_rule("w"), _rule("head")], key=jax.random.key(0))
    fn = lambda p, x: (x @ captured) @ p["head"]  # 'w' captured as a constant
    with pytest.warns(lj.LoraUnusedWarning, match=r"'w' .*never reads.*constant"):
        lj.lora_apply(fn)(frozen, trainable, _x())
    with pytest.raises(lj.LoraFactoringError, match=r"'w' .*never reads"):
        lj.lora_apply(fn, strict=True)(frozen, trainable, _x())


def test_weight_inside_custom_vjp_is_reported(hi_flags):
    """A custom rule cannot see inside an implicit weight: strict mode says so (both
    custom_vjp implementations are read)."""

    @jax.custom_vjp
    def proj(w, x):
        return x @ w

    proj.defvjp(lambda w, x: (x @ w, (w, x)), lambda r, g: (r[1].T @ g, g @ r[0].T))
    params = {"w": _n(70, (D, D))}
    frozen, trainable = lj.split(params, [_rule("w")], key=jax.random.key(0))
    fn = lambda p, x: proj(p["w"], x)
    with pytest.raises(lj.LoraFactoringError, match=r"'w' enters a .*custom"):
        lj.lora_apply(fn, strict=True)(frozen, trainable, _n(71, (3, D)))
    with pytest.warns(lj.LoraCustomRuleWarning):
        out = lj.lora_apply(fn)(frozen, trainable, _n(71, (3, D)))
    ref = lj.lora_apply(fn, materialize=True)(frozen, trainable, _n(71, (3, D)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_inner_jit_is_kept_with_its_name():
    case = next(c for c in CASES if c.name == "inner_jit")
    frozen, trainable = _prepare(case)
    jaxpr = jax.make_jaxpr(lambda t: lj.lora_apply(case.fn, strict=True)(frozen, t, _x()))
    names = [e.params.get("name") for e in jaxpr(trainable).jaxpr.eqns]
    assert "attention_block" in names, names  # not inlined into the caller
