"""What the package says about itself: one version source, no pointers outside the repository."""

import importlib.metadata
import pathlib
import re

import lora_jax as lj

ROOT = pathlib.Path(__file__).parents[2]
# A sibling checkout (../shared), or a machine's own absolute paths.
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.~])/(?:work|root|home|Users)/")


def test_version_is_pyprojects_read_from_package_metadata():
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib needs Python 3.11
    declared = re.search(r'^\[project\][^[]*?^version = "([^"]+)"', pyproject, re.M | re.S)[1]
    assert lj.__version__ == importlib.metadata.version("lora_jax") == declared
    init = (ROOT / "lora_jax" / "__init__.py").read_text()
    assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d+", init), "version written twice"


def test_no_pointers_to_files_outside_the_repository():
    files = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "lora_jax").rglob("*.py"),
        *(ROOT / "experiments").glob("*.py"),
        *(ROOT / "notebooks").glob("*.ipynb"),
    ]
    hits = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_files_named_in_the_docs_and_docstrings_exist():
    """A ``module.py`` named in a docstring or a docs page is a file of this repository."""
    named = re.compile(r"`+([\w/.-]+\.(?:py|md|ipynb))`+")
    existing = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if ".venv" not in p.parts]
    files = [*(ROOT / "docs").rglob("*.md"), *(ROOT / "lora_jax").rglob("*.py"), ROOT / "README.md"]
    stale = sorted(
        f"{f.relative_to(ROOT)}: {name}"
        for f in files
        for name in named.findall(f.read_text())
        if not name.startswith("jax/")  # upstream jax sources cited at the version boundary
        and not any(e == name or e.endswith("/" + name) for e in existing)
    )
    assert not stale, "\n".join(stale)
