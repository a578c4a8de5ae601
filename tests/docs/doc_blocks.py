"""The ```python blocks of a Markdown page and the outputs they show (shared by the docs tests).

Conventions (also described on the documentation's Development page):

* A block directly preceded by ``<!-- no-test: reason -->`` is not run; the reason is required
  (say, it needs a GPU, the network, or many minutes).
* A comment ``# -> text`` shows output: on its own line it is one line of what the block
  prints; at the end of a code line likewise. The lines of every ``# ->`` comment of a block,
  in order, are what the block must print (doctest's ``...`` wildcard and whitespace
  normalisation apply). A block with no ``# ->`` comment is run, its output not compared.
"""

from __future__ import annotations

import dataclasses
import doctest
import pathlib
import re

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)\s*$")
_NO_TEST = re.compile(r"^\s*<!-- no-test: (?P<reason>\S[^>]*?)\s*-->\s*$")
_SHOWN = re.compile(r"(?:^|\s)# -> ?(?P<out>.*)$")
_COMMENT = re.compile(r"(?:^|\s)#(?P<text>.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One ```python block: its code (dedented), 1-based line in the page, and opt-out reason."""

    code: str
    line: int
    skip: str | None

    @property
    def expected(self) -> str | None:
        """The output the block shows (``# ->`` lines joined), or None when it shows none."""
        shown = [m.group("out") for m in map(_SHOWN.search, self.code.splitlines()) if m]
        return "\n".join(shown) if shown else None


def blocks(path: pathlib.Path) -> list[Block]:
    """Every ```python block of a Markdown file, in order (indented blocks in lists included)."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        indent, start = m.group("indent"), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if m.group("lang") == "python":
            body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            reason = _NO_TEST.match(before)
            out.append(Block("\n".join(body) + "\n", start + 1, reason and reason.group("reason")))
        i = end + 1
    return out


def output_matches(expected: str, got: str) -> bool:
    """Doctest's comparison: ``...`` matches anything, runs of whitespace compare equal."""
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.OutputChecker().check_output(expected + "\n", got, flags)


def unmarked_outputs(block: Block) -> list[str]:
    """Lines showing a ``print`` result in a comment without the ``# ->`` marker.

    A comment at the end of a ``print(...)`` line, or a comment line right after one, shows
    output; it must say ``# ->`` so that the tests compare it.
    """
    lines, bad = block.code.splitlines(), []
    for k, ln in enumerate(lines):
        if not ln.lstrip().startswith("print("):
            continue
        trailing = _COMMENT.search(ln.split("print(", 1)[1])
        if trailing and not _SHOWN.search(ln):
            bad.append(ln.strip())
        nxt = lines[k + 1].strip() if k + 1 < len(lines) else ""
        if nxt.startswith("#") and not nxt.startswith("# ->"):
            bad.append(nxt)
    return bad
