"""Resuming a Trainer run: which checkpoint folder's EMA state continues it, and the refusals when none can.

A stock Trainer does not tell callbacks which folder it resumes from, so `EMACallback` looks for it: the folder it
was told (`EMACallback(resume_from_checkpoint=...)`, or by `EMAMixin.train`), else `<output_dir>/checkpoint-<step>`,
else the folder of the run whose id the restored trainer state holds (each `train()` stamps a run id into the
Trainer's `stateful_callbacks` and into every EMA state it writes, which pairs them). Plain values in, no Trainer
objects: the callback passes what it read from `TrainingArguments` and `TrainerState`.
"""

from __future__ import annotations

import logging
import os
import uuid

from .averager import Averager
from .checkpoint import SHARDED_SIDECAR_NAME, SIDECAR_NAME, EMAStateError, has_sidecar, read_meta
from .time import Clock, reached

logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR, checked by a test

RUN_KEY = "hf_ema"
"""Key of hf-ema's entry in `TrainerState.stateful_callbacks` (saved in every checkpoint's trainer_state.json)."""


def run_checkpoint(output_dir: str, step: int) -> str:
    """`<output_dir>/checkpoint-<step>`, where the Trainer writes the checkpoint of `step`."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def stamp_run(stateful_callbacks: dict | None, step: int, output_dir: str) -> tuple[dict, dict | None]:
    """Stamps a `train()` call into the Trainer's state (saved in every checkpoint's trainer_state.json) and returns
    the stamp with that of the run it resumes (at `step` > 0), if any.

    A resumed run is the same run continuing: it keeps the id it resumes from (so its trainer state ends equal to
    the uninterrupted run's); a fresh run gets a fresh id. The stamp also holds the output folder it writes in, which
    tells two runs continuing one checkpoint into different folders apart."""
    resumed = None
    if stateful_callbacks is not None and step > 0:
        resumed = (stateful_callbacks.get(RUN_KEY) or {}).get("attributes") or None
    run_id = resumed["run_id"] if resumed and resumed.get("run_id") else uuid.uuid4().hex
    stamp = {"run_id": run_id, "output_dir": os.path.abspath(output_dir)}
    if stateful_callbacks is not None:
        stateful_callbacks[RUN_KEY] = {"args": {}, "attributes": dict(stamp)}
    return stamp, resumed


def written_by(folder: str, run: dict | None) -> bool:
    """Whether `folder`'s EMA state was written by `run` (its id and, where both sides record it, its output folder;
    True when either side predates run ids)."""
    if not run or not run.get("run_id") or not has_sidecar(folder):
        return True
    meta = read_meta(folder)
    if meta.get("run_id") is None:
        return True
    same_folder = meta.get("run_output_dir") is None or run.get("output_dir") in (None, meta["run_output_dir"])
    return meta["run_id"] == run["run_id"] and same_folder


def find_folder(folder: str, told: bool, run: dict | None, step: int) -> str:
    """The folder whose EMA state continues the run resumed at `step`: `folder` (told, or the run's
    `checkpoint-<step>`), or the one the restored trainer state was written in; refuses another run's EMA state."""
    if not told and run and (not has_sidecar(folder) or not written_by(folder, run)):
        # A stock Trainer resumed from a folder it did not tell us: the one its trainer state was written in.
        elsewhere = run_checkpoint(run.get("output_dir", ""), step)
        if os.path.abspath(elsewhere) != os.path.abspath(folder) and written_by(elsewhere, run):
            if has_sidecar(elsewhere):
                logger.info(
                    "Resuming the EMA from %s: the Trainer's state was restored from that run's checkpoint, not "
                    "from %s.",
                    elsewhere,
                    folder,
                )
                folder = elsewhere
    if has_sidecar(folder) and not written_by(folder, run):
        raise EMAStateError(
            f"Resuming at step {step}: the Trainer restored its state from a checkpoint of run "
            f"{run['run_id'][:8]} (written in {run.get('output_dir')}), but the EMA state in {folder} belongs to "
            "another run (same step, another folder), and reading it would replace the loaded training weights. "
            "Pass the folder you resume from as EMACallback(..., resume_from_checkpoint=path), or use EMATrainer, "
            "which passes it itself."
        )
    return folder


def resume(averager: Averager, folder: str, told: bool, run: dict | None, step: int, clock: Clock) -> None:
    """Continues `averager` from the EMA state of the checkpoint the run resumes at `step` (clock `clock`), or starts
    a fresh average (`ema_resume_without_state='restart'`), or refuses with the way out."""
    folder = find_folder(folder, told, run, step)
    args = averager.ema_args
    start = args.ema_start_time
    started_by_now = start.value == 0 or reached(clock[start.unit], start.value)
    if not has_sidecar(folder) and not started_by_now:
        return  # averaging starts later: there is no EMA state to restore yet
    if not has_sidecar(folder):
        if not os.path.isdir(folder):
            problem = (
                f"Resuming at step {step}, but the checkpoint folder {folder} does not exist, so its EMA state cannot "
                "be read (a stock Trainer does not tell callbacks which folder it resumes from)."
            )
            way_out = (
                "Pass the folder as EMACallback(..., resume_from_checkpoint=path), or use EMATrainer, which passes it "
                "itself."
            )
        else:
            problem = (
                f"Resuming at step {step}, but {folder} has no {SIDECAR_NAME} (nor {SHARDED_SIDECAR_NAME}/): the "
                "checkpoint was saved without EMA (or its save was interrupted). Its model files may hold EMA weights, "
                "so training cannot safely continue from them."
            )
            way_out = "Resume from a checkpoint written with EMA."
        if args.ema_resume_without_state == "restart":
            logger.warning(
                "%s Starting a fresh EMA from the loaded weights (ema_resume_without_state='restart').", problem
            )
            if averager.schedule.starts_at_zero:
                averager.start(clock, step)
            return
        raise EMAStateError(
            f"{problem} {way_out} Or set EMAArguments(ema_resume_without_state='restart') to start a fresh average "
            "from the loaded weights on purpose."
        )
    try:
        averager.load(folder, expected_step=step)
    except EMAStateError as error:
        raise EMAStateError(
            f"{error} Resume from another checkpoint (or with the model and EMA settings it was trained with), or "
            "delete its EMA state and set EMAArguments(ema_resume_without_state='restart') to start a fresh average "
            "on purpose."
        ) from error
