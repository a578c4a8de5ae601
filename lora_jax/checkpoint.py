"""Orbax adapter checkpoints: save, load, inspect, and a step-numbered manager."""

from lora_jax._src.io.checkpoint import fingerprint as fingerprint
from lora_jax._src.io.checkpoint import load_adapters as load_adapters
from lora_jax._src.io.checkpoint import read_info as read_info
from lora_jax._src.io.checkpoint import save_adapters as save_adapters
from lora_jax._src.io.manager import AdapterCheckpointManager as AdapterCheckpointManager

__all__ = ["AdapterCheckpointManager", "fingerprint", "load_adapters", "read_info", "save_adapters"]
