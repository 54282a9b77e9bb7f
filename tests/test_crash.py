"""The crash harness: runs killed with SIGKILL before, inside and after each of hf-ema's writes, and at random steps.

Each killed run (tests/crash_run.py, a fresh process) is resumed the way a user would: `train(resume_from_checkpoint=
True)`, the newest checkpoint the Trainer picks. The resumed run either ends bit for bit where the uninterrupted run
ends (training weights and every average), or is refused with a message that says what to do; the test then does
that (deletes the interrupted checkpoint) and checks that the resume from the one before is bit-exact, so no kill
loses the training weights. A summary line per kill point is printed at the end of the session (`conftest.py`).
What holds after a crash is in docs/usage.md ("After a crash").
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_ema import files, posthoc
from hf_ema.average import average_checkpoints

RUN = Path(__file__).with_name("crash_run.py")
REPORT: list[str] = []
KILLED = -9  # returncode of a process killed by SIGKILL
TRAINER_REFUSES = r"Can't find a valid checkpoint at \S*checkpoint-8"
TRAINER_HAS_NO_STATE = r"No such file or directory: \S*checkpoint-8/trainer_state.json"
STEPS = random.Random(21).sample(range(5, 12), 2)  # the random kill steps (fixed seed: the same in every CI run)


def launch(*args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != files.CRASH_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    if crash is not None:
        env[files.CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, str(RUN), *args], capture_output=True, text=True, env=env, timeout=300, cwd=RUN.parent
    )


def equal_results(folder: Path, reference: Path) -> bool:
    ours, theirs = load_file(folder / "result.safetensors"), load_file(reference / "result.safetensors")
    assert ours.keys() == theirs.keys()
    return all(torch.equal(ours[key], theirs[key]) for key in ours)


def trainer_state(folder: Path) -> dict:
    """The final TrainerState the run wrote, as transformers' own resume tests compare them: no timings, the run's
    folder as `OUT`, and the run id checked against the first checkpoint's (the killed run and the uninterrupted one
    are two runs, each with its own id; a resumed run keeps the id of the run it continues)."""
    state = json.loads((folder / "trainer_state.json").read_text().replace(str(folder), "OUT"))
    first = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
    ours = state["stateful_callbacks"]["hf_ema"]["attributes"]
    assert ours.pop("run_id") == first["stateful_callbacks"]["hf_ema"]["attributes"]["run_id"]
    timings = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
    state["log_history"] = [{k: v for k, v in log.items() if k not in timings} for log in state["log_history"]]
    return state


def refusal(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if re.match(r"\w+(Error|Exception): ", line)]
    return lines[-1] if lines else proc.stderr[-2000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each face, in this process's machine (bit-exact holds within one machine)."""
    made = {}
    for face in ("ema_trainer", "callback"):
        folder = tmp_path_factory.mktemp(f"uninterrupted-{face}")
        proc = launch("train", str(folder), face)
        assert proc.returncode == 0, proc.stderr[-3000:]
        made[face] = folder
    return made


def check_no_partial_file_is_valid(folder: Path) -> None:
    """Every snapshot series lists only complete snapshots (a partial one is skipped, not read)."""
    for snapshot in posthoc.list_snapshots(folder):
        assert (Path(snapshot.path) / "ema_state.safetensors").is_file()


KILLS = [
    *[("ema_trainer", f"step-{k}", None, ["--kill-step", str(k)], "exact") for k in STEPS],
    ("ema_trainer", "sidecar-before", "sidecar:before:2", [], "exact"),
    ("ema_trainer", "sidecar-inside", "sidecar:inside:2", [], TRAINER_REFUSES),
    ("ema_trainer", "sidecar-after", "sidecar:after:2", [], TRAINER_REFUSES),
    (
        "ema_trainer",
        "trainer-save-before-its-state",
        None,
        ["--kill-trainer-state", "8"],
        TRAINER_HAS_NO_STATE,
    ),
    ("ema_trainer", "snapshot-before", "snapshot:before:2", [], "exact"),
    ("ema_trainer", "snapshot-inside", "snapshot:inside:2", [], "exact"),
    ("ema_trainer", "snapshot-after", "snapshot:after:2", [], "exact"),
    ("callback", f"step-{STEPS[0]}", None, ["--kill-step", str(STEPS[0])], "exact"),
    ("callback", "sidecar-inside", "sidecar:inside:2", [], TRAINER_REFUSES),
    (
        "callback",
        "trainer-save-before-its-state",
        None,
        ["--kill-trainer-state", "8"],
        TRAINER_HAS_NO_STATE,
    ),
]


@pytest.mark.parametrize(("face", "point", "crash", "flags", "expected"), KILLS, ids=[f"{k[0]}-{k[1]}" for k in KILLS])
def test_kill_during_training_then_resume(tmp_path, uninterrupted, caplog, face, point, crash, flags, expected):
    killed = launch("train", str(tmp_path), face, *flags, crash=crash)
    assert killed.returncode == KILLED, f"the run was not killed at {point}: {killed.stderr[-2000:]}"
    with caplog.at_level(logging.WARNING, logger="hf_ema"):
        check_no_partial_file_is_valid(tmp_path)
    if "snapshot-inside" in point:  # the snapshot of step 6 is half-written: listed with a warning, never read
        assert "snapshot-6: its write was interrupted" in caplog.text
        assert [s.step for s in posthoc.list_snapshots(tmp_path)] == [3]
    resumed = launch("train", str(tmp_path), face, "--resume", "last")
    if expected == "exact":
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert equal_results(tmp_path, uninterrupted[face])
        assert trainer_state(tmp_path) == trainer_state(uninterrupted[face])
        outcome = "resumed bit-exact, the same TrainerState"
    else:
        assert resumed.returncode != 0 and re.search(expected, resumed.stderr), resumed.stderr[-3000:]
        outcome = f"refused with message ({refusal(resumed)[:140]}...); after deleting checkpoint-8: "
        shutil.rmtree(tmp_path / "checkpoint-8")  # what the message says to do
        again = launch("train", str(tmp_path), face, "--resume", "last")
        assert again.returncode == 0, again.stderr[-3000:]
        assert equal_results(tmp_path, uninterrupted[face])
        outcome += "resumed bit-exact from checkpoint-4"
    weights = posthoc.synthesize(tmp_path, sigma_rel=0.07)
    reference = posthoc.synthesize(uninterrupted[face], sigma_rel=0.07)
    assert all(torch.equal(weights[name], reference[name]) for name in reference)  # the snapshot series, whole
    REPORT.append(f"{face:<12} {point:<32} {outcome}")


WRITERS = {  # tool: (the file that marks a complete folder, the reference written without a kill)
    "export": ("hf_ema_posthoc.json", lambda source, out: posthoc.export(source, out, sigma_rel=0.07)),
    "average": ("hf_ema_average.json", lambda source, out: average_checkpoints(source, out, last=2, progress=False)),
}


@pytest.mark.parametrize("stage", files.STAGES)
@pytest.mark.parametrize("tool", sorted(WRITERS))
def test_kill_while_a_tool_writes_its_folder(tmp_path, uninterrupted, tool, stage):
    """`posthoc.export` and `hf_ema.average` write a whole folder: after a kill it is complete or absent."""
    out, source = tmp_path / tool, str(uninterrupted["ema_trainer"])
    marker, write_reference = WRITERS[tool]
    killed = launch(tool, str(out), source, crash=f"{tool}:{stage}")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    if stage == "after":  # renamed into place: complete
        assert (out / marker).is_file() and (out / "model.safetensors").is_file()
    else:  # never a partial folder under the final name
        assert not out.exists()
    again = launch(tool, str(out), source)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == [tool]  # the temporary folder of the killed write is gone
    write_reference(source, tmp_path / "reference")
    ours, theirs = load_file(out / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in theirs)
    REPORT.append(f"{tool:<12} {tool + '-' + stage:<32} {'complete or absent; rerun equals the reference'}")


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded-uninterrupted")
    proc = launch("sharded", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.mark.parametrize("stage", files.STAGES)
def test_kill_during_the_sharded_write_then_resume(tmp_path, sharded_reference, stage):
    killed = launch("sharded", str(tmp_path), crash=f"sharded:{stage}:2")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    state = tmp_path / "state-8"
    if stage == "after":
        assert (state / "ema_state" / "hf_ema.json").is_file()
    else:
        assert not (state / "ema_state").exists()  # no partial ema_state/ under its final name
    resumed = launch("sharded", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert equal_results(tmp_path, sharded_reference)
    frm = "state-8" if stage == "after" else "state-4"
    REPORT.append(f"{'sharded':<12} {'sharded-' + stage:<32} resumed bit-exact from {frm}")


def test_every_file_an_export_writes_is_fsynced_before_its_folder_is_renamed(tmp_path, uninterrupted, monkeypatch):
    """The export's files and folder are made durable (fsync) under the temporary name, then renamed, then the parent
    folder is fsynced: the write-fsync-rename-fsync of `hf_ema.files` that every hf-ema write goes through."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("rename", os.fspath(source), os.fspath(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    out = tmp_path / "export"
    posthoc.export(uninterrupted["ema_trainer"], out, sigma_rel=0.07)
    renames = [e for e in events if e[0] == "rename"]
    assert renames == [("rename", str(tmp_path / ".export.tmp"), str(out))]
    before = {Path(e[1]).name for e in events[: events.index(renames[0])] if e[0] == "fsync"}
    assert set(os.listdir(out)) | {".export.tmp"} <= before  # every file, and the folder itself
    assert events[-1] == ("fsync", str(tmp_path))  # the rename made durable
