"""Post-hoc EMA snapshots: every power-function average written at intervals during training, and read back.

`SnapshotWriter` (driven by `EMACallback` when `EMAArguments.ema_snapshot_every` is set) writes every average into
`<output_dir>/ema_snapshots/snapshot-<step>/`, outside the Trainer's checkpoint rotation, in the form of a
checkpoint's EMA state: `ema_state.safetensors` (whole tensors, written atomically by the main process), or
`ema_state/` written shard by shard with torch.distributed.checkpoint for FSDP2 and DeepSpeed ZeRO-3 (readable at any
world size). The metadata holds the step, `t`, each average's sigma_rel and gamma, and the optimizer step of every
update so far. `list_snapshots` and `Snapshot` read them back; `hf_ema.posthoc` synthesises from them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._version import __version__
from .checkpoint import (
    EMAStateError,
    StoredState,
    average_prefixes,
    has_sidecar,
    read_average,
    read_state,
    sharded_sidecar_path,
    sidecar_path,
    write_state,
)
from .power import append_update, expand_updates
from .rules import sigma_rel_of_gamma
from .store import EMAStore
from .time import Clock, Time, parse_time

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "ema_snapshots"
"""The folder under the Trainer's `output_dir` that holds the snapshots (outside the checkpoint rotation)."""
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_KIND = "posthoc_snapshot"
SNAPSHOT_FORMAT = 1
SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PostHocError(ValueError):
    """The snapshots are missing, inconsistent, or cannot give the requested average."""


# ---- snapshots on disk ----


@dataclass(frozen=True)
class Snapshot:
    """One snapshot folder: every average at one step.

    Args:
        path (`str`): the folder (`.../ema_snapshots/snapshot-<step>`).
        meta (`dict`): its metadata (see `SnapshotWriter`).
        sharded (`bool`): written shard by shard (`ema_state/`, torch.distributed.checkpoint) rather than whole
            (`ema_state.safetensors`).
    """

    path: str
    meta: dict
    sharded: bool

    @property
    def step(self) -> int:
        """The optimizer step (`global_step`) it was written at."""
        return int(self.meta["step"])

    @property
    def t(self) -> float:
        """Optimizer steps from the start of averaging to the last update before it (`t` of the rule)."""
        return float(self.meta["t"])

    @property
    def num_updates(self) -> int:
        return int(self.meta["num_updates"])

    @property
    def gammas(self) -> dict[str, float]:
        """`{label: gamma}` of the power-function averages it holds."""
        return {label: float(rule["gamma"]) for label, rule in self.meta["rules"].items()}

    @property
    def prefixes(self) -> dict[str, str]:
        return average_prefixes(self.meta)

    @property
    def file(self) -> str:
        return sharded_sidecar_path(self.path) if self.sharded else sidecar_path(self.path)

    def read(self, names: Sequence[str], label: str) -> dict[str, Tensor]:
        """Full tensors of one average, for `names`, in the snapshot's dtype (a sharded one read in this process)."""
        return read_average(StoredState(self.file, self.meta, self.sharded), label, list(names))


def snapshot_dir(output_dir: str | os.PathLike) -> str:
    """`<output_dir>/ema_snapshots`, or `output_dir` itself when it is that folder."""
    output_dir = os.fspath(output_dir)
    nested = os.path.join(output_dir, SNAPSHOT_DIR)
    if os.path.isdir(nested):
        return nested
    if os.path.basename(os.path.normpath(output_dir)) == SNAPSHOT_DIR:
        return output_dir
    return output_dir if any(_snapshot_step(name) is not None for name in _listdir(output_dir)) else nested


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _snapshot_step(name: str) -> int | None:
    match = re.fullmatch(re.escape(SNAPSHOT_PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def read_snapshot(path: str | os.PathLike) -> Snapshot:
    """Reads one snapshot folder's metadata (not its tensors).

    Raises:
        PostHocError: the folder holds no snapshot, an unreadable one, or EMA state that is not a snapshot.
    """
    path = os.fspath(path)
    try:
        stored = read_state(path, tensors=False)  # the reader of EMA state: its format version checked too
    except EMAStateError as error:
        raise PostHocError(
            f"Snapshot {path} cannot be read: {error} Delete that snapshot folder; synthesis uses the others."
        ) from error
    meta, sharded = stored.meta, stored.sharded
    if meta.get("kind") != SNAPSHOT_KIND:
        raise PostHocError(f"{path} holds EMA state, not an hf-ema post-hoc snapshot.")
    if int(meta.get("snapshot_format", 0)) > SNAPSHOT_FORMAT:
        raise PostHocError(
            f"Snapshot {path} has format {meta.get('snapshot_format')}, but this hf-ema reads formats up to "
            f"{SNAPSHOT_FORMAT}. Upgrade hf-ema to read it."
        )
    return Snapshot(path=path, meta=meta, sharded=sharded)


def list_snapshots(output_dir: str | os.PathLike) -> list[Snapshot]:
    """The complete snapshots under `output_dir` (a Trainer's `output_dir`, or its `ema_snapshots` folder), by step.

    A snapshot whose write was interrupted (its folder holds no complete EMA state: a crash before its rename) is
    skipped with a warning, never read; the folders set aside at a resume (`discarded-*`) are not looked into.
    """
    folder = snapshot_dir(output_dir)
    found = []
    for name in _listdir(folder):
        path = os.path.join(folder, name)
        if _snapshot_step(name) is None or not os.path.isdir(path):
            continue
        if has_sidecar(path):
            found.append(read_snapshot(path))
        else:
            logger.warning(
                "Skipping %s: its write was interrupted (no complete EMA state in it). The other snapshots are used; "
                "delete that folder.",
                path,
            )
    return sorted(found, key=lambda snapshot: snapshot.step)


# ---- writing, during training ----


class SnapshotWriter:
    """Writes post-hoc EMA snapshots during training; `EMACallback` drives it when `ema_snapshot_every` is set.

    After each optimizer step it records the step when the averages were updated, and when the clock has crossed a
    multiple of `every` since the previous step (and at the last step of training, `max_steps`) writes every average
    into `<output_dir>/ema_snapshots/snapshot-<step>/`: `ema_state.safetensors`, atomically, from the main process,
    or for sharded models (FSDP2, DeepSpeed ZeRO-3) `ema_state/`, each rank writing its own shards. The metadata
    holds the step, `t`, the number of updates and the optimizer step of each (compressed), the averages' labels,
    gamma and sigma_rel, the fingerprint of the tensors (names, full shapes, dtypes), the snapshot dtype and a run
    id.

    At train begin, snapshots newer than the step training starts from were written by a run that did not reach its
    next checkpoint (or by an earlier run, for a fresh start): they are moved into
    `ema_snapshots/discarded-<step>-<time>-<id>/`, so that they cannot be mixed into this run's series. Snapshots that
    remain but disagree with the resumed state (another start, other averages, another model) are refused.

    Args:
        every (`str`): the interval, a time string (`"1000ba"`, `"1ep"`, `"0.05dur"`).
        dtype (`str`, *optional*, defaults to `"float32"`): `"float32"` or `"bfloat16"`.
    """

    def __init__(self, every: str, dtype: str = "float32") -> None:
        self.every: Time = parse_time(every, "ema_snapshot_every")
        self.dtype = SNAPSHOT_DTYPES[dtype]
        self.folder: str | None = None
        self.run: str | None = None
        self.segments: list[list[int]] = []
        self.approximate = False
        self._seen_updates = 0
        self._ticks = 0
        self._written_step = -1

    def _tick(self, clock: Clock) -> int:
        """How many multiples of `every` the clock has passed (with slack for float epoch and duration clocks)."""
        return math.floor(clock[self.every.unit] / self.every.value + 1e-9)

    def begin(self, output_dir: str, step: int, schedule, store: EMAStore | None, clock: Clock, main: bool) -> None:
        """Prepares the series at train begin (fresh or resumed at `step`), after the EMA state was loaded."""
        self.folder = os.path.join(os.fspath(output_dir), SNAPSHOT_DIR)
        self._ticks, self._written_step = self._tick(clock), -1
        self._seen_updates = schedule.num_updates if schedule.started else 0
        self.segments, self.approximate, self.run = [], False, None
        if not main:  # only the main process reads and writes the metadata
            return
        self._set_aside_newer(step)
        kept = list_snapshots(self.folder)
        latest = kept[-1] if kept else None
        if latest is not None:
            self._check_continues(latest, schedule, store)
            self.segments = [list(run) for run in latest.meta["updates"]]
            self.approximate = bool(latest.meta.get("approximate_updates", False))
            self.run = latest.meta["run"]
        else:
            self.run = uuid.uuid4().hex[:12]
        if schedule.started:
            self._fill_gap(schedule, latest)

    def _set_aside_newer(self, step: int) -> None:
        names = [name for name in _listdir(self.folder) if (_snapshot_step(name) or 0) > step]
        if not names:
            return
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        aside = os.path.join(self.folder, f"discarded-{step}-{stamp}")
        os.makedirs(aside)
        for name in names:
            os.replace(os.path.join(self.folder, name), os.path.join(aside, name))
        logger.warning(
            "Training starts at step %d, but %s held %d snapshot(s) of later steps, written by a run that did not "
            "reach its next checkpoint (or by an earlier run): moved to %s, so that they are not mixed into this "
            "run's series. Delete that folder once you do not need it.",
            step,
            self.folder,
            len(names),
            aside,
        )

    def _check_continues(self, latest: Snapshot, schedule, store: EMAStore | None) -> None:
        problems = []
        if not schedule.started:
            problems.append("the resumed EMA has not started averaging, but the snapshot has")
        else:
            if float(latest.meta["start_step"]) != float(schedule.start_clock.ba):
                problems.append(
                    f"averaging started at step {latest.meta['start_step']} there, at {schedule.start_clock.ba:g} here"
                )
            if latest.num_updates > schedule.num_updates:
                problems.append(f"it counts {latest.num_updates} updates, the resumed EMA {schedule.num_updates}")
        gammas = {label: getattr(rule, "gamma", None) for label, rule in schedule.rules.items()}
        if latest.gammas != gammas:
            problems.append(
                f"it holds the averages {_sigma_rels(latest.gammas)}, these settings {_sigma_rels(gammas)}"
            )
        if store is not None and not problems:
            found = {n: shape for n, (shape, _) in latest.meta["fingerprint"].items()}
            expected = {n: shape for n, (shape, _) in store.fingerprint().items()}
            if found != expected:
                problems.append("it holds the averages of another model (tensor names or shapes differ)")
        if problems:
            raise PostHocError(
                f"{self.folder} holds snapshots up to step {latest.step} that do not continue the EMA being resumed: "
                f"{'; '.join(problems)}. Post-hoc synthesis needs one series of pure power-function averages. Resume "
                "with the checkpoint and settings they were written with, or move that folder away (or train into "
                "another output_dir) to start a new series."
            )

    def _fill_gap(self, schedule, latest: Snapshot | None) -> None:
        """Adds the updates between the latest snapshot and the resumed step, which only the counters record."""
        done = latest.num_updates if latest is not None else 0
        missing = schedule.num_updates - done
        if missing <= 0:
            return
        known = expand_updates(self.segments)
        previous = int(known[-1]) if known.numel() else int(schedule.start_clock.ba)
        last = int(schedule.last_step)
        stride = (last - previous) / missing
        if stride >= 1 and stride == int(stride):  # an update every `stride` steps: exact for a `ba` interval
            for k in range(1, missing + 1):
                append_update(self.segments, previous + int(stride) * k)
            return
        self.approximate = True
        logger.warning(
            "Resuming: the %d EMA updates between steps %d and %d were not evenly spaced; post-hoc synthesis assumes "
            "they were (a small approximation of the weighting).",
            missing,
            previous,
            last,
        )
        steps = sorted({round(previous + (last - previous) * k / missing) for k in range(1, missing + 1)})
        for step in steps:
            append_update(self.segments, step)

    def after_step(
        self,
        store: EMAStore | None,
        model,
        schedule,
        clock: Clock,
        step: int,
        final: bool,
        sharded: bool,
        main: bool,
    ) -> str | None:
        """Records this step's update and writes a snapshot when one is due; every rank calls it. Whole averages are
        written by the main process (`main`, global rank 0), sharded ones by every rank into the folder the main
        process finishes. Returns the folder written on the main process, else None."""
        if not schedule.started or store is None:
            self._ticks = self._tick(clock)
            return None
        if schedule.num_updates > self._seen_updates:
            self._seen_updates = schedule.num_updates
            append_update(self.segments, int(schedule.last_step))
        ticks = self._tick(clock)
        due = ticks > self._ticks or final
        self._ticks = max(self._ticks, ticks)
        if not due or step == self._written_step or schedule.num_updates == 0:
            return None
        self._written_step = step
        folder = os.path.join(self.folder, f"{SNAPSHOT_PREFIX}{step}")
        meta = self._meta(store, schedule, clock, step) if main else None
        if not sharded and not main:
            return None
        state = store.sharded_state(model, False) if sharded else store.state(model, False)
        tensors = {key: t.to(self.dtype) for key, t in state.items()}
        written = write_state(folder, meta, tensors, sharded=sharded, what="snapshot")
        if main:
            logger.info("EMA snapshot of step %d written to %s.", step, folder)
        return folder if main and written else None

    def _meta(self, store: EMAStore, schedule, clock: Clock, step: int) -> dict:
        start = float(schedule.start_clock.ba)
        rules = schedule.rules
        return {
            "kind": SNAPSHOT_KIND,
            "snapshot_format": SNAPSHOT_FORMAT,
            "hf_ema_version": __version__,
            "run": self.run,
            "step": step,
            "global_step": step,
            "t": float(schedule.last_step) - start,
            "start_step": start,
            "num_updates": schedule.num_updates,
            "updates": self.segments,
            "approximate_updates": self.approximate,
            "clock": clock.to_dict(),
            "averages": list(rules),
            "rules": {label: rule.describe() for label, rule in rules.items()},
            "dtype": str(self.dtype).removeprefix("torch."),
            "fingerprint": store.fingerprint(),
            "flat_names": store.flat_names,
        }


def _sigma_rels(gammas: Mapping[str, float | None]) -> str:
    return "[" + ", ".join(f"{sigma_rel_of_gamma(g):.4g}" if g is not None else "?" for g in gammas.values()) + "]"
