"""lora_jax: LoRA and QLoRA fine-tuning for any JAX function."""

from . import checkpoint as checkpoint
from . import peft as peft
from ._adalora import AdaLoraState as AdaLoraState
from ._adalora import RankAllocator as RankAllocator
from ._adalora import orthogonal_regularizer as orthogonal_regularizer
from ._adapter_set import AdapterSet as AdapterSet
from ._apply import lora_apply as lora_apply
from ._bank import AdapterBank as AdapterBank
from ._bank import stack_adapters as stack_adapters
from ._combine import combine_adapters as combine_adapters
from ._config import LoraRule as LoraRule
from ._engine import LoraCustomRuleWarning as LoraCustomRuleWarning
from ._engine import LoraFactoringError as LoraFactoringError
from ._engine import LoraMaterializeWarning as LoraMaterializeWarning
from ._factors import LoraFactors as LoraFactors
from ._factors import lora_delta as lora_delta
from ._glora import Glora as Glora
from ._glora import GloraParts as GloraParts
from ._guard import NonFiniteError as NonFiniteError
from ._guard import check_finite as check_finite
from ._guard import finite_guard as finite_guard
from ._init import principal_to_lora as principal_to_lora
from ._int4 import Int4Array as Int4Array
from ._int4 import dequantize_int4 as dequantize_int4
from ._int4 import quantize_int4 as quantize_int4
from ._loraplus import lora_plus as lora_plus
from ._loraplus import lora_plus_labels as lora_plus_labels
from ._nf4 import NF4Array as NF4Array
from ._nf4 import dequantize_nf4 as dequantize_nf4
from ._nf4 import quantize_nf4 as quantize_nf4
from ._qarray import QuantizedArray as QuantizedArray
from ._quantize import MemoryReport as MemoryReport
from ._quantize import memory_report as memory_report
from ._quantize import quantize as quantize
from ._sharding import factor_shardings as factor_shardings
from ._sharding import nf4_shardings as nf4_shardings
from ._sharding import split_sharded as split_sharded
from ._split import split as split
from ._summary import LoraSummary as LoraSummary
from ._summary import summary as summary
from ._tree import combine as combine
from ._tree import count_params as count_params
from ._tree import dora_norms as dora_norms
from ._tree import merge as merge
from ._tree import unmerge as unmerge
from .checkpoint import load_adapters as load_adapters
from .checkpoint import save_adapters as save_adapters

__version__ = "0.1.0"

__all__ = [
    "checkpoint",
    "peft",
    "AdaLoraState",
    "AdapterBank",
    "AdapterSet",
    "Int4Array",
    "LoraCustomRuleWarning",
    "LoraFactoringError",
    "Glora",
    "GloraParts",
    "LoraFactors",
    "NonFiniteError",
    "check_finite",
    "finite_guard",
    "LoraMaterializeWarning",
    "LoraRule",
    "LoraSummary",
    "MemoryReport",
    "NF4Array",
    "QuantizedArray",
    "RankAllocator",
    "combine",
    "combine_adapters",
    "count_params",
    "dora_norms",
    "dequantize_int4",
    "dequantize_nf4",
    "factor_shardings",
    "lora_apply",
    "load_adapters",
    "lora_delta",
    "lora_plus",
    "lora_plus_labels",
    "nf4_shardings",
    "orthogonal_regularizer",
    "principal_to_lora",
    "memory_report",
    "merge",
    "quantize",
    "quantize_int4",
    "quantize_nf4",
    "save_adapters",
    "split",
    "split_sharded",
    "stack_adapters",
    "summary",
    "unmerge",
]
