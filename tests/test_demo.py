"""The demo `examples/ema_digits.py` runs end to end (in its `--fast` mode) and writes its plot and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "examples" / "ema_digits.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ema_digits_demo_fast(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(DEMO), "--fast", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "EMA accuracy" in result.stdout

    png = tmp_path / "ema_vs_training.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC

    rows = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["rows"]
    assert rows
    for row in rows:
        for key in ("ema_accuracy", "training_accuracy"):
            assert isinstance(row[key], float), (key, row)
            assert 0.0 <= row[key] <= 1.0, (key, row)
    # The EMA is not the training weights: the two columns must differ at some evaluation.
    assert any(row["ema_accuracy"] != row["training_accuracy"] for row in rows)
    # And it is the better model on average over the run (fast mode: about 0.88 against 0.72).
    mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    assert mean("ema_accuracy") > mean("training_accuracy") + 0.05
