"""Where benchmark tables go: stdout always, docs/benchmarks.md on request."""

from __future__ import annotations

import os

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "benchmarks.md")


def publish(text: str, write: bool, replace: str | None = None) -> None:
    """Prints a result table and, when `write`, adds it to docs/benchmarks.md (its header names the command).

    Args:
        text (`str`): the table, starting with its Markdown heading.
        write (`bool`): also write it to docs/benchmarks.md; else only print it.
        replace (`str`, *optional*):
            The start of a heading line (`"### Quality: ..."`): the first section whose heading starts with it is
            replaced by `text`, up to the next heading of the same or a higher level. Appended when none matches.
            Without it the table is appended (earlier measurements are kept beside the new one).
    """
    print(text)
    if not write:
        return
    with open(DOCS, encoding="utf-8") as handle:
        lines = handle.read().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if replace and line.startswith(replace)), None)
    if start is None:
        with open(DOCS, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
        return
    level = len(replace) - len(replace.lstrip("#"))
    end = start + 1
    while end < len(lines) and not (
        lines[end].startswith("#") and len(lines[end]) - len(lines[end].lstrip("#")) <= level
    ):
        end += 1
    new = text if text.endswith("\n") else text + "\n"
    if end < len(lines):
        new += "\n"
    with open(DOCS, "w", encoding="utf-8") as handle:
        handle.write("".join(lines[:start]) + new + "".join(lines[end:]))
