"""One module per LoRA variant; importing this package registers every built-in one.

Registration order is the order in which the hooks run on a leaf: PiSSA/OLoRA's init
first (it changes the base); the low-rank refinements (AdaLoRA) always run before the
terms (DoRA, GLoRA), and the exclusive variants never meet on one leaf.
"""

from lora_jax._src.variants import pissa as pissa  # noqa: I001  (order matters)
from lora_jax._src.variants import rslora as rslora
from lora_jax._src.variants import dora as dora
from lora_jax._src.variants import adalora as adalora
from lora_jax._src.variants import glora as glora
from lora_jax._src.variants import vera as vera
