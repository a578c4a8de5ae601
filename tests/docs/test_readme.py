"""Every ```python block of README.md runs (in a fresh interpreter, as a user would paste it).

A block directly preceded by ``<!-- no-test: reason -->`` is skipped (e.g. it needs a GPU or
many minutes); the reason is required.
"""

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

README = pathlib.Path(__file__).parents[2] / "README.md"
BLOCK = re.compile(r"(<!-- no-test: [^>]+ -->\s*)?```python\n(.*?)```", re.S)


def _blocks():
    text = README.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text[: m.start()].count("\n") + 1
        out.append(
            pytest.param(
                m.group(2),
                marks=[pytest.mark.skip(m.group(1).strip())] if m.group(1) else [],
                id=f"line{line}",
            )
        )
    return out


def test_readme_has_the_two_commands_first():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
