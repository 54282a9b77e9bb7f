"""The checks `EMACallback` makes of a Trainer run at train begin and end: one EMA callback per Trainer, units the
Trainer counts, supported backends, and the warnings for runs whose settings would never average."""

from __future__ import annotations

import logging
import sys
import weakref
from typing import TYPE_CHECKING

from torch import nn

from .distributed import check_backend
from .time import Clock, Time, reached

if TYPE_CHECKING:  # annotations only: the Trainer's objects are passed in, and no import cycle
    from transformers import TrainerState, TrainingArguments

    from .arguments import EMAArguments
    from .averager import Averager

logger = logging.getLogger(__name__)

# The EMACallback of each running Trainer, keyed by the Trainer's state object (one per Trainer and train() call):
# every callback of a Trainer sees the same state, so a second EMACallback finds the first here.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def claim(state: TrainerState, callback: object) -> None:
    """Refuses a second EMACallback on the same Trainer: each would place its average into the same model, and one
    would take the other's average for the training weights."""
    for key in [k for k, (s, c) in _OWNERS.items() if s() is None or c() is None]:
        del _OWNERS[key]
    owner = _OWNERS.get(id(state))
    if owner is not None and owner[0]() is state and owner[1]() is not callback:
        raise ValueError(
            "This Trainer already has an EMACallback; a second one would place its average into the same model "
            "and corrupt the training weights. Keep several averages in one callback instead: "
            "EMACallback(EMAArguments(half_life=['500ba', '2000ba'])) (or smoothing=[...], sigma_rel=[...]). "
            "With EMATrainer, pass ema_args=EMAArguments(...) and add no EMACallback."
        )
    _OWNERS[id(state)] = (weakref.ref(state), weakref.ref(callback))


def deepspeed_config(args: TrainingArguments) -> dict | None:
    """The DeepSpeed config the Trainer trains with (its "auto" values filled in), or None without DeepSpeed.

    Read from `TrainingArguments.hf_deepspeed_config` (checked by name in tests/test_trainer_internals.py): were it
    renamed, the ZeRO-3 refusals would be skipped silently, so its absence under DeepSpeed raises instead.
    """
    holder = getattr(args, "hf_deepspeed_config", None)
    if holder is not None:
        return holder.config
    if args.deepspeed:
        raise RuntimeError(
            "TrainingArguments has a DeepSpeed config but no `hf_deepspeed_config`, from which hf-ema reads it (the "
            "ZeRO-3 checks depend on it): this transformers version moved it. Use a transformers version hf-ema "
            "supports (README), or report it."
        )
    return None


def backend_layout(args: TrainingArguments, model: nn.Module, bound: bool) -> str:
    """`"replicated"` or `"sharded"` for the run's backend, refusing what hf-ema does not support (`bound`: an
    EMAMixin trainer drives the callback)."""
    config = deepspeed_config(args)
    layout = check_backend(model, config)
    zero = (config or {}).get("zero_optimization") or {}
    gathers = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get("gather_16bit_weights_on_model_save"))
    if zero.get("stage") == 3 and not gathers and not bound:
        raise ValueError(
            "DeepSpeed ZeRO-3 with stage3_gather_16bit_weights_on_model_save=false: the stock Trainer's "
            "save_model() then writes a DeepSpeed checkpoint, whose weights (zero_to_fp32.py) are the "
            'optimizer\'s training weights, not the EMA. Set "stage3_gather_16bit_weights_on_model_save": true '
            "in zero_optimization (model files then hold the EMA), or use EMATrainer, which writes the EMA "
            "model files either way."
        )
    return layout


def refuse_switch_where_wrong(averager: Averager, deepspeed: dict | None) -> None:
    """Refuses Switch-EMA (`ema_switch_every`) where copying the average into the model's parameters would be silently
    wrong or is untested: under DeepSpeed (`deepspeed`, its config), and for sharded averages (FSDP2, ZeRO-3)."""
    every = averager.ema_args.ema_switch_every
    if every is None:
        return
    if deepspeed is not None:
        raise ValueError(
            f"`ema_switch_every` ({every!r}) cannot be used with DeepSpeed (any ZeRO stage): its optimizer keeps its "
            "own fp32 master copy of the weights and writes it back into the model's parameters at the next step, so "
            "the average copied into them would be overwritten. Drop ema_switch_every, or train without DeepSpeed "
            "(one device or DDP)."
        )
    if averager.sharded:
        raise ValueError(
            f"`ema_switch_every` ({every!r}) is not supported with sharded averages (FSDP2, DeepSpeed ZeRO-3): "
            "copying sharded averages into sharded parameters is untested, so hf-ema refuses it rather than risk a "
            "silently wrong switch. Drop ema_switch_every, or train with replicated parameters (one device, DDP)."
        )


def check_units(averager: Averager, args: TrainingArguments, state: TrainerState) -> None:
    units = averager.ema_args.units()
    if "tok" in units and args.include_num_input_tokens_seen in (False, "no", None):
        raise ValueError(
            "EMAArguments use the 'tok' unit, but TrainingArguments.include_num_input_tokens_seen is "
            f"{args.include_num_input_tokens_seen!r}, so the Trainer counts no tokens. Set "
            "include_num_input_tokens_seen=True (or 'non_padding'), or give the times in 'ba'."
        )
    if "ep" in units and (state.num_train_epochs or 0) >= sys.maxsize:
        raise ValueError(
            "EMAArguments use the 'ep' unit, but the training dataset has no length (an IterableDataset), so "
            "epochs are not known. Give the times in 'ba', 'sp' or 'dur' instead."
        )


def refuse_search_without_trial_folder(averager: Averager, args: TrainingArguments, state: TrainerState) -> None:
    """Refuses a stock Trainer's hyper-parameter search trial that would write EMA files: the Trainer writes a
    trial's checkpoints into `output_dir/run-<trial id>/` (`Trainer._get_output_dir(trial)`), a folder callbacks are
    not told, so the EMA state and snapshots would land in `output_dir`, shared by every trial."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    saves, snapshots = strategy != "no", averager.ema_args.ema_snapshot_every is not None
    if not state.is_hyper_param_search or not (saves or snapshots):
        return
    writes = " and ".join(
        what for what, on in (("checkpoints' EMA state", saves), ("post-hoc snapshots", snapshots)) if on
    )
    raise ValueError(
        f"EMACallback on a stock Trainer cannot run a hyperparameter_search trial that writes {writes} "
        f"(save_strategy={strategy!r}, "
        f"ema_snapshot_every={averager.ema_args.ema_snapshot_every!r}): the Trainer writes each trial into "
        f"{args.output_dir}/run-<trial id>/, a folder a callback is not told, so every trial's EMA files would go "
        "into output_dir and overwrite each other. Use EMATrainer (or a Trainer subclass mixing in hf_ema.EMAMixin), "
        "which puts them into the trial's folder; or set save_strategy='no' and ema_snapshot_every=None."
    )


def refuse_reference_without_trainer(ema_args: EMAArguments, bound: bool) -> None:
    """Refuses `ema_reference` on a callback no EMAMixin trainer drives: a callback is not given the DPO trainer's
    reference model, so that average would be kept and never used as the reference."""
    if ema_args.ema_reference is None or bound:
        return
    raise ValueError(
        f"EMAArguments(ema_reference={ema_args.ema_reference!r}) needs a trainer that mixes in hf_ema.EMAMixin: a "
        "callback on a stock trainer is not given the trainer's ref_model, so the reference would never receive the "
        "average. Define `class EMADPOTrainer(EMAMixin, DPOTrainer): pass` and pass ema_args=... to it instead of "
        "an EMACallback (docs/usage.md, 'The EMA as DPO's reference model')."
    )


def tell_what_a_stock_trainer_skips(averager: Averager, args: TrainingArguments, bound: bool) -> None:
    if bound or not args.should_log:
        return
    a = averager.ema_args
    if a.ema_eval_training_weights:
        logger.warning(
            "ema_eval_training_weights=True has no effect with a stock Trainer and EMACallback: only EMATrainer "
            "(or a Trainer subclass mixing in hf_ema.EMAMixin) evaluates the training weights beside the EMA. "
            "Use EMATrainer, or evaluate them after training in `with callback.training_weights(): ...`."
        )
    if len(a.labels) > 1:
        logger.warning(
            "With a stock Trainer, evaluations during training run on the primary average (%s) only; the others "
            "(%s) are kept, checkpointed and available through callback.ema_models(). EMATrainer (or EMAMixin) "
            "evaluates all of them.",
            a.primary_label,
            ", ".join(a.labels[1:]),
        )


def warn_if_no_update_can_happen(
    averager: Averager, args: TrainingArguments, state: TrainerState, dataloader, now: Clock
) -> None:
    """Warns at train begin when the run ends before the first update (or the start) can happen."""
    if not args.should_log or state.max_steps <= 0:
        return
    steps = state.max_steps
    try:
        per_epoch = max(len(dataloader) // max(args.gradient_accumulation_steps, 1), 1)
    except TypeError:  # no dataloader or no length: epochs are not known ahead
        per_epoch = None
    per_device = state.train_batch_size or args.per_device_train_batch_size
    samples = steps * per_device * args.gradient_accumulation_steps * max(args.world_size, 1)
    end = {"ba": steps, "sp": samples, "dur": 1.0, "ep": steps / per_epoch if per_epoch else None}
    a, schedule = averager.ema_args, averager.schedule
    start, interval, switch = a.ema_start_time, a.update_interval_time, a.switch_every_time

    def first(span: Time, last: Clock | None) -> float | None:
        """When `span` after `last` (the start if not started yet) falls, in its unit, if that can be known now."""
        if schedule.started:
            return last[span.unit] + span.value
        if start.value == 0:
            return now[span.unit] + span.value
        return start.value + span.value if start.unit == span.unit else None

    problem = None
    if end.get(start.unit) is not None and not schedule.started and not reached(end[start.unit], start.value):
        problem = f"averaging never starts: ema_start={a.ema_start!r} is not reached by the end of the run"
    elif end.get(interval.unit) is not None:
        due = first(interval, schedule.last_clock)
        if due is not None and not reached(end[interval.unit], due):
            problem = (
                f"the first update needs {interval} of training after the start ({due:g}{interval.unit}), but "
                f"the run ends at {end[interval.unit]:g}{interval.unit}"
            )
    if problem is None and switch is not None and end.get(switch.unit) is not None:
        due = first(switch, schedule.last_switch_clock)
        if due is not None and not reached(end[switch.unit], due):
            logger.warning(
                "EMA: no switch happens: the next is due at %g%s (ema_switch_every=%r), but the run ends at %g%s "
                "(max_steps=%d). Shorten ema_switch_every, or train longer.",
                due,
                switch.unit,
                a.ema_switch_every,
                end[switch.unit],
                switch.unit,
                steps,
            )
    if problem:
        logger.warning(
            "EMA: %s (max_steps=%d), so save_model() and evaluation would use %s. Shorten update_interval "
            "(e.g. update_interval='1ba') or ema_start, or train longer.",
            problem,
            steps,
            "the training weights" if "never starts" in problem else "the initial weights",
        )


def warn_if_nothing_averaged(averager: Averager, args: TrainingArguments, state: TrainerState) -> None:
    if not args.should_log or state.global_step <= 0:
        return
    if not averager.started:
        logger.warning(
            "EMA: training ended at step %d before averaging started (ema_start=%r); the model holds the "
            "training weights.",
            state.global_step,
            averager.ema_args.ema_start,
        )
    elif averager.num_updates == 0:
        logger.warning(
            "EMA: training ended at step %d with no update of the average since it started (update_interval=%s), "
            "so it holds the weights of the start, and save_model() writes those. Use a shorter update_interval.",
            state.global_step,
            averager.ema_args.update_interval_time,
        )
