"""NF4 quantisation (Dettmers et al., 2023, QLoRA): the packed storage type and its (de)quantisers.

Storage layout, bit-compatible with bitsandbytes' ``quantize_4bit(..., quant_type="nf4",
blocksize=64)`` on CPU, per matrix of ``n`` elements (flattened row-major, float32):

==========  ==================  ========  ==============================================
field       shape               dtype     meaning
==========  ==================  ========  ==============================================
packed      ``(*batch, n2)``    uint8     NF4 codes, two per byte, first element in the
                                          high nibble; ``n2 = ceil(n / 2)``, an odd
                                          count pads the last low nibble with code 7
absmax      ``(*batch, nb)``    float32   ``max |x|`` per block of ``block_size``
                                          (``nb = ceil(n / block_size)``); without
                                          double quantisation only
qabsmax     ``(*batch, nb)``    uint8     ``absmax - offset`` as 8-bit dynamic codes
absmax2     ``(*batch, nb2)``   float32   scale per 256 ``qabsmax`` (``nb2 = ceil(nb/256)``)
offset      ``batch``           float32   mean of ``absmax``
==========  ==================  ========  ==============================================

A code is the number of NF4 midpoints strictly below ``x / absmax`` (ties take the
lower code); a weight dequantises to ``float32(NF4[code] * absmax)`` cast to the compute
dtype. With double quantisation a weight costs ``4 + 8/64 + 32/(64*256) = 4.127`` bits,
without it ``4.5``. The one value not bit-reproducible across libraries is ``offset``,
a float32 mean whose summation order is implementation-defined (bitsandbytes' own CPU
and CUDA paths differ); everything computed from a given offset is bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.core.explicit import explicit_spec
from lora_jax._src.core.qarray import QuantizedArray

# The 16 NF4 values (index = code), as bitsandbytes stores them (float32).
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
_NF4_MIDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
ZERO_CODE = 7  # NF4_CODE[7] == 0.0: all-zero blocks and the pad nibble
DQ_BLOCK = 256  # blocks of absmax values per second-level scale (fixed by bitsandbytes)
_TINY = np.finfo(np.float32).tiny  # XLA flushes subnormals: guard divisions with this
# bitsandbytes clamps a partial last block's absmax to 1e-38 (a subnormal), kept as bits.
_BNB_MIN_ABSMAX_BITS = np.float32(1e-38).view(np.uint32)


def _linspace_f32(n: int) -> np.ndarray:
    """``torch.linspace(0.1, 1, n, dtype=float32)`` bit for bit (two halves, fused multiply-add)."""
    start, end = np.float32(0.1), np.float32(1.0)
    step = np.float32((end - start) / np.float32(n - 1))
    i = np.arange(n)
    low = np.float64(start) + np.float64(step) * i
    high = np.float64(end) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, low, high).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), (256,) float32.

    Example:
        >>> m = dynamic_map()
        >>> m.shape, float(m[0]) > -1.0, float(m[127]), float(m[255])
        ((256,), True, 0.0, 1.0)
    """
    parts = []
    for i in range(7):  # exponent bits: 7, fraction items 2**i per sign
        b = _linspace_f32(2**i + 1)
        means = ((b[:-1] + b[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        parts += [scale * means, -scale * means]
    parts.append(np.array([0.0, 1.0], np.float32))
    return np.sort(np.concatenate(parts).astype(np.float32))


@functools.cache
def _dynamic_lut() -> np.ndarray:
    """65536-bin lookup from a normalised value to its dynamic code, as bitsandbytes' CPU kernel.

    Bin ``i`` holds ``-1 + 2i/65535``; its code counts the map's midpoints below it.
    """
    code = dynamic_map()
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    bins = np.arange(65536, dtype=np.float32)
    vals = (np.float32(-1) + (np.float32(2) * bins) / np.float32(65535)).astype(np.float32)
    return np.searchsorted(mids, vals, side="left").astype(np.uint8)


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def to_blocks(flat: jax.Array, block: int) -> jax.Array:
    """``(*batch, n)`` -> ``(*batch, nb, block)``, zero padded."""
    n = flat.shape[-1]
    nb = num_blocks(n, block)
    pad = [(0, 0)] * (flat.ndim - 1) + [(0, nb * block - n)]
    return jnp.pad(flat, pad).reshape(*flat.shape[:-1], nb, block)


def check_quantize_args(x: Any, block_size: int, stack_axes: int, fn: str) -> tuple[int, ...]:
    """Validate a quantiser's input; returns the inner (per-matrix) shape."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{fn}: x is a {type(x).__name__}; pass an array (jnp.asarray(x)).")
    shape = tuple(x.shape)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: x has dtype {x.dtype}; only floating-point arrays can be quantised."
        )
    check_finite_input(x, fn)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{fn}: block_size={block_size!r} must be a positive int (e.g. 64).")
    if isinstance(stack_axes, bool) or not isinstance(stack_axes, int):
        raise TypeError(f"{fn}: stack_axes={stack_axes!r} must be an int (leading axes to stack).")
    if not 0 <= stack_axes < len(shape):
        raise ValueError(
            f"{fn}: stack_axes={stack_axes} must be in [0, {len(shape)}) for x of shape {shape}; "
            f"at least one axis must remain for the quantised matrix."
        )
    if math.prod(shape[stack_axes:]) == 0:
        raise ValueError(f"{fn}: x of shape {shape} has no elements per matrix to quantise.")
    spec = explicit_spec(x) if isinstance(x, jax.Array) else None
    if spec is not None and any(e is not None for e in spec[stack_axes:]):
        raise ValueError(
            f"{fn}: x of shape {shape} is sharded {jax.typeof(x).sharding.spec} over "
            f"Explicit mesh axes inside the matrix, which the flat codes cannot follow; "
            f"quantise the unsharded (or only stack-sharded) weight, then place it with "
            f"jax.device_put(q, lj.nf4_shardings(q, sharding))."
        )
    return shape[stack_axes:]


def check_finite_input(x: Any, fn: str) -> None:
    """Refuse NaN/Inf in a concrete input (one NaN makes its whole block's scale NaN).

    Skipped for tracers (under ``jit``/``eval_shape``) and arrays not fully addressable.
    """
    if isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True):
        return
    bad = int(jnp.size(x) - jnp.isfinite(x).sum())
    if bad:
        raise ValueError(
            f"{fn}: x of shape {tuple(x.shape)} ({x.dtype}) holds {bad} NaN/Inf value(s); "
            f"its block scales would be non-finite. Fix or exclude the weight before quantising."
        )


def true_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` correctly rounded, with ``den`` broadcast to ``num``'s shape.

    XLA rewrites division by a constant or broadcast divisor into multiplication by its
    rounded reciprocal, which can differ in the last bit; a divisor computed from the data
    (``den + 0 * num``, which IEEE rules forbid simplifying) stays a division.
    """
    return num / (den + 0.0 * num)


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis in a fixed pairwise order (zero padded to a power of two).

    Elementwise adds only, so the result does not depend on batch axes, fusion or backend,
    unlike ``jnp.sum`` whose reduction order does: stacked and per-layer quantisation agree.
    """
    n = x.shape[-1]
    width = 1 << max(0, (n - 1).bit_length())
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _no_fma(product: jax.Array) -> jax.Array:
    """``product``, rounded on its own: a select between a multiply and an add stops XLA
    (CPU and GPU) from contracting them into one fused multiply-add. Optimisation barriers
    and no-op ``reduce_precision`` are removed before fusion and do not work."""
    return jnp.where(product == product, product, jnp.float32(jnp.nan))


@functools.partial(jax.jit, static_argnames=("block_size",))
def nf4_encode(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``(*batch, n)`` float32 -> packed ``(*batch, ceil(n/2))`` uint8, absmax ``(*batch, nb)``."""
    n = flat.shape[-1]
    blocks = to_blocks(flat, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    den = jnp.maximum(absmax, _TINY)
    # Full blocks multiply by the reciprocal; a partial last block divides (as bitsandbytes).
    scaled = blocks * (1.0 / den)[..., None]
    if n % block_size:
        last = blocks[..., -1, :]
        scaled = scaled.at[..., -1, :].set(true_divide(last, den[..., -1:]))
        # Stored as bitsandbytes does (clamped to 1e-38), selected as integers: XLA flushes
        # subnormal floats to zero, even a selected constant.
        as_int = jax.lax.bitcast_convert_type(absmax, jnp.uint32)
        bits = as_int[..., -1]
        as_int = as_int.at[..., -1].set(jnp.where(bits == 0, _BNB_MIN_ABSMAX_BITS, bits))
        absmax = jax.lax.bitcast_convert_type(as_int, jnp.float32)
    scaled = jnp.clip(scaled, -1.0, 1.0)
    codes = jnp.zeros(scaled.shape, jnp.uint8)
    for mid in _NF4_MIDS:  # number of midpoints strictly below the value
        codes = codes + (scaled > mid).astype(jnp.uint8)
    codes = codes.reshape(*flat.shape[:-1], -1)
    n2 = num_blocks(n, 2)
    # Block padding holds zeros (code 7); an odd count without block padding gets a 7 too.
    extra = [(0, 0)] * (codes.ndim - 1) + [(0, max(0, 2 * n2 - codes.shape[-1]))]
    codes = jnp.pad(codes, extra, constant_values=ZERO_CODE)
    codes = codes[..., : 2 * n2].reshape(*flat.shape[:-1], n2, 2)
    packed = (codes[..., 0] << 4) | codes[..., 1]
    return packed, absmax


@jax.jit
def double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """absmax ``(*batch, nb)`` -> qabsmax ``(*batch, nb)`` uint8, absmax2 ``(*batch, nb2)``, offset.

    As bitsandbytes' CPU kernel: ``v = (absmax - offset) / absmax2`` (reciprocal multiply)
    indexes a 65536-bin table, ``trunc((v + 1) / 2 * 65535 + 0.5)``, not the exact nearest
    code; an all-zero block gets code 0.
    """
    offset = true_divide(pairwise_sum(absmax), jnp.float32(absmax.shape[-1]))  # torch's mean
    centred = absmax - offset[..., None]
    blocks = to_blocks(centred, DQ_BLOCK)
    absmax2 = jnp.max(jnp.abs(blocks), axis=-1)
    inv = 1.0 / jnp.maximum(absmax2, _TINY)
    v = jnp.clip(blocks * inv[..., None], -1.0, 1.0)
    index = (((v + 1.0) * 0.5) * 65535.0 + 0.5).astype(jnp.int32)  # truncation, v >= -1
    q = jnp.asarray(_dynamic_lut())[index]
    q = jnp.where(absmax2[..., None] == 0, jnp.uint8(0), q)
    q = q.reshape(*absmax.shape[:-1], -1)[..., : absmax.shape[-1]]
    return q, absmax2, offset


def dequantize_absmax(qabsmax: jax.Array, absmax2: jax.Array, offset: jax.Array) -> jax.Array:
    """``float32(float32(map[q] * absmax2) + offset)``: two roundings, never an FMA."""
    nb = qabsmax.shape[-1]
    values = to_blocks(jnp.asarray(dynamic_map())[qabsmax], DQ_BLOCK)
    scaled = _no_fma(values * absmax2[..., None])
    out = scaled + offset[..., None, None]
    return out.reshape(*qabsmax.shape[:-1], -1)[..., :nb]


def nf4_decode(packed: jax.Array, absmax: jax.Array, n: int, block_size: int) -> jax.Array:
    """Packed codes and per-block absmax -> ``(*batch, n)`` float32 weights."""
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)
    values = to_blocks(jnp.asarray(NF4_CODE)[codes[..., :n]], block_size)
    out = values * absmax[..., None]
    return out.reshape(*packed.shape[:-1], -1)[..., :n]


def is_arraylike(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def check_field(cls: str, name: str, x: Any, shape: tuple[int, ...], dtype: Any, hint: str) -> None:
    if x is None:
        raise ValueError(f"{cls}: field {name} is missing; expected {jnp.dtype(dtype)}{shape}.")
    if tuple(x.shape) != shape or jnp.dtype(x.dtype) != jnp.dtype(dtype):
        raise ValueError(
            f"{cls}: field {name} is {jnp.dtype(x.dtype)}{tuple(x.shape)} but expected "
            f"{jnp.dtype(dtype)}{shape} ({hint}); build it with the matching quantize function."
        )


def check_static(cls: str, inner_shape: Any, dtype: Any, block_size: Any) -> None:
    if not isinstance(inner_shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in inner_shape
    ):
        raise TypeError(f"{cls}: inner_shape={inner_shape!r} must be a tuple of ints >= 0.")
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{cls}: dtype={dtype!r} must be the float dtype the weight had.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{cls}: block_size={block_size!r} must be a positive int.")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "absmax", "qabsmax", "absmax2", "offset"],
    meta_fields=["inner_shape", "dtype", "block_size"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4Array(QuantizedArray):
    """A weight stored as packed NF4 codes with per-block scales (see the module table).

    Invariants (checked on construction from arrays; leading ``batch`` axes are shared by
    every array field, so slicing all fields on axis 0 gives one stacked layer):
    ``packed`` is uint8 ``(*batch, ceil(n / 2))`` with ``n = prod(inner_shape)``; either
    ``absmax`` float32 ``(*batch, nb)`` is set, or all of ``qabsmax`` uint8 ``(*batch, nb)``,
    ``absmax2`` float32 ``(*batch, ceil(nb / 256))`` and ``offset`` float32 ``batch``.

    Attributes:
        packed, absmax, qabsmax, absmax2, offset: the arrays of the table above.
        inner_shape: shape of one matrix (static); ``shape`` is ``batch + inner_shape``.
        dtype: the dtype the weight had, and dequantises to by default (static).
        block_size: elements per absmax block (static, 64 in QLoRA).
    """

    packed: Any
    absmax: Any = None
    qabsmax: Any = None
    absmax2: Any = None
    offset: Any = None
    inner_shape: tuple[int, ...] = ()
    dtype: Any = None
    block_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "inner_shape", tuple(self.inner_shape))
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        fields = (self.packed, self.absmax, self.qabsmax, self.absmax2, self.offset)
        if is_arraylike(self.packed) and all(f is None or is_arraylike(f) for f in fields):
            self._validate()

    def _validate(self) -> None:
        cls = "NF4Array"
        check_static(cls, self.inner_shape, self.dtype, self.block_size)
        if len(self.packed.shape) < 1:
            raise ValueError(f"{cls}: packed must have at least 1 dim, got shape ().")
        batch = tuple(self.packed.shape[:-1])
        n = math.prod(self.inner_shape)
        nb = num_blocks(n, self.block_size)
        what = f"inner_shape={self.inner_shape}, batch={batch}, block_size={self.block_size}"
        check_field(cls, "packed", self.packed, batch + (num_blocks(n, 2),), jnp.uint8, what)
        dq = (self.qabsmax, self.absmax2, self.offset)
        if self.absmax is not None:
            if any(f is not None for f in dq):
                raise ValueError(
                    f"{cls}: both absmax and double-quantisation fields (qabsmax, absmax2, "
                    f"offset) are set; pass absmax alone or the three others."
                )
            check_field(cls, "absmax", self.absmax, batch + (nb,), jnp.float32, what)
        else:
            check_field(cls, "qabsmax", self.qabsmax, batch + (nb,), jnp.uint8, what)
            nb2 = num_blocks(nb, DQ_BLOCK)
            check_field(cls, "absmax2", self.absmax2, batch + (nb2,), jnp.float32, what)
            check_field(cls, "offset", self.offset, batch, jnp.float32, what)

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.packed.shape[:-1]) + self.inner_shape

    def block_absmax(self) -> jax.Array:
        """The float32 absmax of every block, ``(*batch, nb)`` (dequantised if double-quantised)."""
        if self.absmax is not None:
            return self.absmax
        return dequantize_absmax(self.qabsmax, self.absmax2, self.offset)

    def quantize_like(self, x: jax.Array) -> NF4Array:
        return quantize_nf4(
            x,
            block_size=self.block_size,
            double_quant=self.double_quant,
            stack_axes=len(self.shape) - len(self.inner_shape),
        )

    @property
    def codes_array(self) -> jax.Array:
        return self.packed

    def decode(self, dtype) -> jax.Array:
        """The dense weight ``(*batch, *inner_shape)`` in ``dtype``."""
        n = math.prod(self.inner_shape)
        flat = nf4_decode(self.packed, self.block_absmax(), n, self.block_size)
        return flat.reshape(self.shape).astype(dtype)


def quantize_nf4(
    x: jax.Array, *, block_size: int = 64, double_quant: bool = True, stack_axes: int = 0
) -> NF4Array:
    """Quantise ``x`` to NF4 (bitsandbytes-compatible layout; see the module docstring).

    Args:
        x: float array ``(*stack, *inner)``; cast to float32 first (bf16/f16 exactly).
        block_size: elements per absmax block (QLoRA: 64).
        double_quant: also quantise the absmax values (8-bit, blocks of 256).
        stack_axes: number of leading axes that index stacked layers; each slice along
            them is quantised on its own, so the fields carry those axes in front.

    Returns:
        An :class:`NF4Array` of shape ``x.shape`` and dtype ``x.dtype``.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> w = jax.random.normal(jax.random.key(0), (128, 64), jnp.bfloat16)
        >>> q = lj.quantize_nf4(w)
        >>> q.shape, q.dtype, q.packed.shape, q.qabsmax.shape
        ((128, 64), dtype(bfloat16), (4096,), (128,))
        >>> w32 = w.astype(jnp.float32)
        >>> err = jnp.abs(lj.dequantize_nf4(q, jnp.float32) - w32)
        >>> bool(err.max() < 0.2 * jnp.abs(w32).max())
        True
    """
    inner = check_quantize_args(x, block_size, stack_axes, "quantize_nf4")
    batch = tuple(x.shape[:stack_axes])
    flat = jnp.asarray(x).astype(jnp.float32).reshape(*batch, math.prod(inner))
    packed, absmax = nf4_encode(flat, block_size)
    common = dict(inner_shape=inner, dtype=x.dtype, block_size=block_size)
    if not double_quant:
        return NF4Array(packed=packed, absmax=absmax, **common)
    qabsmax, absmax2, offset = double_quantize(absmax)
    return NF4Array(packed=packed, qabsmax=qabsmax, absmax2=absmax2, offset=offset, **common)


def dequantize_nf4(q: NF4Array, dtype=None) -> jax.Array:
    """The dense weight of ``q`` in ``dtype`` (default: the dtype it was quantised from)."""
    if not isinstance(q, NF4Array):
        raise TypeError(f"dequantize_nf4 expects an NF4Array, got {type(q).__name__}.")
    return q.dequantize(dtype)
