"""The shape of the package: one-way imports, small modules, variants as plug-ins.

The import graph is read from the source (``ast``, every import statement, including
those inside functions), not from ``sys.modules``, so a lazy import that hides a cycle
still counts.
"""

import ast
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src.core import variant as V

ROOT = Path(__file__).resolve().parents[2] / "lora_jax"
MAX_LINES = 450
# The parts under lora_jax/_src, lowest first: a part may import only parts before it.
LAYERS = [{"core"}, {"quant", "variants", "engine"}, {"ops"}, {"multi", "io"}]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``name`` imports (a package's submodule when named)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # imports under ``if TYPE_CHECKING:`` never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            # ``from pkg import mod`` imports the submodule, ``from pkg import x`` the package.
            targets = [f"{base}.{a.name}" for a in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "_src" else None


def test_the_import_graph_is_read_correctly():
    graph = _graph()
    assert "lora_jax._src.core.factors" in graph["lora_jax._src.ops.split"]
    assert "lora_jax._src.core.variant" in graph["lora_jax._src.core.factors"]
    assert "lora_jax._src.ops.apply" in graph["lora_jax"]  # relative imports resolve
    # A deliberate cycle is found.
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(toy) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_core_imports_nothing_else_of_ours():
    for name, deps in _graph().items():
        if _part(name) == "core":
            others = sorted(d for d in deps if _part(d) != "core")
            assert others == [], f"{name} imports {others}"


def test_parts_import_only_lower_parts():
    rank = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    bad = []
    for name, deps in _graph().items():
        here = _part(name)
        if here is None or here not in rank:
            continue
        for d in deps:
            there = _part(d)
            if d.startswith("lora_jax") and there is None and d != "lora_jax._src":
                bad.append((name, d))  # a private module importing the public faces
            elif there in rank and there != here and rank[there] >= rank[here]:
                bad.append((name, d))
    assert bad == []


def test_engine_never_names_a_variant():
    words = ("dora", "adalora", "glora", "pissa", "olora", "vera", "magnitude", "singular")
    for path in (ROOT / "_src" / "engine").glob("*.py"):
        code = ast.unparse(ast.parse(path.read_text()))  # drops comments, keeps strings
        names = {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Attribute)}
        assert not {w for w in words if any(w in n.lower() for n in names)}, path


def test_modules_are_small():
    sizes = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_few_private_modules_at_the_top():
    private = sorted(p.name for p in ROOT.glob("_*.py") if p.name != "__init__.py")
    assert len(private) <= 3, private


# ----------------------------------------------------------------------------- a toy variant
# Registered from this file only, with no change to library code: a learned gain per output
# column on top of LoRA, W = gain * (W0 + scale * a @ b).


@dataclasses.dataclass(frozen=True)
class Gain:
    start: float = 1.0


@functools.partial(jax.tree_util.register_dataclass, data_fields=["gain"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class GainParts:
    gain: jax.Array  # (*stack, *out)


class GainVariant(V.Variant):
    name, title, config_type, parts_type, plain_low_rank = "gain", "Gain", Gain, GainParts, False

    def init(self, factors, base, ctx):
        stack, _, outs = ctx.axes
        shape = tuple(ctx.shape[i] for i in stack + outs)
        gain = jnp.full(shape, ctx.rule.variant.start, ctx.rule.param_dtype)
        return dataclasses.replace(factors, variant=GainParts(gain)), base

    def arrays(self, t):
        return {"gain_g": t.variant.gain}

    def replace(self, t, values):
        return dataclasses.replace(t, variant=GainParts(values["gain_g"]))

    def layout(self, t):
        return {"gain_g": (("stack", "out"), V.FAST)}

    def restore(self, t, arrays, meta):
        return dataclasses.replace(t, variant=GainParts(arrays["gain_g"]))

    def terms(self, t, terms, frozen_at):  # W = base * g + scale * a @ (b * g)
        g = t.variant.gain
        ns = len(t.stack_axes)
        b = terms.b * g.reshape(g.shape[:ns] + (1,) + g.shape[ns:]).astype(terms.b.dtype)
        return dataclasses.replace(terms, b=b, col=g)


@pytest.fixture
def gain_variant():
    V.register(GainVariant())
    yield
    V.unregister("gain")


def _toy_setup(stacked):
    rng = np.random.default_rng(0)
    shape = (3, 6, 5) if stacked else (6, 5)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32)}}
    rules = [
        lj.LoraRule(
            "dense/kernel", rank=2, variant=Gain(start=1.0), stack_axes=(0,) if stacked else None
        )
    ]
    frozen, trainable = lj.split(params, rules, key=jax.random.key(0))
    t = trainable["dense"]["kernel"]
    g = jnp.asarray(rng.uniform(0.5, 1.5, t.variant.gain.shape), jnp.float32)
    t = dataclasses.replace(t.with_factors(t.a, t.b + 0.3), variant=GainParts(g))
    return params, rules, frozen, {"dense": {"kernel": t}}


def _toy_reference(w0, t):
    """float64 numpy: W = g * (W0 + scale * a @ b), per stacked layer."""
    a, b, g = (np.asarray(x, np.float64) for x in (t.a, t.b, t.variant.gain))
    delta = np.einsum("...ir,...ro->...io", a, b) * t.scale
    return g[..., None, :] * (np.asarray(w0, np.float64) + delta)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_a_toy_variant_runs_through_the_library(gain_variant, tmp_path, stacked, jit):
    params, rules, frozen, trainable = _toy_setup(stacked)
    t = trainable["dense"]["kernel"]
    w = _toy_reference(params["dense"]["kernel"], t)
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)

    # split made the gain (ones) and nothing else changed: the layer starts at W0 * 1.
    assert lj.split(params, rules, key=jax.random.key(0))[1]["dense"][
        "kernel"
    ].variant.gain.shape == (t.variant.gain.shape)
    # lora_apply, factored (no weight-shaped temporary) and differentiable in the gain.
    fn = lambda p, x: jnp.einsum("i,...io->...o", x[0], p["dense"]["kernel"])  # noqa: E731
    apply = lj.lora_apply(fn, strict=True)
    apply = jax.jit(apply) if jit else apply
    got = apply(frozen, trainable, jnp.asarray(x))
    np.testing.assert_allclose(got, np.einsum("i,...io->...o", x[0], w), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda tr: apply(frozen, tr, jnp.asarray(x)).sum())(trainable)
    gk = grads["dense"]["kernel"]
    base_plus = np.asarray(w) / np.asarray(t.variant.gain)[..., None, :]
    want_g = np.einsum("i,...io->...o", x[0].astype(np.float64), base_plus)
    np.testing.assert_allclose(gk.variant.gain, want_g, rtol=1e-4, atol=1e-4)

    # merge and unmerge (generic: from the terms), against the float64 reference.
    merged = lj.merge(frozen, trainable)
    np.testing.assert_allclose(merged["dense"]["kernel"], w, rtol=1e-5, atol=1e-5)
    back = lj.unmerge(merged, trainable)
    np.testing.assert_allclose(back["dense"]["kernel"], params["dense"]["kernel"], atol=1e-5)

    # save/load: the gain is stored under its own name and restored into the parts.
    path = lj.save_adapters(tmp_path / "ckpt", trainable, rules=rules, base=frozen)
    loaded = lj.load_adapters(path, base=frozen)
    np.testing.assert_array_equal(loaded["dense"]["kernel"].variant.gain, t.variant.gain)
    assert isinstance(loaded["dense"]["kernel"].variant, GainParts)
    assert lj.checkpoint.read_info(path)["rules"] == rules

    # factor shardings: the gain follows the weight's output axes.
    from jax.sharding import PartitionSpec as P

    spec = P("layers", None, "model") if stacked else P(None, "model")
    s = lj.factor_shardings({"dense": {"kernel": spec}}, trainable)["dense"]["kernel"]
    assert s.variant.gain == (P("layers", "model") if stacked else P("model"))
    assert s.b == (P("layers", None, "model") if stacked else P(None, "model"))

    # LoRA+ labels and the summary name it too.
    assert lj.lora_plus_labels(trainable)["dense"]["kernel"].variant.gain == "fast"
    row = lj.summary(frozen, trainable).rows[0]
    assert (row.kind, row.trainable) == ("gain", t.a.size + t.b.size + t.variant.gain.size)


class GainOnPeftLora(GainVariant):
    """The toy variant riding on PEFT's LoRA tuner: ``<module>.lora_gain (out,)``, use_gain."""

    peft, peft_setting = "lora", "use_gain"

    def peft_tensors(self, t, layer):
        return {"lora_gain": np.asarray(t.variant.gain).reshape(-1)}

    def peft_config(self, config, leaves):
        return {}, {**config, "use_gain": True}

    def peft_uses(self, config):
        return config.get("use_gain") is True

    def peft_refine(self, m, tensors, consumed, config):
        consumed.add(m.key_prefix + "lora_gain")
        return dataclasses.replace(m, arrays={"gain_g": tensors[m.key_prefix + "lora_gain"]})


def test_a_toy_variant_reads_and_writes_peft_files(tmp_path):
    """The PEFT format carries a plug-in's keys through its hooks, no library change."""
    from safetensors.numpy import load_file

    from lora_jax.models import KeyEntry, KeyMap

    V.register(GainOnPeftLora())
    try:
        params, _, frozen, trainable = _toy_setup(stacked=False)
        key_map = KeyMap((KeyEntry("dense/kernel", "dense.weight", "linear"),))
        lj.peft.save_pretrained(tmp_path, trainable, key_map=key_map)
        t = trainable["dense"]["kernel"]
        files = load_file(tmp_path / "adapter_model.safetensors")
        np.testing.assert_array_equal(files["base_model.model.dense.lora_gain"], t.variant.gain)
        np.testing.assert_array_equal(files["base_model.model.dense.lora_A.weight"], t.a.T)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["use_gain"] is True and config["peft_type"] == "LORA"

        got = lj.peft.load_pretrained(tmp_path, frozen, key_map=key_map)["dense"]["kernel"]
        assert isinstance(got.variant, GainParts)
        np.testing.assert_array_equal(got.variant.gain, t.variant.gain)
        np.testing.assert_allclose(
            lj.merge(frozen, {"dense": {"kernel": got}})["dense"]["kernel"],
            _toy_reference(params["dense"]["kernel"], t),
            rtol=1e-5,
            atol=1e-5,
        )
        # Without the setting, the reader leaves the key unread, and says so.
        config["use_gain"] = False
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"map to no leaf of frozen.*dense.lora_gain"):
            lj.peft.load_pretrained(tmp_path, frozen, key_map=key_map)
    finally:
        V.unregister("gain")


def test_a_toy_variant_shards_at_split(gain_variant):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("model",))
    w = jax.device_put(jnp.ones((6, 4)), NamedSharding(mesh, P(None, "model")))
    rules = [lj.LoraRule("w", rank=2, variant=Gain())]
    _, trainable = lj.split({"w": w}, rules, key=jax.random.key(0))
    assert trainable["w"].variant.gain.sharding.spec == P("model")


def test_an_unregistered_config_is_refused():
    with pytest.raises(
        TypeError, match=r"variant=Gain\(start=1.0\) is not the config of a registered"
    ):
        lj.LoraRule("w", rank=2, variant=Gain())
