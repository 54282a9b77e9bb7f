"""The post-hoc EMA example `examples/posthoc_digits.py` runs end to end (in its `--fast` mode): one training run with
snapshots, then a sweep of synthesised averages, scored and plotted."""

from __future__ import annotations

import json

from helpers import PNG_MAGIC, run_example


def test_posthoc_digits_fast(tmp_path):
    result = run_example("posthoc_digits.py", "--fast", "--output-dir", str(tmp_path))
    assert "24 snapshots" in result.stdout and "best: sigma_rel" in result.stdout
    assert "sigma_rel 0.02: skipped (sigma_rel 0.02 at step 240 cannot be synthesised" in result.stdout
    assert (tmp_path / "posthoc_digits.png").read_bytes()[:8] == PNG_MAGIC

    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    rows = {row["sigma_rel"]: row for row in results["rows"]}
    assert len(rows) >= 10 and all(row["step"] == 240 for row in rows.values())
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["residual"] < 0.05
        assert (tmp_path / "posthoc" / f"sigma_rel-{row['sigma_rel']}" / "config.json").is_file()
    # The tracked widths synthesise the averages kept during training: the same scores.
    for label, kept in results["kept"].items():
        row = rows[float(label)]
        assert row["tracked"] and row["residual"] < 1e-6
        assert abs(row["accuracy"] - kept["accuracy"]) <= 1 / 450 and abs(row["loss"] - kept["loss"]) < 1e-4
    # Every synthesised average beats the training weights here (a large constant learning rate), and they differ.
    assert min(row["accuracy"] for row in rows.values()) > results["training"]["accuracy"]
    assert len({round(row["loss"], 6) for row in rows.values()}) == len(rows)
    assert results["snapshot_bytes"] > 24 * 2 * results["model_bytes"] * 0.9  # two averages per snapshot
