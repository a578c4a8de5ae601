"""The low-rank term of each use of an implicit weight: ``x . (scale * a @ b)`` without ``a @ b``.

For ``dot_general`` the input meets the factor it shares more axes with first, then the
other one; for convolutions ``a`` is convolved and ``b`` is a 1x1 map. Every contraction
is one ``dot_general`` of operands flattened to 2-D/3-D (:func:`contract`).
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax._src.engine.implicit import RANK, Adapted, Unfactorable, _letters, factor_specs


def contract(x: jax.Array, xs: str, f: jax.Array, fs: str, out: str, **dot_kw) -> jax.Array:
    """``einsum(xs, fs -> out)`` as one dot_general with both operands flattened to 2-D/3-D.

    XLA:CPU runs the weight-gradient contractions of flattened operands much faster
    than those of (batch, seq, d) activations. A factor whose kept side is the smaller
    one (``a`` of ``x . a``: r kept, d contracted) enters rank-first, ``(r, d)``, behind an
    optimisation barrier, so its gradient is computed as ``dt^T . x`` ``(r, d)``: XLA:CPU
    runs the ``x^T . dt`` ``(d, r)`` form XLA otherwise picks outside its fast matmul
    library, 5-10x slower (docs/performance.md); the barrier stops XLA folding the
    transpose back. Not with batch axes: XLA:CPU (jaxlib 0.10.2) aborts compiling that
    batched dot (``dot_op_emitter.cc`` "IsMonotonicWithDim0Major").
    """
    batch = [c for c in xs if c in fs and c in out]
    contr = [c for c in xs if c in fs and c not in out]
    xk = [c for c in xs if c not in fs]
    fk = [c for c in fs if c not in xs]
    # Letters in one operand only and not in the output are summed first.
    x_sum = [c for c in xk if c not in out]
    f_sum = [c for c in fk if c not in out]
    if x_sum:
        x = jnp.sum(x, axis=tuple(xs.index(c) for c in x_sum))
        xs = "".join(c for c in xs if c not in x_sum)
        xk = [c for c in xk if c not in x_sum]
    if f_sum:
        f = jnp.sum(f, axis=tuple(fs.index(c) for c in f_sum))
        fs = "".join(c for c in fs if c not in f_sum)
        fk = [c for c in fk if c not in f_sum]
    size = dict(zip(xs, x.shape)) | dict(zip(fs, f.shape))
    prod = lambda cs: int(np.prod([size[c] for c in cs]))
    x2 = jnp.transpose(x, [xs.index(c) for c in batch + xk + contr])
    x2 = x2.reshape([size[c] for c in batch] + [prod(xk), prod(contr)])
    nb = len(batch)
    if not batch and prod(fk) < prod(contr):
        f2 = jnp.transpose(f, [fs.index(c) for c in fk + contr]).reshape(prod(fk), prod(contr))
        f2 = lax.optimization_barrier(f2)
        dn = (((1,), (1,)), ((), ()))
    else:
        f2 = jnp.transpose(f, [fs.index(c) for c in batch + contr + fk])
        f2 = f2.reshape([size[c] for c in batch] + [prod(contr), prod(fk)])
        dn = (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    y = lax.dot_general(x2, f2, dn, **dot_kw)
    y = y.reshape([size[c] for c in batch + xk + fk])
    have = "".join(batch + xk + fk)
    return jnp.transpose(y, [have.index(c) for c in out])


def dot_letters(x_ndim: int, w_ndim: int, x_is_lhs: bool, dn) -> tuple[str, str, str]:
    (lc, rc), (lb, rb) = dn
    xc, wc, xb, wb = (lc, rc, lb, rb) if x_is_lhs else (rc, lc, rb, lb)
    pool = iter(string.ascii_lowercase + string.ascii_uppercase.replace(RANK, ""))
    xl = [next(pool) for _ in range(x_ndim)]
    wl: list[str | None] = [None] * w_ndim
    for i, j in zip(xc, wc):
        wl[j] = xl[i]
    for i, j in zip(xb, wb):
        wl[j] = xl[i]
    wl = [c if c is not None else next(pool) for c in wl]
    batch = "".join(xl[i] for i in xb)
    x_free = "".join(c for i, c in enumerate(xl) if i not in xc and i not in xb)
    w_free = "".join(c for j, c in enumerate(wl) if j not in wc and j not in wb)
    out = batch + (x_free + w_free if x_is_lhs else w_free + x_free)
    return "".join(xl), "".join(wl), out


def lowrank_dot(
    x: jax.Array, v: Adapted, x_is_lhs: bool, dn, out_dtype, precision, rng, add_to=None
) -> jax.Array:
    """The low-rank term of ``dot_general(x, W)``: ``scale * ((drop(x) . f1) . f2)``.

    ``add_to`` (the base product ``x . W0``), if given, is returned plus the term, in its dtype.
    """
    xs, ws, out = dot_letters(x.ndim, len(v.shape), x_is_lhs, dn)
    sa, sb = factor_specs(v, ws)
    size = dict(zip(xs, x.shape))
    shared = lambda s: int(np.prod([size[c] for c in s if c in xs]))
    first, second = (v.a, sa), (v.b, sb)
    (f1, s1), (f2, s2) = (first, second) if shared(sa) >= shared(sb) else (second, first)
    if rng is not None and v.dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - v.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - v.dropout, x.dtype), jnp.zeros((), x.dtype))
    t_spec = "".join(dict.fromkeys(c for c in xs + s1 if c in out or c in s2))
    specs = (xs, s1, t_spec, s2, out)
    return _two_products(
        x, f1, f2, v.scale, add_to, specs=specs, precision=precision, dtype=out_dtype
    )


@functools.partial(jax.jit, static_argnames=("specs", "precision", "dtype"))
def _two_products(x, f1, f2, scale, add_to, *, specs, precision, dtype):
    """``add_to + scale * ((x . f1) . f2)`` for the einsum ``specs`` ``(xs, s1, t, s2, out)``.

    The factors are cast to ``x``'s dtype first. One ``jit`` per use shape: the same
    projection in every layer is traced and linearised once (``jax.grad`` caches a jit's
    linearisation) instead of op by op in each layer; XLA inlines the call.
    """
    xs, s1, t_spec, s2, out = specs
    kw = dict(precision=precision, preferred_element_type=dtype)
    t = contract(x, xs, f1.astype(x.dtype), s1, t_spec, **kw)
    t = t * jnp.asarray(scale, t.dtype)
    low = contract(t, t_spec, f2.astype(x.dtype).astype(t.dtype), s2, out, **kw)
    return low if add_to is None else add_to + low.astype(add_to.dtype)


def lowrank_conv(x: jax.Array, v: Adapted, params: dict, rng) -> jax.Array:
    """The low-rank term of a convolution: ``conv(drop(x), a)`` then a 1x1 map by ``b``."""
    dn = params["dimension_numbers"]
    out_feat, in_feat, *spatial = dn.rhs_spec
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        raise Unfactorable("grouped convolution")
    if v.b_axes.count(None) != 1 or [ax for ax in v.b_axes if ax is not None] != [out_feat]:
        raise Unfactorable("conv kernel's output side is not the output-feature axis")
    if sorted(ax for ax in v.a_axes if ax is not None) != sorted([in_feat, *spatial]):
        raise Unfactorable("conv kernel's input side is not the spatial and input axes")
    a = v.a.astype(x.dtype)
    rhs_a = (v.a_axes.index(None), v.a_axes.index(in_feat), *(v.a_axes.index(s) for s in spatial))
    if rng is not None and v.dropout > 0:
        keep = jax.random.bernoulli(rng, 1.0 - v.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - v.dropout, x.dtype), jnp.zeros((), x.dtype))
    kw = {k: params[k] for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation")}
    t = lax.conv_general_dilated(
        x,
        a,
        dimension_numbers=lax.ConvDimensionNumbers(dn.lhs_spec, rhs_a, dn.out_spec),
        precision=params["precision"],
        preferred_element_type=params["preferred_element_type"],
        **kw,
    )
    t = t * jnp.asarray(v.scale, t.dtype)
    feat = dn.out_spec[1]
    t = jnp.moveaxis(t, feat, -1)
    b = v.b if v.b_axes.index(None) == 0 else v.b.T
    y = contract(
        t, _letters(t.ndim - 1) + RANK, b.astype(t.dtype), RANK + "Y", _letters(t.ndim - 1) + "Y"
    )
    return jnp.moveaxis(y, -1, feat)
