"""Every ```python block of docs/**/*.md runs, and prints what it shows (see doc_blocks.py).

The blocks of one page run in order in one namespace, as a reader follows the page, in a
scratch working directory. They run in this process (8 fake CPU devices, from conftest) under
JAX's standard dtype promotion, which is what a user has; the suite's strict promotion is for
the library's own code.
"""

import contextlib
import io
import pathlib

import jax
import pytest
from doc_blocks import blocks, output_matches, unmarked_outputs

DOCS = pathlib.Path(__file__).parents[2] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if blocks(p))


def _run(block, namespace, where):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), jax.numpy_dtype_promotion("standard"):
        exec(compile(block.code, where, "exec"), namespace)
    return out.getvalue()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_blocks_run_and_print_what_they_show(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for block in blocks(page):
        if block.skip:
            continue
        where = f"{page.relative_to(DOCS)}:{block.line}"
        got = _run(block, namespace, where)
        if block.expected is not None:
            assert output_matches(block.expected, got), (
                f"{where}: printed\n{got}\nbut the page shows\n{block.expected}"
            )


def test_shown_outputs_are_marked_so_they_are_compared():
    pages = [*DOCS.rglob("*.md"), DOCS.parent / "README.md"]
    bad = [
        f"{p.name}:{b.line}: {ln}" for p in pages for b in blocks(p) for ln in unmarked_outputs(b)
    ]
    assert not bad, "write shown output as '# -> ...':\n" + "\n".join(bad)


def test_skipped_blocks_say_why():
    """The opt-out is rare and explained; a bare marker does not parse as one."""
    skipped = [(p.name, b.line, b.skip) for p in DOCS.rglob("*.md") for b in blocks(p) if b.skip]
    assert all(len(reason.split()) >= 3 for _, _, reason in skipped), skipped


def test_the_block_reader_sees_what_a_page_shows(tmp_path):
    """The conventions themselves: markers, indented blocks, the opt-out, the comparison."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 2\nprint(x)  # -> 2\nprint(x + 1)\n# -> 3\n```\n\n"
        "- item\n\n    ```python\n    print('a b')  # -> a   ...\n    ```\n\n"
        "<!-- no-test: needs a GPU for minutes -->\n```python\nprint(1)\n# 1\n```\n\n"
        "```bash\nprint(1)\n```\n"
    )
    first, indented, skipped = blocks(page)
    assert (first.line, first.expected, first.skip) == (3, "2\n3", None)
    assert indented.code == "print('a b')  # -> a   ...\n" and indented.expected == "a   ..."
    assert skipped.skip == "needs a GPU for minutes" and skipped.expected is None
    assert output_matches(first.expected, "2\n3\n") and output_matches("a   ...", "a b\n")
    assert not output_matches(first.expected, "2\n4\n")
    assert not output_matches("4.127", "4.133\n")
    assert unmarked_outputs(skipped) == ["# 1"] and unmarked_outputs(first) == []
