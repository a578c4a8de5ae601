"""Every notebook in notebooks/ runs top to bottom in a fresh kernel and is stored stripped."""

from __future__ import annotations

import pathlib
import time

import nbclient
import nbformat
import psutil  # an ipykernel dependency
import pytest
from jupyter_core.utils import run_sync

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
TIME_LIMIT_S = 60
# llm.ipynb loads and NF4-quantises the real 135M-parameter SmolLM2, then trains and samples it.
LIMITS_S = {"llm": 150}


def test_notebooks_found():
    assert any(p.name == "quickstart.ipynb" for p in NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    """Runs without error within TIME_LIMIT_S (LIMITS_S if named) of wall or kernel CPU time.

    Wall time inflates on a loaded machine and CPU time counts every thread on an idle one,
    so the smaller of the two is held to the limit.
    """
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=2 * LIMITS_S.get(path.stem, TIME_LIMIT_S),  # per cell
        # ipykernel's spec runs "python", which jupyter_client replaces by sys.executable.
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute(cleanup_kc=False)  # raises CellExecutionError quoting a failing cell
        elapsed = time.perf_counter() - start
        cpu = psutil.Process(client.km.provisioner.process.pid).cpu_times()
    finally:
        if client.km is not None:
            run_sync(client.km.shutdown_kernel)(now=True)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    used, limit = min(elapsed, cpu.user + cpu.system), LIMITS_S.get(path.stem, TIME_LIMIT_S)
    assert used < limit, (
        f"{path.name} took {elapsed:.0f} s wall, {cpu.user + cpu.system:.0f} s kernel CPU "
        f"(limit {limit} s): use smaller settings"
    )
