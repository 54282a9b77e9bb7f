"""The documentation site's API page documents every public name of hf_ema (`make docs` builds and checks the site)."""

from pathlib import Path

import hf_ema

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_page_documents_every_public_name():
    lines = API_PAGE.read_text(encoding="utf-8").splitlines()
    documented = {line.removeprefix("::: ").strip() for line in lines if line.startswith("::: ")}
    expected = set()
    for name in hf_ema.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(hf_ema, name)
        expected.add(f"{obj.__module__}.{obj.__qualname__}")
    assert expected <= documented, f"docs/api.md lacks '::: <name>' lines for {sorted(expected - documented)}"
