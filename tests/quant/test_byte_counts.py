"""One byte count everywhere: lj.summary, lj.memory_report and QuantizedArray.nbytes agree for
every quantised type, and equal the storage size written out from the formats' field tables.
"""

import math

import jax
import jax.numpy as jnp
import pytest

import lora_jax as lj


def _nf4_bytes(n: int, double_quant: bool, block: int = 64) -> int:
    """NF4 storage from the field table: packed nibbles, then 8-bit or float32 absmax."""
    nb = math.ceil(n / block)
    if double_quant:
        return math.ceil(n / 2) + nb + 4 * math.ceil(nb / 256) + 4  # qabsmax, absmax2, offset
    return math.ceil(n / 2) + 4 * nb


def _int4_bytes(n: int, block: int = 64) -> int:
    return math.ceil(n / 2) + 4 * math.ceil(n / block)  # int4 codes two per byte, f32 scales


CASES = {
    "nf4": (lambda w: lj.quantize_nf4(w), lambda n: _nf4_bytes(n, True)),
    "nf4_plain": (lambda w: lj.quantize_nf4(w, double_quant=False), lambda n: _nf4_bytes(n, False)),
    "int4": (lambda w: lj.quantize_int4(w), _int4_bytes),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("shape", [(256, 256), (5, 7)])
def test_summary_memory_report_and_nbytes_count_the_same_stored_bytes(kind, shape):
    quantize, expected = CASES[kind]
    w = jax.random.normal(jax.random.key(0), shape)
    frozen, trainable = lj.split({"w": w}, lj.LoraRule("w", rank=2), key=jax.random.key(1))
    frozen = {"w": quantize(frozen["w"])}
    stored = expected(math.prod(shape))
    assert frozen["w"].nbytes == stored
    assert lj.summary(frozen, trainable).frozen_bytes == stored
    report = lj.memory_report(frozen, trainable)
    assert report.frozen_bytes == stored
    assert lj.summary(frozen, trainable).trainable_bytes == report.trainable_bytes


def test_int4_base_of_256x256_is_36864_bytes_in_the_summary():
    """The drift that was: the summary counted each int4 code as a whole byte (69,632)."""
    q = lj.quantize_int4(jnp.ones((256, 256)))
    _, trainable = lj.split(
        {"w": jnp.ones((256, 256))}, lj.LoraRule("w", rank=2), key=jax.random.key(0)
    )
    assert lj.summary({"w": q}, trainable).frozen_bytes == 36_864 == q.nbytes


def test_stacked_and_abstract_trees_count_alike():
    w = jax.random.normal(jax.random.key(0), (3, 128, 64))
    q = lj.quantize_nf4(w, stack_axes=1)
    assert q.nbytes == 3 * _nf4_bytes(128 * 64, True)
    concrete = {"w": lj.quantize_int4(w, stack_axes=1)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), concrete)
    assert lj.memory_report(abstract).frozen_bytes == lj.memory_report(concrete).frozen_bytes
    assert lj.memory_report(concrete).frozen_bytes == 3 * _int4_bytes(128 * 64)
