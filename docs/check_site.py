"""Opens the built documentation site in headless Chromium and checks what a reader sees.

`make docs` runs it after `mkdocs build --strict`:

    python docs/check_site.py site                        # check the index and API pages
    python docs/check_site.py site --screenshots outputs   # and save a screenshot of each

Each page is loaded from disk in Debian's `chromium` (`apt-get install chromium`), its scripts run, and the DOM
Chromium ends with must hold the page's key content: a page that built but renders empty, or an API page whose
docstrings went missing, fails here.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# page -> text it must show (highlighted code counts as its text)
PAGES = {
    "index.html": [
        "Exponential moving average (EMA) of model weights",
        "EMATrainer(model=model",
        "parse_yaml_file",
        "Which weights are where",
        "API reference",
    ],
    "api.html": [
        "EMAArguments",
        "half_life",
        "update_interval",
        "EMATrainer",
        "ema_model",
        "EMACallback",
        "compute_ema",
        "EMAStateError",
    ],
}


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"No Chromium found (looked for {', '.join(BROWSERS)}). Install Debian's: apt-get install chromium")


def chromium(browser: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--disable-gpu", f"--user-data-dir={profile}", "--virtual-time-budget=3000"]
    if os.geteuid() == 0:
        command.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI runs as root)
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False)


def check_page(browser: str, profile: str, page: Path, expected: list[str]) -> list[str]:
    """The problems found on one page (empty when it is fine)."""
    if not page.is_file():
        return [f"{page} does not exist; build the site first (mkdocs build --strict)"]
    result = chromium(browser, profile, "--dump-dom", page.as_uri())
    dom = result.stdout
    if result.returncode != 0 or not dom:
        return [f"{page}: chromium exited with {result.returncode}:\n{result.stderr[-2000:]}"]
    text = html.unescape(re.sub(r"<[^>]+>", "", dom))
    problems = [f"{page}: the rendered page lacks {want!r}" for want in expected if want not in text]
    root = re.search(r'<html[^>]*\sclass="([^"]*)"', dom)
    if root is None or "js" not in root.group(1).split():  # Material's scripts mark <html> once they have run
        problems.append(f"{page}: the theme's scripts did not run (no 'js' class on <html>)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, help="the built site folder (mkdocs build --site-dir)")
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each checked page in this folder")
    cli = parser.parse_args()

    browser = find_browser()
    problems = []
    with tempfile.TemporaryDirectory() as profile:
        for name, expected in PAGES.items():
            page = (cli.site / name).resolve()
            problems += check_page(browser, profile, page, expected)
            if cli.screenshots is not None and page.is_file():
                cli.screenshots.mkdir(parents=True, exist_ok=True)
                png = (cli.screenshots / f"{page.stem}.png").resolve()
                chromium(browser, profile, f"--screenshot={png}", "--window-size=1280,1400", page.as_uri())
                if not png.is_file():
                    problems.append(f"{page}: no screenshot was written to {png}")
    if problems:
        sys.exit("docs site check failed:\n" + "\n".join(f"- {p}" for p in problems))
    checked = ", ".join(PAGES)
    print(f"docs site check passed: {checked} render in {Path(browser).name} with their key content")


if __name__ == "__main__":
    main()
