"""What the PEFT cross-checks share (test_peft.py, test_variants.py): one batch, our forward
and torch's on it, and the check that PEFT loads an adapter we wrote to the same outputs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj

IDS = np.array([[5, 17, 3, 40, 9, 22], [1, 2, 60, 33, 7, 0]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
TOL = 1e-4  # float32 torch vs float32 XLA over two layers


def our_outputs(module, d, frozen, trainable):
    """Our ``module.forward`` (``lora_jax.models.bert`` or ``.llama``) of the batch, factored."""
    _, cfg = module.load(d)
    fwd = jax.jit(lj.lora_apply(lambda p, i, m: module.forward(p, cfg, i, m)))
    return np.asarray(fwd(frozen, trainable, jnp.asarray(IDS), jnp.asarray(MASK)))


def torch_outputs(model):
    """The torch model's output on the batch: logits, else the last hidden state."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def check_peft_loads(model, adapter_dir, expected, *, merge=True):
    """PEFT loads ``adapter_dir`` onto ``model`` and gives ``expected`` (also merged)."""
    import peft

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).eval()
    ref = torch_outputs(pm)
    assert np.abs(ref - torch_outputs(model)).max() > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(expected, ref, atol=TOL, rtol=0)
    if merge:
        np.testing.assert_allclose(expected, torch_outputs(pm.merge_and_unload()), atol=TOL, rtol=0)
