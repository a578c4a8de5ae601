"""lora_jax: LoRA and QLoRA fine-tuning for any JAX function."""

import importlib.metadata as _metadata

from . import checkpoint as checkpoint
from . import eqx as eqx
from . import nnx as nnx
from . import peft as peft
from ._src.core.factors import LoraFactors as LoraFactors
from ._src.core.factors import lora_delta as lora_delta
from ._src.core.qarray import QuantizedArray as QuantizedArray
from ._src.core.rules import LoraRule as LoraRule
from ._src.engine.interpreter import LoraCustomRuleWarning as LoraCustomRuleWarning
from ._src.engine.interpreter import LoraFactoringError as LoraFactoringError
from ._src.engine.interpreter import LoraMaterializeWarning as LoraMaterializeWarning
from ._src.engine.interpreter import LoraUnusedWarning as LoraUnusedWarning
from ._src.io.checkpoint import load_adapters as load_adapters
from ._src.io.checkpoint import save_adapters as save_adapters
from ._src.multi.adapter_set import AdapterSet as AdapterSet
from ._src.multi.bank import AdapterBank as AdapterBank
from ._src.multi.bank import stack_adapters as stack_adapters
from ._src.multi.combine import combine_adapters as combine_adapters
from ._src.ops.apply import lora_apply as lora_apply
from ._src.ops.guard import NonFiniteError as NonFiniteError
from ._src.ops.guard import check_finite as check_finite
from ._src.ops.guard import finite_guard as finite_guard
from ._src.ops.merge import combine as combine
from ._src.ops.merge import count_params as count_params
from ._src.ops.merge import dora_norms as dora_norms
from ._src.ops.merge import merge as merge
from ._src.ops.merge import unmerge as unmerge
from ._src.ops.sharding import factor_shardings as factor_shardings
from ._src.ops.sharding import nf4_shardings as nf4_shardings
from ._src.ops.split import LoraLayoutWarning as LoraLayoutWarning
from ._src.ops.split import split as split
from ._src.ops.split import split_sharded as split_sharded
from ._src.ops.summary import LoraSummary as LoraSummary
from ._src.ops.summary import summary as summary
from ._src.quant.int4 import Int4Array as Int4Array
from ._src.quant.int4 import dequantize_int4 as dequantize_int4
from ._src.quant.int4 import quantize_int4 as quantize_int4
from ._src.quant.nf4 import NF4Array as NF4Array
from ._src.quant.nf4 import dequantize_nf4 as dequantize_nf4
from ._src.quant.nf4 import quantize_nf4 as quantize_nf4
from ._src.quant.tree import MemoryReport as MemoryReport
from ._src.quant.tree import memory_report as memory_report
from ._src.quant.tree import quantize as quantize
from ._src.variants.adalora import AdaLoraState as AdaLoraState
from ._src.variants.adalora import RankAllocator as RankAllocator
from ._src.variants.adalora import orthogonal_regularizer as orthogonal_regularizer
from ._src.variants.glora import Glora as Glora
from ._src.variants.glora import GloraParts as GloraParts
from ._src.variants.loraplus import lora_plus as lora_plus
from ._src.variants.loraplus import lora_plus_labels as lora_plus_labels
from ._src.variants.pissa import principal_to_lora as principal_to_lora
from ._src.variants.vera import Vera as Vera

try:  # pyproject.toml's version is the one source; a source tree that is not installed has none
    __version__ = _metadata.version("lora_jax")
except _metadata.PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = [
    "checkpoint",
    "eqx",
    "nnx",
    "peft",
    "AdaLoraState",
    "AdapterBank",
    "AdapterSet",
    "Int4Array",
    "LoraCustomRuleWarning",
    "LoraUnusedWarning",
    "LoraFactoringError",
    "Glora",
    "GloraParts",
    "Vera",
    "LoraFactors",
    "NonFiniteError",
    "check_finite",
    "finite_guard",
    "LoraLayoutWarning",
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
