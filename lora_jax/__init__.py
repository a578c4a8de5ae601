"""lora_jax: LoRA and QLoRA fine-tuning for any JAX function."""

from . import checkpoint as checkpoint
from . import peft as peft
from ._apply import lora_apply as lora_apply
from ._config import LoraRule as LoraRule
from ._factors import LoraFactors as LoraFactors
from ._factors import lora_delta as lora_delta
from ._qarray import QuantizedArray as QuantizedArray
from ._sharding import factor_shardings as factor_shardings
from ._sharding import split_sharded as split_sharded
from ._split import split as split
from ._summary import LoraSummary as LoraSummary
from ._summary import summary as summary
from ._tree import combine as combine
from ._tree import count_params as count_params
from ._tree import merge as merge
from ._tree import unmerge as unmerge
from .checkpoint import load_adapters as load_adapters
from .checkpoint import save_adapters as save_adapters

__version__ = "0.1.0"

__all__ = [
    "checkpoint",
    "peft",
    "LoraFactors",
    "LoraRule",
    "LoraSummary",
    "QuantizedArray",
    "combine",
    "count_params",
    "factor_shardings",
    "lora_apply",
    "load_adapters",
    "lora_delta",
    "merge",
    "save_adapters",
    "split",
    "split_sharded",
    "summary",
    "unmerge",
]
