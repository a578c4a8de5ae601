"""tunix's own NNX Llama 3, Qwen 3 and Gemma classes with tiny configs, adapted with lj.nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from library_helpers import adamw_steps, factor_leaves, with_b

import lora_jax as lj

pytest.importorskip("tunix")
from tunix.models.gemma import model as gemma  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402

SIZES = dict(num_layers=2, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8, num_kv_heads=1)
ROPE = dict(rope_theta=10000, norm_eps=1e-6)


def _models():
    return {
        "llama3": lambda: llama3.Llama3(
            llama3.ModelConfig(vocab_size=64, **SIZES, **ROPE), rngs=nnx.Rngs(0)
        ),
        "qwen3": lambda: qwen3.Qwen3(
            qwen3.ModelConfig(vocab_size=64, **SIZES, **ROPE), rngs=nnx.Rngs(0)
        ),
        "gemma": lambda: gemma.Transformer(
            gemma.ModelConfig(
                num_embed=64,
                **SIZES,
                final_logit_softcap=None,
                use_post_attn_norm=False,
                use_pre_ffw_norm=False,
                use_post_ffw_norm=False,
                attention_types=[gemma.AttentionType.GLOBAL] * 2,
            ),
            rngs=nnx.Rngs(0),
        ),
    }


IDS = jnp.asarray([[3, 9, 27, 1, 40], [5, 6, 7, 8, 60]], jnp.int32)
POS = jnp.broadcast_to(jnp.arange(5), (2, 5))
MASK = jnp.broadcast_to(jnp.tril(jnp.ones((5, 5), bool)), (2, 5, 5))
RULES = [
    lj.LoraRule(r"layers/\d+/attn/(q_proj|v_proj|q_einsum|kv_einsum)/w/value", rank=2),
    lj.LoraRule(r"layers/\d+/mlp/.*/(kernel|w)/value", rank=2),
]
call = lambda m, ids: m(ids, POS, None, MASK)[0]


@pytest.fixture(autouse=True)
def standard_promotion():
    """tunix's rotary embeddings mix int32 positions with float32 (not strict-promotion clean)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma"], ids=str)
def test_tunix_model(name, tmp_path):
    model = _models()[name]()
    graphdef, frozen, trainable, apply = lj.nnx.split(
        model, RULES, key=jax.random.key(1), args=(IDS,), call=call, strict=True
    )
    assert len(factor_leaves(trainable)) == 2 * 5  # q, v, gate, up, down per layer
    np.testing.assert_allclose(apply(frozen, trainable, IDS), call(model, IDS), atol=1e-5)
    target = jax.random.normal(jax.random.key(2), call(model, IDS).shape)
    trainable, losses = adamw_steps(apply, frozen, trainable, (IDS,), target, n=4)
    assert losses[-1] < losses[0]
    merged = lj.nnx.merge(model, frozen, trainable)
    np.testing.assert_allclose(call(merged, IDS), apply(frozen, trainable, IDS), atol=1e-4)
    if name == "gemma":  # kv_einsum (2, kv_heads, embed, head_dim) serves k and v
        s = lj.summary(frozen, trainable)
        assert any("kv_einsum" in r.path and r.fused_axis == 0 for r in s.rows)
        assert "stack_axes=(0,)" in str(s)
    q = lj.quantize(frozen, r"layers/\d+/mlp/.*/(kernel|w)/value")
    t = with_b(trainable, jax.random.key(3), 0.05)
    deq = jax.tree.map(
        lambda w: w.dequantize() if isinstance(w, lj.NF4Array) else w,
        q,
        is_leaf=lambda x: isinstance(x, lj.NF4Array),
    )
    np.testing.assert_allclose(apply(q, t, IDS), apply(deq, t, IDS), atol=1e-4)
    back = lj.load_adapters(lj.save_adapters(tmp_path / "c", t, rules=RULES, base=frozen), like=t)
    for x, y in zip(factor_leaves(back), factor_leaves(t)):
        np.testing.assert_array_equal(x.a, y.a)
