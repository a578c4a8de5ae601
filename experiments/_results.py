"""Write one script's section of experiments/RESULTS.md, leaving the other sections alone."""

from __future__ import annotations

import datetime
import pathlib
import platform
import re

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
HEADER = "# Experiment results\n\nEach section is written by the script named in its heading.\n"


def cpu_name() -> str:
    """The CPU model and its widest vector extension (runs of other sessions may land elsewhere)."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    vector = next((v for v in ("avx512f", "avx2", "avx") if v in flags), "no AVX")
    return f"{name.group(1).strip() if name else platform.machine()} ({vector})"


def write_section(title: str, command: str, body: str, path: pathlib.Path = RESULTS) -> None:
    """Replace (or append) the section ``## {title}`` with the command and ``body``."""
    import jax

    text = path.read_text() if path.exists() else HEADER
    stamp = (
        f"{datetime.date.today()}, jax {jax.__version__}, {cpu_name()}, "
        f"{jax.device_count()} device(s)"
    )
    section = f"## {title}\n\nCommand: `{command}` ({stamp})\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
