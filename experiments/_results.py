"""Write one script's section of experiments/RESULTS.md, leaving the other sections alone."""

from __future__ import annotations

import datetime
import pathlib
import platform
import re

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
HEADER = "# Experiment results\n\nEach section is written by the script named in its heading.\n"


def write_section(title: str, command: str, body: str, path: pathlib.Path = RESULTS) -> None:
    """Replace (or append) the section ``## {title}`` with the command and ``body``."""
    import jax

    text = path.read_text() if path.exists() else HEADER
    stamp = (
        f"{datetime.date.today()}, jax {jax.__version__}, {platform.machine()} CPU, "
        f"{jax.device_count()} device(s)"
    )
    section = f"## {title}\n\nCommand: `{command}` ({stamp})\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
