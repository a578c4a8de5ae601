"""Factor shardings derived from the base weight's sharding, and a split that honours them.

A weight with PartitionSpec ``spec`` (one entry per weight axis) gets factors

=========  ===============================================  ==========================
factor     derived spec                                     "column" / "row" override
=========  ===============================================  ==========================
``a``      ``(*spec[stack], *spec[in_axes], None)``         replicated in / as base
``b``      ``(*spec[stack], None, *spec[out_axes])``        as base / replicated out
=========  ===============================================  ==========================

so the rank axis is always replicated and ``x @ a @ b`` needs no more
communication than ``x @ W0`` (the layout qwix uses). Fully trained leaves keep
the base's spec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax._src.core import variant as _variant
from lora_jax._src.core.factors import LoraFactors
from lora_jax._src.core.qarray import QuantizedArray
from lora_jax._src.core.rules import path_str
from lora_jax._src.core.trees import is_node
from lora_jax._src.quant.nf4 import DQ_BLOCK, NF4Array, num_blocks

# An override maps (path, base spec, factors) to (spec of a, spec of b).
Override = Callable[[str, PartitionSpec, LoraFactors], tuple[PartitionSpec, PartitionSpec]]
LAYOUTS = ("column", "row")


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec | NamedSharding | QuantizedArray)


def _spec_of(x: Any, path: str) -> tuple[PartitionSpec, Mesh | None]:
    """The PartitionSpec (and mesh, if known) of one entry of a specs tree."""
    if isinstance(x, PartitionSpec):
        return x, None
    if isinstance(x, NamedSharding):
        return x.spec, x.mesh
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.spec, sharding.mesh
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return PartitionSpec(), None  # an unplaced leaf: replicate it like its base
    raise TypeError(
        f"'{path}': expected a PartitionSpec, a NamedSharding or an array with a "
        f"NamedSharding, got {type(x).__name__} (sharding {sharding!r}); place the "
        f"parameters with jax.device_put(x, NamedSharding(mesh, spec)) or pass specs."
    )


def _full_spec(spec: PartitionSpec, ndim: int, path: str) -> tuple[Any, ...]:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(
            f"'{path}': PartitionSpec {spec} has {len(entries)} entries but the weight has "
            f"{ndim} dims; give at most one entry per axis."
        )
    return entries + (None,) * (ndim - len(entries))


def _derive(entries: tuple[Any, ...], t: LoraFactors, layout: str | None) -> tuple[Any, Any]:
    stack = [entries[i] for i in t.stack_axes]
    ins = [entries[i] for i in t.in_axes]
    outs = [entries[i] for i in t.out_axes]
    if layout == "column":
        ins = [None] * len(ins)
    elif layout == "row":
        outs = [None] * len(outs)
    return PartitionSpec(*stack, *ins, None), PartitionSpec(*stack, None, *outs)


def _check_overrides(overrides: Mapping[str, str | Override] | None) -> list[tuple[Any, Any]]:
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must be a dict {{regex: 'column' | 'row' | callable}}, got "
            f"{type(overrides).__name__}."
        )
    out = []
    for pattern, how in overrides.items():
        if not (how in LAYOUTS or callable(how)):
            raise ValueError(
                f"overrides[{pattern!r}] = {how!r}: expected one of {LAYOUTS} or a callable "
                f"(path, base_spec, factors) -> (a_spec, b_spec)."
            )
        out.append((re.compile(pattern), how))
    return out


def _variant_specs(t: LoraFactors, entries: tuple, a_spec: Any, b_spec: Any) -> dict:
    """``{variant: {array name: spec}}`` from each array's layout (:meth:`Variant.layout`)."""
    sides = {
        "stack": [entries[i] for i in t.stack_axes],
        "in": [entries[i] for i in t.in_axes],
        "out": [entries[i] for i in t.out_axes],
        "r": [None],
    }
    out = {}
    for v in _variant.present(t):
        specs = {}
        for name, (layout, _) in v.layout(t).items():
            if layout in ("a", "b"):
                specs[name] = a_spec if layout == "a" else b_spec
            else:
                specs[name] = PartitionSpec(*(e for side in layout for e in sides[side]))
        out[v] = specs
    return out


def factor_shardings(
    specs: Any,
    trainable: Any,
    *,
    mesh: Mesh | None = None,
    overrides: Mapping[str, str | Override] | None = None,
) -> Any:
    """Shardings of the trainable tree, each derived from its base weight's sharding.

    Args:
        specs: a tree mirroring the original parameters (not ``frozen``: fully trained
            leaves need a spec too) whose leaves are PartitionSpecs, NamedShardings or
            arrays placed with a NamedSharding.
        trainable: the trainable tree from :func:`lora_jax.split` (abstract is fine).
        mesh: wrap the specs in ``NamedSharding(mesh, spec)``; default: the mesh of
            ``specs``' NamedShardings if they have one, else return PartitionSpecs.
        overrides: ``{regex: layout}`` for adapted leaves whose "/"-joined path fully
            matches (first match wins): ``"column"`` replicates ``a``'s input axes
            (``b`` follows the base's output axes), ``"row"`` replicates ``b``'s output
            axes, a callable ``(path, base_spec, factors) -> (a_spec, b_spec)`` decides.

    Returns:
        A tree shaped like ``trainable``: :class:`LoraFactors` whose ``a`` and ``b`` are
        shardings (``a``: ``(*stack, *in, r)``, rank replicated; ``b``: ``(*stack, r,
        *out)``), the base's sharding at fully trained leaves, ``None`` elsewhere.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import PartitionSpec as P
        >>> params = {"q": {"kernel": jnp.zeros((16, 8))}}
        >>> _, trainable = lj.split(params, lj.LoraRule(".*", rank=2), key=jax.random.key(0))
        >>> s = lj.factor_shardings({"q": {"kernel": P("fsdp", "model")}}, trainable)
        >>> s["q"]["kernel"].a, s["q"]["kernel"].b
        (P('fsdp', None), P(None, 'model'))
    """
    compiled = _check_overrides(overrides)
    used = [False] * len(compiled)
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec_leaf)
    by_path = {path_str(p): leaf for p, leaf in flat}
    t_flat, t_def = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=is_node)

    def wrap(spec: PartitionSpec, own: Mesh | None) -> Any:
        m = mesh if mesh is not None else own
        return spec if m is None else NamedSharding(m, spec)

    out = []
    for key_path, t in t_flat:
        path = path_str(key_path)
        if t is None:
            out.append(None)
            continue
        if path not in by_path or by_path[path] is None:
            raise ValueError(
                f"'{path}' is trainable but specs has no entry for it; pass specs that mirror "
                f"the original parameters (e.g. their shardings), not the frozen tree."
            )
        spec, own = _spec_of(by_path[path], path)
        if not isinstance(t, LoraFactors):
            _full_spec(spec, len(t.shape), path)
            out.append(wrap(spec, own))
            continue
        entries = _full_spec(spec, t.ndim, path)
        how = None
        for i, (regex, candidate) in enumerate(compiled):
            if regex.fullmatch(path):
                how, used[i] = candidate, True
                break
        if callable(how):
            a_spec, b_spec = how(path, PartitionSpec(*entries), t)
        else:
            a_spec, b_spec = _derive(entries, t, how)
        static = any(v.static_factors for v in _variant.present(t))
        leaf = t if static else t.with_factors(wrap(a_spec, own), wrap(b_spec, own))
        for v, specs in _variant_specs(t, entries, a_spec, b_spec).items():
            leaf = v.replace(leaf, {n: wrap(spec, own) for n, spec in specs.items()})
        out.append(leaf)
    unused = [regex.pattern for (regex, _), u in zip(compiled, used) if not u]
    if unused:
        raise ValueError(
            f"override pattern(s) {unused} matched no adapted parameter (re.fullmatch on "
            f"'/'-joined paths); fix the pattern or drop it."
        )
    return jax.tree_util.tree_unflatten(t_def, out)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names if n is not None)


def nf4_shardings(q: NF4Array, sharding: NamedSharding) -> NF4Array:
    """Shardings of an :class:`NF4Array`'s fields that match the dense weight's ``sharding``.

    NF4 stores each matrix flattened row-major, so a shard of the dense weight along its
    first inner axis (``rows / m`` whole rows) is one contiguous run of ``packed`` codes and
    of ``absmax`` blocks. Stack (batch) axes keep their entries; ``absmax2`` (one scale per
    256 blocks) is sharded when each shard holds whole groups, else replicated (it is
    ``1 / 16384`` of the weight).

    Args:
        q: the quantised weight ``(*batch, *inner_shape)`` (abstract is fine).
        sharding: NamedSharding of the dense weight; only the first inner axis and the
            batch axes may be sharded.

    Returns:
        ``q`` with a NamedSharding in every array field (for ``jax.device_put`` / ``jit``).

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax as lj
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("fsdp",))
        >>> q = lj.quantize_nf4(jnp.ones((128, 64)))
        >>> s = lj.nf4_shardings(q, NamedSharding(mesh, P("fsdp", None)))
        >>> s.packed.spec, s.qabsmax.spec
        (P('fsdp',), P('fsdp',))
    """
    mesh = sharding.mesh
    nbatch = len(q.shape) - len(q.inner_shape)
    path = f"NF4Array{tuple(q.shape)}"
    entries = _full_spec(sharding.spec, len(q.shape), path)
    batch, inner = entries[:nbatch], entries[nbatch:]
    if any(e is not None for e in inner[1:]):
        raise ValueError(
            f"{path}: spec {sharding.spec} shards an inner axis other than the first, but NF4 "
            f"packs each matrix row-major so only whole rows form contiguous blocks; shard "
            f"axis {nbatch} instead (transpose the weight before quantising) or replicate."
        )
    n = math.prod(q.inner_shape)
    m = _axis_size(mesh, inner[0]) if inner else 1
    nb = num_blocks(n, q.block_size)
    if inner and inner[0] is not None and (n % m or (n // m) % (2 * q.block_size)):
        raise ValueError(
            f"{path}: {m} shards of {n} elements per matrix do not each hold whole pairs of "
            f"blocks (2 x block_size={q.block_size}; codes are packed two per byte); use a "
            f"shard count m with {n} / m a multiple of {2 * q.block_size}, or replicate."
        )
    flat = inner[0] if inner else None
    dq_flat = flat if flat is not None and (nb // m) % DQ_BLOCK == 0 else None

    def wrap(*spec: Any) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*spec))

    def field(x: Any, spec: NamedSharding) -> Any:
        return None if x is None else spec

    return NF4Array(
        packed=wrap(*batch, flat),
        absmax=field(q.absmax, wrap(*batch, flat)),
        qabsmax=field(q.qabsmax, wrap(*batch, flat)),
        absmax2=field(q.absmax2, wrap(*batch, dq_flat)),
        offset=field(q.offset, wrap(*batch)),
        inner_shape=q.inner_shape,
        dtype=q.dtype,
        block_size=q.block_size,
    )
