"""Every ```python block of docs/guides/model-libraries.md runs as-is, in a fresh interpreter."""

import pathlib
import re
import subprocess
import sys

import pytest

PAGE = pathlib.Path(__file__).parents[2] / "docs" / "guides" / "model-libraries.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
TITLES = re.findall(r"^## (.+)$", PAGE.read_text(), re.M)


def test_one_recipe_per_library():
    assert TITLES == ["Flax NNX", "Flax linen", "Equinox", "Plain functions"]
    assert len(BLOCKS) == len(TITLES)


@pytest.mark.parametrize("code", BLOCKS, ids=TITLES)
def test_recipe_runs(code, tmp_path):
    script = tmp_path / "recipe.py"
    # A recipe that leaves a weight's layout to guesswork fails.
    strict = (
        "import warnings, lora_jax\nwarnings.simplefilter('error', lora_jax.LoraLayoutWarning)\n"
    )
    script.write_text(strict + code)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
