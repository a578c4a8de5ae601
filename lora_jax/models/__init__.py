"""Reference models (BERT, Llama, a small GPT) as plain functions of nested-dict parameter trees.

They load Hugging Face checkpoints, match transformers' PyTorch outputs, and
publish ``PEFT_KEY_MAP`` (a :class:`KeyMap`) between our leaf paths and torch
module names. The core library never imports this package.
"""

from . import bert as bert
from . import gpt as gpt
from . import llama as llama
from ._hf import HFTarget as HFTarget
from ._hf import KeyEntry as KeyEntry
from ._hf import KeyMap as KeyMap

__all__ = ["HFTarget", "KeyEntry", "KeyMap", "bert", "gpt", "llama"]
