"""Flax NNX front door: ``lj.nnx.split(module, rules, key=...)`` and ``lj.nnx.merge``.

Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 8))
    >>> graphdef, frozen, trainable, apply = lj.nnx.split(
    ...     model, lj.LoraRule("kernel/value", rank=2), key=jax.random.key(0), args=(x,))
    >>> bool(jnp.allclose(apply(frozen, trainable, x), model(x)))
    True
"""

from lora_jax._src.frontdoor.libraries import NnxLora as NnxLora
from lora_jax._src.frontdoor.libraries import nnx_merge as merge
from lora_jax._src.frontdoor.libraries import nnx_split as split

__all__ = ["NnxLora", "merge", "split"]
