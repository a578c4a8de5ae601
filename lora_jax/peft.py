"""Reading and writing the PEFT adapter format (``adapter_config.json`` + safetensors).

PEFT names every tensor after the torch module it adapts:

========================================  ==================  =========================
PEFT key (after ``base_model.model.``)    shape               lora_jax
========================================  ==================  =========================
``<module>.lora_A.weight``                ``(r, in)``         ``a.T``, ``a (in, r)``
``<module>.lora_B.weight``                ``(out, r)``        ``b.T``, ``b (r, out)``
``<module>.lora_embedding_A``             ``(r, vocab)``      ``a.T``, ``a (vocab, r)``
``<module>.lora_embedding_B``             ``(dim, r)``        ``b.T``, ``b (r, dim)``
``<module>.lora_magnitude_vector``        ``(out,)``          ``magnitude`` (DoRA)
``<module>.lora_A`` / ``.lora_B``         as above            AdaLoRA's ``a``, ``b``
``<module>.lora_E``                       ``(r, 1)``          ``singular[:, None]``
``<module>.weight`` / ``.bias``           torch layout        fully trained leaf
========================================  ==================  =========================

DoRA adapters set ``use_dora``; AdaLoRA adapters are ``peft_type: "ADALORA"`` with
``init_r`` (the rank) and the pruned triplets stored as zero singular values (PEFT
scales AdaLoRA by ``lora_alpha / (r + 1e-5)``, ours by ``alpha / r``: a relative
``1e-5 / r`` of the adapter branch). Loading expands a PEFT ``rank_pattern`` (pruned
tensors) back to ``init_r`` with zeros, which keeps PEFT's scale.

The factors have the same layout for ``nn.Linear``, ``nn.Embedding`` and GPT-2's
``Conv1D`` (``fan_in_fan_out=True``); only fully trained leaves (PEFT's
``modules_to_save``) depend on the torch layout. Stacked leaves ``(L, ...)`` map
to ``L`` per-layer modules. Scale: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).

The ``key_map`` names the torch module of each of our leaves: any object with
``to_hf(path, layer=None)`` returning a target with ``.key`` (torch state-dict key,
``"...q_proj.weight"``), ``.module`` and ``.transposed`` (torch stores our leaf
transposed, as ``nn.Linear`` does) and ``.layout`` (``"embedding"`` for embedding
tables). ``to_hf`` raises ``KeyError`` for unmapped paths and ``ValueError`` when a
stacked leaf is named without ``layer``. The reference models publish one as
``lora_jax.models.bert.PEFT_KEY_MAP`` / ``lora_jax.models.llama.PEFT_KEY_MAP``.
"""

from lora_jax._src.io.peft_write import HFTarget as HFTarget
from lora_jax._src.io.peft_write import KeyMap as KeyMap
from lora_jax._src.io.peft_write import load_pretrained as load_pretrained
from lora_jax._src.io.peft_write import save_pretrained as save_pretrained

__all__ = ["HFTarget", "KeyMap", "load_pretrained", "save_pretrained"]
