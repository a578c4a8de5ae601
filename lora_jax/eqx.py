"""Equinox front door: ``lj.eqx.split(model, rules, key=...)`` and ``lj.eqx.merge``.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx, lora_jax as lj
    >>> model = eqx.nn.Linear(8, 4, key=jax.random.key(0))
    >>> x = jnp.ones(8)
    >>> frozen, trainable, static, apply = lj.eqx.split(
    ...     model, lj.LoraRule("weight", rank=2), key=jax.random.key(1), args=(x,))
    >>> trainable.weight.in_axes  # eqx.nn.Linear.weight is (out, in): `a` takes axis 1
    (1,)
    >>> bool(jnp.allclose(apply(frozen, trainable, x), model(x)))
    True
"""

from lora_jax._src.frontdoor.libraries import EqxLora as EqxLora
from lora_jax._src.frontdoor.libraries import eqx_merge as merge
from lora_jax._src.frontdoor.libraries import eqx_split as split

__all__ = ["EqxLora", "merge", "split"]
