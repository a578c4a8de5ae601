"""lora_jax: LoRA and QLoRA fine-tuning for any JAX function."""

from ._apply import lora_apply as lora_apply
from ._config import LoraRule as LoraRule
from ._factors import LoraFactors as LoraFactors
from ._factors import lora_delta as lora_delta
from ._qarray import QuantizedArray as QuantizedArray
from ._split import split as split
from ._summary import LoraSummary as LoraSummary
from ._summary import summary as summary
from ._tree import combine as combine
from ._tree import count_params as count_params
from ._tree import merge as merge
from ._tree import unmerge as unmerge

__version__ = "0.1.0"

__all__ = [
    "LoraFactors",
    "LoraRule",
    "LoraSummary",
    "QuantizedArray",
    "combine",
    "count_params",
    "lora_apply",
    "lora_delta",
    "merge",
    "split",
    "summary",
    "unmerge",
]
