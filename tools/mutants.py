"""Mutation check: every curated mutant in tools/mutants.toml must make its tests fail.

Usage: ``python tools/mutants.py [--only SUBSTRING] [--baseline] [--jobs N] [--timeout S]``

The repository (without .git and virtual environments) is copied to a scratch directory
once per worker; each mutant's edits are applied there, only its tests are run
(``pytest -x -q``, from the copy's root so the copy's ``lora_jax`` is imported), and the
edits are reverted. The check fails when a mutant survives (its tests pass), when a
snippet is not found exactly once under lora_jax/ (library code moved or changed: update
tools/mutants.toml), or when a run times out or selects no test. ``--baseline`` first runs
every selection unmutated, which must pass.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "site", "build"}


def load(path: pathlib.Path) -> list[dict]:
    mutants = tomllib.loads(path.read_text())["mutant"]
    for m in mutants:
        for key in ("find", "replace"):
            if isinstance(m[key], str):
                m[key] = [m[key]]
        if len(m["find"]) != len(m["replace"]):
            raise SystemExit(f"{m['name']!r}: find and replace have different lengths")
    return mutants


def locate(m: dict) -> list[tuple[str, str, str]]:
    """``(relative file, find, replace)`` for each edit; raise unless each occurs exactly once."""
    files = sorted(p for p in (ROOT / "lora_jax").rglob("*.py") if "__pycache__" not in p.parts)
    edits = []
    for find, replace in zip(m["find"], m["replace"]):
        hits = []
        for p in files:
            rel = str(p.relative_to(ROOT / "lora_jax"))
            if fnmatch.fnmatch(rel, m["files"]) or fnmatch.fnmatch(p.name, m["files"]):
                hits += [str(p.relative_to(ROOT))] * p.read_text().count(find)
        if len(hits) != 1:
            raise LookupError(
                f"mutant {m['name']!r}: its snippet occurs {len(hits)} times under lora_jax/ "
                f"(files {m['files']!r}, found in {sorted(set(hits))}), not exactly once; the "
                f"library code it mutates moved or changed: update tools/mutants.toml.\n"
                f"snippet:\n{find}"
            )
        edits.append((hits[0], find, replace))
    return edits


def copy_repo(dest: pathlib.Path) -> None:
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in SKIP])


def run_tests(workdir: pathlib.Path, tests: list[str], timeout: float) -> tuple[int | None, str]:
    env = dict(os.environ, PYTHONPATH=str(workdir), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:]


def check(m: dict, workdir: pathlib.Path, timeout: float, baseline: bool) -> tuple[bool, str]:
    start = time.monotonic()
    try:
        edits = locate(m)
    except LookupError as e:
        return False, str(e)
    if baseline:
        rc, out = run_tests(workdir, m["tests"], timeout)
        if rc != 0:
            return False, f"BASELINE FAILS (rc={rc}) for {m['name']!r}:\n{out}"
    originals = {}
    try:
        for rel, find, replace in edits:
            path = workdir / rel
            originals.setdefault(path, path.read_text())
            path.write_text(path.read_text().replace(find, replace, 1))
        rc, out = run_tests(workdir, m["tests"], timeout)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    took = f"{time.monotonic() - start:.0f}s"
    if rc is None:
        return False, f"TIMEOUT ({timeout:.0f}s) {m['name']}"
    if rc in (4, 5):  # usage error / no test collected: the selection is wrong
        return False, f"BAD SELECTION (rc={rc}) {m['name']}:\n{out}"
    if rc == 0:
        return False, f"SURVIVED {m['name']} ({took}): {' '.join(m['tests'])} all passed"
    return True, f"killed   {m['name']} ({took})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", type=pathlib.Path, default=ROOT / "tools" / "mutants.toml")
    ap.add_argument("--only", default="", help="run mutants whose name contains this")
    ap.add_argument("--baseline", action="store_true", help="check selections pass unmutated")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = ap.parse_args()
    mutants = [m for m in load(args.list) if args.only in m["name"]]
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lora_jax_mutants_") as tmp:
        dirs = [pathlib.Path(tmp) / f"w{i}" for i in range(max(1, args.jobs))]
        for d in dirs:
            copy_repo(d)
        free = list(dirs)

        def job(m):
            d = free.pop()
            try:
                return check(m, d, args.timeout, args.baseline)
            finally:
                free.append(d)

        with concurrent.futures.ThreadPoolExecutor(len(dirs)) as pool:
            results = list(pool.map(job, mutants))
    failures = [msg for ok, msg in results if not ok]
    for _, msg in results:
        print(msg, flush=True)
    killed = len(results) - len(failures)
    print(f"{killed}/{len(results)} mutants killed in {time.monotonic() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
