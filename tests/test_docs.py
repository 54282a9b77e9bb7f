"""The documentation site's API page documents every public name of hf_ema (`make docs` builds and checks the site),
and the package claims the Python versions the README says are tested."""

from pathlib import Path

import hf_ema

ROOT = Path(__file__).resolve().parent.parent
API_PAGE = ROOT / "docs" / "api.md"


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


def test_python_versions_claimed_are_the_tested_ones():
    """The classifiers claim exactly the Python versions the README says CI tests, the interpreter running this test
    is one of them, and `requires-python` admits it (the README's 'supported' column is what installs)."""
    import re
    import sys

    import tomllib
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    claimed = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if re.fullmatch(r".*Python :: 3\.\d+", c)}
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| Python |"))
    supported, tested = (cell.strip() for cell in row.strip("|").split("|")[1:3])
    assert claimed == set(re.findall(r"3\.\d+", tested)), (claimed, tested)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert running in claimed and running in SpecifierSet(project["requires-python"])
    assert supported.startswith(project["requires-python"].removeprefix(">=") + "+")
