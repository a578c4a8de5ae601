"""Griffe extension for the API reference: read ``Example:`` docstring sections as examples.

The library's docstrings head their doctests ``Example:`` (Google style allows both spellings);
griffe's Google parser only recognises ``Examples:`` as a code section and renders the singular
as prose, where ``>>>`` lines become Markdown block quotes. Loaded by ``mkdocs.yml``.
"""

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Renames ``Example:`` section headers to ``Examples:`` before docstrings are parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
