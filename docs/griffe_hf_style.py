"""Griffe extension for the API pages: reads Hugging Face-style argument lines as Google-style ones.

HF docstrings give each argument as ``name (`type`, *optional*, defaults to `x`):``. Griffe's Google parser would show
that whole parenthesis, backticks and all, as the type. This extension rewrites such a line to ``name: (*optional*,
defaults to `x`) ...`` before parsing, so the type column comes from the signature's annotation and the words about
the default stay in the description. mkdocs.yml loads it; the docstrings themselves stay as the HF tools expect.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# `name (`type`, rest):` then the description, if any, on the same line
ARGUMENT = re.compile(r"^(?P<head>\s*\*{0,2}\w+) \(`[^`]+`(?P<rest>[^)]*)\):(?P<text>.*)$")


def rewrite(docstring: str) -> str:
    lines = []
    for line in docstring.splitlines():
        match = ARGUMENT.match(line)
        if match is not None:
            rest = match["rest"].strip().removeprefix(",").strip()
            note = f" ({rest})" if rest else ""
            line = f"{match['head']}:{note}{match['text']}"
        lines.append(line)
    return "\n".join(lines)


class HFStyleDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
