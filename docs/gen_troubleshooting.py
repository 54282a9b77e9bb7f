"""Regenerates docs/troubleshooting.md from the bad-input catalogue in tests/test_catalogue.py.

python docs/gen_troubleshooting.py
"""

import contextlib
import io
import logging
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
logging.disable(logging.WARNING)

import test_catalogue  # noqa: E402

HEAD = "# Troubleshooting: every refusal and its way out\n\nhf-ema refuses bad input at the earliest moment it can be known: settings at `EMAArguments(...)`, train-time\nsettings in `on_train_begin` (before the first optimizer step), checkpoint problems when resuming, model changes at\nthe next update, non-finite averages before anything is written. Every message names the field or the file, the rule,\nthe value, and what to do. The table is generated from the test catalogue (`tests/test_catalogue.py`, which asserts\neach of these) by `python docs/gen_troubleshooting.py`; `<dir>` parts of paths are shortened.\n\n`EMAStateError` is a `ValueError` subclass exported as `hf_ema.EMAStateError`.\n\n"
TAIL = "\n\n## Other situations\n\n- **`python -m hf_ema.average` (averaging saved checkpoints)**: its refusals (no checkpoints, different models, a\n  missing shard, a corrupt file, `--out` existing or among the inputs ...) are listed, with their messages, in\n  [average.md, Refusals](average.md#refusals); each is asserted in `tests/test_average.py`.\n- **An exception escaped `train()` of a stock Trainer** (an evaluation or save raised): the model may hold the EMA\n  weights. Call `callback.restore_training_weights()` before doing anything else with the model. `EMATrainer.train()`\n  does this itself before re-raising.\n- **Training diverged and the weights became NaN/Inf**: without `ema_skip_non_finite`, the next checkpoint (or the end\n  of training) raises `FloatingPointError` and writes nothing for that checkpoint; resume from the last good one.\n  With `ema_skip_non_finite=True` each update first checks the training weights (one host sync per update) and skips\n  non-finite ones with a warning, so the average keeps its last finite value.\n- **EMA settings changed between the checkpoint and the resume**: allowed, with a warning listing both; the counters\n  carry over. Changing `ema_dtype` is refused (the averages' dtypes no longer match, see above).\n- **`save_only_model=True`**: checkpoints hold no optimizer, scheduler or RNG state, so the Trainer cannot resume the\n  training trajectory exactly in general; the EMA sidecar is written all the same and the average resumes exactly\n  (bit-exact in the test, whose SGD optimizer and constant schedule are stateless).\n"


def render() -> str:
    """docs/troubleshooting.md as the catalogue makes it now (runs every case)."""
    rows = []
    for name, trigger, error, _ in test_catalogue.CATALOGUE:
        folder = pathlib.Path(tempfile.mkdtemp())
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                trigger(folder)
        except error as caught:
            message = str(caught.args[0]) if error is KeyError else str(caught)
            message = message.replace(str(folder) + "/", "").replace(str(folder), ".").replace("|", "\\|")
            rows.append(f"| {name} | `{error.__name__}` | {message} |")
        else:
            raise SystemExit(f"catalogue case {name!r} raised nothing")
    table = "| case | exception | message |\n| --- | --- | --- |\n" + "\n".join(rows)
    return HEAD + table + TAIL


def main() -> None:
    (ROOT / "docs" / "troubleshooting.md").write_text(render(), encoding="utf-8")


if __name__ == "__main__":
    main()
