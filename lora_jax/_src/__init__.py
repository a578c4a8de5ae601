"""Private implementation; the public API is re-exported by lora_jax/__init__.py."""
