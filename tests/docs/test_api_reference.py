"""Every public name has an entry (``::: lora_jax.<name>``) in the API reference under docs/api/.

Public names are read from the sources (no import): ``__all__`` of ``lora_jax`` and of every
public module (a ``.py`` file under ``lora_jax/`` outside ``_src`` whose name does not start
with ``_``); a module without ``__all__`` exports its top-level definitions without a leading
underscore. ``mkdocs build --strict`` (``make docs``) checks that every entry resolves.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[2]
PACKAGE = ROOT / "lora_jax"
ENTRY = re.compile(r"^:::\s+(\S+)\s*$", re.M)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _public_modules() -> list[pathlib.Path]:
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if "_src" not in p.parts
        and all(not s.startswith("_") or s == "__init__.py" for s in p.relative_to(PACKAGE).parts)
    )


def public_names(path: pathlib.Path) -> list[str]:
    """Dotted names a module exports (submodules excluded: they have entries of their own)."""
    tree = ast.parse(path.read_text())
    exported = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = ast.literal_eval(node.value)
    if exported is None:
        exported = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                exported.append(node.name)
            elif isinstance(node, ast.Assign):
                exported += [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                exported.append(node.target.id)
        exported = [n for n in exported if not n.startswith("_")]
    here = path.parent if path.name == "__init__.py" else path.with_suffix("")
    submodule = lambda n: (here / f"{n}.py").exists() or (here / n / "__init__.py").exists()
    return [f"{_module_name(path)}.{n}" for n in exported if not submodule(n)]


def documented() -> set[str]:
    return {
        m for page in (ROOT / "docs" / "api").rglob("*.md") for m in ENTRY.findall(page.read_text())
    }


MODULES = _public_modules()


def test_the_public_modules_are_found():
    names = {_module_name(p) for p in MODULES}
    assert {"lora_jax", "lora_jax.checkpoint", "lora_jax.peft", "lora_jax.models"} <= names
    assert {"lora_jax.models.bert", "lora_jax.models.llama", "lora_jax.models.gpt"} <= names
    assert "lora_jax.split" in public_names(PACKAGE / "__init__.py")
    assert "lora_jax.checkpoint" not in public_names(PACKAGE / "__init__.py")  # a submodule


@pytest.mark.parametrize("module", MODULES, ids=[_module_name(p) for p in MODULES])
def test_every_public_name_has_an_api_entry(module):
    missing = sorted(set(public_names(module)) - documented())
    assert not missing, (
        f"public names without an API reference entry: {missing}; add a line "
        f"'::: <name>' for each to a page under docs/api/ (see docs/development/index.md)"
    )


def test_api_entries_name_public_objects():
    """No entry documents a private path (``_src``) or a name that is not exported."""
    public = {n for p in MODULES for n in public_names(p)} | {_module_name(p) for p in MODULES}
    stray = sorted(documented() - public)
    assert not stray, f"API entries for names that are not public: {stray}"
