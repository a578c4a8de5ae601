"""memory_report's figures against a hand count from the shapes (bytes = elements x itemsize)."""

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj


def test_memory_report_figures_match_hand_count():
    params = {
        "w": jnp.zeros((64, 32), jnp.bfloat16),  # adapted, rank 4
        "q": jnp.zeros((128, 64), jnp.float32),  # quantised to NF4, not adapted
        "head": jnp.zeros((32, 10), jnp.float32),  # trained fully
    }
    rules = [lj.LoraRule("w", rank=4), lj.LoraRule("head", full=True)]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    frozen = lj.quantize(frozen, "q")
    opt = optax.adam(1e-3).init(trainable)
    r = lj.memory_report(frozen, trainable, optimizer_state=opt)

    lora = (64 * 4 + 4 * 32) * 4  # a (64, 4) and b (4, 32) in float32
    head = 32 * 10 * 4
    assert r.trainable_params == 64 * 4 + 4 * 32 + 32 * 10
    assert r.trainable_bytes == lora + head
    assert r.gradient_bytes == lora + head  # one gradient per trainable element
    assert r.optimizer_bytes == 2 * (lora + head) + 4  # Adam's mu and nu, plus an int32 count
    # NF4 of 8192 weights, blocks of 64: 4-bit codes, one uint8 absmax code per block, one
    # float32 scale per 256 blocks, one float32 offset.
    nf4 = 8192 // 2 + 8192 // 64 + 4 + 4
    assert r.quantized_params == 128 * 64 and r.quantized_bytes == nf4
    assert r.frozen_bytes == 64 * 32 * 2 + nf4  # the bf16 base of "w" and the NF4 "q"
    assert r.frozen_params == 64 * 32 + 128 * 64
    assert r.total_bytes == r.frozen_bytes + 2 * (lora + head) + r.optimizer_bytes
    assert abs(r.quantized_bits_per_weight - 8 * nf4 / 8192) < 1e-9
