"""Every ```python block of README.md runs in a fresh interpreter, as a user would paste it,
and prints what it shows.

The conventions are those of the docs pages (doc_blocks.py): ``# -> text`` comments are the
output a block must print; ``<!-- no-test: reason -->`` on the line before a block skips it.
"""

import pathlib
import re
import subprocess
import sys

import pytest
from doc_blocks import blocks, output_matches

README = pathlib.Path(__file__).parents[2] / "README.md"


def _blocks():
    return [
        pytest.param(b, marks=[pytest.mark.skip(b.skip)] if b.skip else [], id=f"line{b.line}")
        for b in blocks(README)
    ]


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_fits_on_three_screens():
    assert len(README.read_text().splitlines()) <= 300


def test_readme_links_into_the_docs():
    """Relative links in the README point at files that exist."""
    targets = re.findall(r"\]\(((?!https?:|#)[^)#]+)", README.read_text())
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert not missing, missing


@pytest.mark.parametrize("block", _blocks())
def test_readme_block_runs_and_prints_what_it_shows(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if block.expected is not None:
        assert output_matches(block.expected, proc.stdout), (
            f"README.md:{block.line} printed\n{proc.stdout}\nbut shows\n{block.expected}"
        )
