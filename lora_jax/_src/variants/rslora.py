"""rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA"): the update is scaled by ``alpha / sqrt(r)`` instead of ``alpha / r``.

The scale is a static field of :class:`~lora_jax.LoraFactors` (``rslora``), so this
variant adds no arrays and no terms; registering it names it for rules and summaries.
PEFT writes it as ``use_rslora``.
"""

from __future__ import annotations

from typing import Any

from lora_jax._src.core import variant as _variant


class RsLora(_variant.Variant):
    name = "rslora"
    title = "rsLoRA"
    exclusive = False
    peft = "lora"

    def wants(self, rule: Any) -> bool:
        return bool(rule.rslora)


RSLORA = _variant.register(RsLora())
