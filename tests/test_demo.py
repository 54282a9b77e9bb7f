"""The demo `examples/ema_digits.py` runs end to end (in its `--fast` mode) and writes its plot and table."""

from __future__ import annotations

import json

from helpers import PNG_MAGIC, run_example


def test_ema_digits_demo_fast(tmp_path):
    result = run_example("ema_digits.py", "--fast", "--output-dir", str(tmp_path))
    assert "test accuracy" in result.stdout and "EMA 100ba" in result.stdout
    assert result.stdout.count("step ") >= 12  # one progress line per evaluation, as training goes
    assert "Setting accelerator to CPU" not in result.stdout + result.stderr  # no third-party noise

    png = tmp_path / "ema_vs_training.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC

    rows = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["rows"]
    assert rows
    averages = ("ema_10ba_accuracy", "ema_30ba_accuracy", "ema_100ba_accuracy")
    for row in rows:
        for key in ("ema_accuracy", "training_accuracy", *averages):
            assert isinstance(row[key], float), (key, row)
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert row["ema_accuracy"] == row["ema_30ba_accuracy"]  # the primary
    # Three different averages, none of them the training weights: the columns differ at some evaluation.
    for a, b in [("training_accuracy", "ema_30ba_accuracy"), *zip(averages, averages[1:], strict=False)]:
        assert any(row[a] != row[b] for row in rows), (a, b)
    # And it is the better model on average over the run (fast mode: about 0.88 against 0.72).
    mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    assert mean("ema_accuracy") > mean("training_accuracy") + 0.05
