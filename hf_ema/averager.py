"""The Averager: the averages of one model with their schedule, placement, EMA state and snapshots.

Both faces drive it: `EMACallback` (the Trainer's hooks turn `TrainerState` into a `Clock` and call `step`) and
`hf_ema.EMA` (a hand-written loop counts its own steps). It knows no Trainer: it is told the clock, the optimizer step,
and whether this process writes files.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator

import torch
from torch import nn

from ._version import __version__
from .arguments import BEMA_LABEL, EMAArguments
from .checkpoint import (
    EMAStateError,
    StoredState,
    average_prefixes,
    check_fingerprint,
    check_version,
    file_key,
    read_state,
    write_state,
)
from .layout import comm_device
from .placement import TRAINING, Placement, Target
from .rules import BEMA, Warmup
from .schedule import START, EMASchedule, Update
from .store import EMAStore, Origin
from .time import Clock

logger = logging.getLogger(__name__)

STATE_DICT_PATH = "the EMA state dict"
"""How errors name an in-memory state (`Averager.state_dict()`), where a file would be named."""


class Averager:
    """Keeps the averages of one model: the store (created when averaging starts), the schedule and its counters, the
    placement of averages into the model, the EMA state on disk and in memory, and post-hoc snapshots.

    Args:
        ema_args (`EMAArguments`): the settings.
        owner (`str`, *optional*, defaults to `"callback"`): how messages name the object the user holds (`callback`,
            `ema`).
    """

    def __init__(self, ema_args: EMAArguments, owner: str = "callback") -> None:
        self.ema_args = ema_args
        self.owner = owner
        self.model: nn.Module | None = None
        self.store: EMAStore | None = None
        self.schedule = self._new_schedule()
        self.placement = Placement(lambda: self.store, lambda: self.model, ema_args.ema_reference)
        self.sharded = False  # the model's parameters are sharded across ranks (FSDP2, ZeRO-3)
        self.log = True  # this process logs (the main process)
        self.run_id: str | None = None  # recorded in every EMA state written, with the run's output folder
        self.run_output_dir: str | None = None
        self.snapshots = None  # a `hf_ema.snapshots.SnapshotWriter` with `ema_snapshot_every`
        self._told_not_started = False

    # ---- what it holds ----

    @property
    def labels(self) -> list[str]:
        """The averages' labels, primary first."""
        return self.ema_args.labels

    @property
    def primary_label(self) -> str:
        return self.ema_args.primary_label

    @property
    def started(self) -> bool:
        """Whether averaging has begun (before it, every average equals the training weights)."""
        return self.store is not None and self.schedule.started

    @property
    def num_updates(self) -> int:
        return self.schedule.num_updates

    @property
    def num_switches(self) -> int:
        """Switch-EMA: how often the primary average was copied into the training weights (`ema_switch_every`)."""
        return self.schedule.num_switches

    def check_label(self, label: str | None) -> str:
        if label is None:
            return self.primary_label
        if label not in self.labels:
            raise KeyError(
                f"No average labelled {label!r}; the averages are {self.labels} (labels are the values as given to "
                "EMAArguments, e.g. '2000ba' or '0.05')."
            )
        return label

    # ---- the run ----

    def _new_schedule(self) -> EMASchedule:
        a = self.ema_args
        return EMASchedule(
            update_interval=a.update_interval_time,
            ema_start=a.ema_start_time,
            rules=a.rules(),
            composer=a.ema_schedule == "composer",
            switch_every=a.switch_every_time,
        )

    def _new_store(self) -> EMAStore:
        if self.store is not None:
            self.store.close()
        return self._build_store()

    def _build_store(self) -> EMAStore:
        a = self.ema_args
        corrected = {
            label: lambda label=label: self.bias_correction(label)
            for label, rule in self.schedule.rules.items()
            if isinstance(rule, BEMA)
        }
        return EMAStore(
            self.model, a.ema_dtype, device=a.ema_device, buffers=a.ema_buffers, labels=a.labels, corrected=corrected
        )

    def bias_correction(self, label: str) -> float:
        """`alpha_t` of the bias-corrected (BEMA) average `label` now: `t` is the optimizer steps from the start to
        the last update (0 before the first), the step of the average being read."""
        schedule = self.schedule
        return schedule.rules[label].alpha(schedule.last_clock.ba - schedule.start_clock.ba)

    def reset(self, model: nn.Module, sharded: bool) -> None:
        """Drops the averages and counters: a run on `model` begins (its EMA state is started or loaded next)."""
        if self.store is not None:
            self.store.close()
        self.model, self.store, self.sharded = model, None, sharded
        self.schedule = self._new_schedule()

    def start(self, clock: Clock, step: int) -> None:
        """Sets every average to the model's current weights: averaging begins at `clock` (optimizer step `step`)."""
        self.store = self._new_store()
        self.schedule.start(clock, step)
        self._log_start(step)

    def _log_start(self, step: int) -> None:
        if self.log:
            logger.info(
                "EMA started at step %d: %d average(s) of %d tensors, %d elements each, %.1f MiB in all.",
                step,
                len(self.store.labels),
                len(self.store.names()),
                self.store.numel(),
                self.store.nbytes() / 2**20,
            )

    def step(self, clock: Clock, step: int, event: str = "batch") -> None:
        """Tells the averager that optimizer step `step` ended (`event="epoch"`: an epoch ended) with the clock at
        `clock`; it starts or updates the averages when the schedule says so. The model must hold the training
        weights."""
        before = self.schedule.state_dict() if self.ema_args.ema_skip_non_finite else None
        if self.schedule.composer:
            action = self.schedule.step_composer(clock, step, event)
        else:
            action = self.schedule.step(clock, step)
        if isinstance(action, Update) and before is not None:
            bad = self._on_any_rank(self.store.non_finite_training(self.model))  # skip everywhere if any rank must
            if bad is not None:
                self.schedule.load_state_dict(before)  # the next update spans this step's time too
                logger.warning(
                    "Step %d: training tensor %r holds NaN or Inf; the EMA update is skipped (ema_skip_non_finite).",
                    step,
                    bad,
                )
                return
        if action is START:
            self.store = self._new_store()
            self._log_start(step)
        elif action is not None:
            self.store.update_(self.model, action.smoothings)
            if action.switch:
                self._switch(step)

    def _switch(self, step: int) -> None:
        """Switch-EMA: copies the primary average (as it reads: BEMA's readout) into the training weights. The
        optimizer is not touched: its state (momentum, moments, step counts) continues."""
        label = self.primary_label  # never a DPO reference's average: that comes last, and alone is refused
        self.store.copy_ema_to(self.model, self.model, label)  # BEMA: each readout is a new tensor, then copied
        if self.log:
            logger.info(
                "Step %d: switch %d, the EMA average %r copied into the training weights (ema_switch_every=%s).",
                step,
                self.schedule.num_switches,
                label,
                self.ema_args.ema_switch_every,
            )

    def fence(self) -> None:
        """Call before the optimizer writes the weights: an offloaded update's copies must be out first."""
        if self.store is not None:
            self.store.fence()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _on_any_rank(self, bad: str | None) -> str | None:
        """`bad` (a tensor name or None) from this rank, or a placeholder if another rank of a sharded model has one."""
        if not self.sharded or not torch.distributed.is_initialized():
            return bad
        flag = torch.tensor(float(bad is not None), device=comm_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bad or ("a tensor shard on another rank" if flag.item() else None)

    def check_finite(self, step: int, consequence: str) -> None:
        """Raises if an average holds NaN or Inf (on any rank's shards): one host sync, at checkpoints and the end."""
        if not self.started:
            return
        bad = self._on_any_rank(self.store.non_finite_average(self.model))
        if bad is None:
            return
        raise FloatingPointError(
            f"The EMA average of {bad!r} holds NaN or Inf at step {step}: the training weights became "
            f"non-finite (a diverged step) and were averaged in. {consequence}. Resume from the last checkpoint "
            "written before this, and set EMAArguments(ema_skip_non_finite=True) to skip updates from non-finite "
            "weights (or fix the instability: lower the learning rate, clip gradients)."
        )

    # ---- the weights ----

    def _resolve(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise RuntimeError(
                f"The EMA {self.owner} has no model yet: pass `model`, or call this after `trainer.train()`."
            )
        return model

    def note_if_not_started(self) -> None:
        """Logs once that the EMA weights asked for are the training weights, averaging not having started."""
        if not self.started and not self._told_not_started:
            logger.info("EMA averaging has not started yet; using the training weights.")
            self._told_not_started = True

    @contextlib.contextmanager
    def ema_weights(self, model: nn.Module | None = None, label: str | None = None) -> Iterator[nn.Module]:
        """Runs the block with an average (the primary by default) in the model, in place (no copy where dtypes
        match), explicitly: it wins over implicit placements inside it. What the model held before is back
        afterwards, also when the block raises. Before averaging starts the block runs on the training weights."""
        model = self._resolve(model)
        label = self.check_label(label)
        self.note_if_not_started()
        with self.placement.holding(label, explicit=True):
            yield model

    @contextlib.contextmanager
    def training_weights(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Runs the block with the training weights in the model (in place, explicitly), restoring what was there."""
        model = self._resolve(model)
        with self.placement.holding(TRAINING, explicit=True):
            yield model

    def _refuse_copy_of_zero3(self, call: str, instead: str) -> None:
        if self.store is not None and self.store.zero3:
            raise RuntimeError(
                f"{call} cannot copy a DeepSpeed ZeRO-3 model: each rank holds only its partitions. Run the code "
                f"inside `with {self.owner}.{instead}:` (every rank), or save the weights with save_model() and load "
                "them with from_pretrained()."
            )

    def ema_model(self, model: nn.Module | None = None, label: str | None = None) -> nn.Module:
        """A new, independent module holding an average (the primary by default; the training weights before
        averaging starts)."""
        model = self._resolve(model)
        label = self.check_label(label)
        self._refuse_copy_of_zero3("ema_model()", "ema_weights()")
        copied = copy.deepcopy(model)
        if self.started:
            self.store.copy_ema_to(copied, model, label)
        return copied

    def ema_models(self, model: nn.Module | None = None) -> dict[str, nn.Module]:
        """`{label: independent module}` for every average, primary first."""
        return {label: self.ema_model(model, label) for label in self.labels}

    def training_model(self, model: nn.Module | None = None) -> nn.Module:
        """A new, independent module holding the training weights."""
        model = self._resolve(model)
        self._refuse_copy_of_zero3("training_model()", "training_weights()")
        copied = copy.deepcopy(model)
        if self.started:
            self.store.copy_training_to(copied, model)
        return copied

    # ---- EMA state ----

    def meta(self, step: int, holds: Target) -> dict:
        """The JSON document of the EMA state at optimizer step `step`, the model (files) holding `holds`."""
        rules = self.schedule.rules
        return {
            "hf_ema_version": __version__,
            "global_step": step,
            "schedule": self.schedule.state_dict(),
            "ema_args": self.ema_args.to_dict(),
            "averages": list(rules),
            "rules": {label: rule.describe() for label, rule in rules.items()},
            "model_files": "training" if holds is TRAINING else "ema",
            "model_files_average": None if holds is TRAINING else holds,
            "fingerprint": self.store.fingerprint() if self.started else None,
            "flat_names": self.store.flat_names if self.started else [],
            "run_id": self.run_id,
            "run_output_dir": self.run_output_dir,
        }

    def save(
        self, folder: str, step: int, main: bool, first_rank: bool | None = None, holds: Target | None = None
    ) -> str | None:
        """Writes the EMA state of optimizer step `step` into `folder`; every rank calls it. Whole averages are
        written by the main process (`main`); sharded ones by every rank, its shards, into the folder the first rank
        (`first_rank`, defaults to `main`) finishes, on a filesystem all ranks share.

        `holds` is what the folder's model files hold (an average's label, or `TRAINING`); by default what the model
        holds now. It is recorded, and decides whether the training weights are saved too (the model files cannot
        give them back). Returns the path written on the main process, else None.
        """
        holds = self.placement.holds if holds is None else holds
        sharded = self.sharded or (self.started and self.store.sharded)
        meta = self.meta(step, holds) if (first_rank if sharded and first_rank is not None else main) else None
        if not self.started:
            tensors = {}
        elif sharded:
            tensors = self.store.sharded_state(self.model, holds is not TRAINING)
        elif meta is not None:
            tensors = self.store.state(self.model, holds is not TRAINING)
        else:
            return None
        return write_state(folder, meta, tensors, sharded=sharded)

    def state_dict(self, step: int) -> dict:
        """The EMA state as a dict of the same keys and metadata as the files: `{"meta": {...}, "tensors": {...}}`,
        whole tensors on the CPU, copied (sharded averages gathered: a collective every rank must call). Holds the
        training weights too while the model holds an average."""
        holds = self.placement.holds
        tensors = {}
        if self.started:
            full = self.store.full_state(self.model, holds is not TRAINING)
            tensors = {file_key(key): t.detach().to("cpu", copy=True) for key, t in full.items()}
        return {"meta": self.meta(step, holds) | {"format_version": 2}, "tensors": tensors}

    def load_state_dict(self, state: dict) -> None:
        """Restores what `state_dict()` returned: every average, the counters and, when it holds them, the training
        weights."""
        if not isinstance(state, dict) or "meta" not in state or "tensors" not in state:
            raise EMAStateError(
                f"{STATE_DICT_PATH} must be what EMA.state_dict() returned (a dict with 'meta' and 'tensors'), got "
                f"{type(state).__name__}{' with keys ' + str(sorted(state)[:5]) if isinstance(state, dict) else ''}."
            )
        check_version(STATE_DICT_PATH, state["meta"])
        self.restore(StoredState(STATE_DICT_PATH, state["meta"], sharded=False, tensors=state["tensors"]))

    def load(self, folder: str, expected_step: int | None = None) -> None:
        """Restores the EMA state in `folder` (either form, format 1 or 2; any world size), checking it was written
        at `expected_step` when given."""
        self.restore(read_state(folder), folder, expected_step)

    def restore(self, stored: StoredState, folder: str | None = None, expected_step: int | None = None) -> None:
        """Restores `stored` (the one reader of EMA state: files and state dicts alike)."""
        path, meta = stored.path, stored.meta
        if expected_step is not None and meta.get("global_step") != expected_step:
            raise EMAStateError(
                f"{path} was written at step {meta.get('global_step')}, but the checkpoint resumes at step "
                f"{expected_step}; it belongs to another checkpoint."
            )
        if not self.ema_args.same_as(meta.get("ema_args")) and self.log:
            logger.warning(
                "The EMA settings differ from those in %s (%s now, %s then); the averages continue with the new "
                "settings.",
                path,
                self.ema_args.to_dict(),
                meta.get("ema_args"),
            )
        old_warmups = [
            label
            for label, rule in (meta.get("rules") or {}).items()
            if rule.get("rule") == "warmup" and rule.get("count") != Warmup.COUNT
        ]
        if old_warmups and self.log:
            logger.warning(
                "%s was written by hf-ema %s, whose warmup (averages %s) counted t optimizer steps where timm and "
                "diffusers count t - 1; the averages continue with their count, so the next updates' smoothing is "
                "that of one step earlier than before (at step t, 1 - t ** -power against 1 - (1 + t) ** -power "
                "with inv_gamma 1).",
                path,
                meta.get("hf_ema_version"),
                ", ".join(old_warmups),
            )
        prefixes = self._match_averages(path, average_prefixes(meta))
        schedule = self._new_schedule()
        try:
            schedule.load_state_dict(meta["schedule"])
        except ValueError as error:
            raise EMAStateError(f"{path}: {error}. Resume without the warmup, or from a newer checkpoint.") from error
        if not schedule.started:
            self.close()
            self.schedule, self.store = schedule, None
            return
        # Built aside: a state that fails its checks leaves the averages and counters as they were.
        store = self._build_store()
        check_fingerprint(path, store.fingerprint(), meta["fingerprint"])
        with_training = meta["model_files"] == "ema"
        if stored.sharded:
            saved_flat = meta.get("flat_names", [])
            tensors = store.empty_sharded_state(self.model, with_training, saved_flat)
            stored.load_sharded(folder, tensors, prefixes)
            store.load_sharded_(self.model, tensors, saved_flat)
        else:
            found = stored.whole(store.names(), prefixes, with_training, origins=list(store.origins))
            ema = {label: {n: found[label, n] for n in store.names()} for label in prefixes}
            origins = {label: {n: found[Origin(label), n] for n in store.names()} for label in store.origins}
            training = {n: found[None, n] for n in store.names()} if with_training else None
            store.load_state_(self.model, ema, training, origins)
        self.close()
        self.schedule, self.store = schedule, store

    def _match_averages(self, path: str, saved: dict[str, str]) -> dict[str, str]:
        """`{label now: key prefix in the file}`: the same labels, or one average renamed (its settings changed)."""
        labels = self.labels
        if set(saved) == set(labels):
            return {label: saved[label] for label in labels}
        if len(saved) == 1 and len(labels) == 1 and (BEMA_LABEL in saved) == (BEMA_LABEL in labels):
            return {labels[0]: next(iter(saved.values()))}
        if BEMA_LABEL in saved or BEMA_LABEL in labels:
            raise EMAStateError(
                f"{path} holds the averages {list(saved)}, but the EMA settings ask for {labels}; BEMA ('bema') "
                "continues only from a checkpoint that holds it (with its start weights theta_0), and a BEMA average "
                "in the checkpoint would be dropped. Resume with the averages the checkpoint holds "
                f"(EMAArguments(bema={BEMA_LABEL in saved}, ...))."
            )
        raise EMAStateError(
            f"{path} holds the averages {list(saved)}, but the EMA settings ask for {labels}; an average missing "
            "from the checkpoint cannot continue exactly and one missing from the settings would be dropped. Resume "
            f"with the averages the checkpoint holds (e.g. EMAArguments(half_life={list(saved)}) for half-lives)."
        )

    # ---- post-hoc snapshots ----

    def begin_snapshots(self, output_dir: str | os.PathLike, step: int, clock: Clock, main: bool) -> None:
        """Prepares the post-hoc snapshot series (`ema_snapshot_every`) after the EMA state was started or loaded:
        sets aside snapshots newer than `step`, and checks the remaining ones continue this EMA."""
        if self.ema_args.ema_snapshot_every is None:
            return
        from .snapshots import SnapshotWriter

        self.snapshots = SnapshotWriter(self.ema_args.ema_snapshot_every, self.ema_args.ema_snapshot_dtype)
        self.snapshots.begin(os.fspath(output_dir), step, self.schedule, self.store, clock, main=main)

    def snapshot(self, clock: Clock, step: int, final: bool, main: bool) -> str | None:
        """Records this step's update and writes a snapshot when one is due (or `final`); every rank calls it."""
        if self.snapshots is None:
            return None
        return self.snapshots.after_step(
            self.store,
            self.model,
            self.schedule,
            clock,
            step,
            final=final,
            sharded=self.sharded or (self.started and self.store.sharded),
            main=main,
        )
