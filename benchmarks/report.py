"""Where benchmark tables go: stdout always, docs/benchmarks.md on request."""

from __future__ import annotations

import os

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "benchmarks.md")


def publish(text: str, write: bool) -> None:
    """Prints a result table and, when `write`, appends it to docs/benchmarks.md (its header names the command)."""
    print(text)
    if write:
        with open(DOCS, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
