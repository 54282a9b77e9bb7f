"""Runs under `torchrun --nproc_per_node 2` (gloo, CPU) for tests/test_distributed.py; writes each rank's results.

python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py ddp OUT KIND [RESUME_FROM]
python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py fsdp2 OUT
python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py fsdp2_snapshots OUT
python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py ema_loop_ddp OUT
python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py ema_loop_fsdp2 OUT
DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py deepspeed OUT STAGE KIND
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from conftest import Recorder, TinyConfig, TinyModel, make_args, state_of  # noqa: E402

# Both Trainer workers: 2 epochs, a checkpoint every 4 steps, an evaluation every 2.
SCHEDULE = dict(num_train_epochs=2, save_strategy="steps", save_steps=4, eval_strategy="steps", eval_steps=2)


def full_tensors(store, model, label: str | None) -> dict[str, torch.Tensor]:
    """An average's tensors (`label`; None: the training weights) gathered whole, in float64 (a collective)."""
    return {n: t.double() for (lb, n), t in store.full_state(model, label is None).items() if lb == label}


def ddp(out: str, kind: str, resume_from: str | None) -> None:
    from helpers import build

    from hf_ema import EMAArguments

    ema_args = EMAArguments(half_life=["4ba", "8ba"], update_interval="3ba")  # two averages
    trainer, recorder, callback = build(out, ema_args, kind, **SCHEDULE)
    trainer.train(resume_from_checkpoint=resume_from)
    rank = trainer.args.process_index
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "weights": recorder.weights,
            "ema": state_of(callback.ema_model()),
            "ema_8ba": state_of(callback.ema_model(label="8ba")),
            "training": state_of(callback.training_model()),
            "num_updates": callback.num_updates,
            "log_history": trainer.state.log_history,
            "steps": trainer.state.global_step,
        },
        os.path.join(out, f"{'resumed' if resume_from else 'full'}-rank{rank}.pt"),
    )


def _fsdp2_model() -> torch.nn.Module:
    """The small FSDP2 model both FSDP2 workers train: each layer and the whole sharded on the process group."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().double().clone() for n, p in model.named_parameters()}


def fsdp2(out: str) -> None:
    import torch.distributed as dist

    from hf_ema import EMAArguments
    from hf_ema.averager import Averager
    from hf_ema.time import Clock

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model = _fsdp2_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averager = Averager(EMAArguments(half_life=["4ba", "8ba"]))
    averager.reset(model, sharded=True)
    averager.start(Clock(), 0)
    store = averager.store
    local_before = {n: t.clone() for n, t in store.shadow.items()}
    weights = {0: _full_weights(model)}
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, 7):
        x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        weights[step] = _full_weights(model)
        store.update_(model, {"4ba": 0.7, "8ba": 0.9})
    local_shapes = {n: tuple(t.shape) for n, t in store.shadow.items()}
    full_ema, full_ema_8ba = full_tensors(store, model, "4ba"), full_tensors(store, model, "8ba")

    store.place_(model, "4ba")
    swapped = _full_weights(model)
    store.place_(model, "8ba")  # from one average straight to the other
    swapped_8ba = _full_weights(model)
    store.place_(model, None)
    restored = _full_weights(model)

    with averager.ema_weights(model):  # as for a checkpoint whose model files hold the EMA: training weights kept too
        path = averager.save(out, 6, main=rank == 0)
    dist.barrier()  # rank 0 writes; the others read it next (a resuming run starts after the save, as here)

    fresh = _fsdp2_model()
    resumed = Averager(EMAArguments(half_life=["4ba", "8ba"]))
    resumed.reset(fresh, sharded=True)
    resumed.load(out, expected_step=6)
    reloaded_ema = full_tensors(resumed.store, fresh, "4ba")
    reloaded_ema_8ba = full_tensors(resumed.store, fresh, "8ba")
    reloaded_training = _full_weights(fresh)
    torch.save(
        {
            "weights": weights,
            "full_ema": full_ema,
            "full_ema_8ba": full_ema_8ba,
            "swapped": swapped,
            "swapped_8ba": swapped_8ba,
            "reloaded_ema_8ba": reloaded_ema_8ba,
            "restored": restored,
            "local_shapes": local_shapes,
            "local_before": {n: tuple(t.shape) for n, t in local_before.items()},
            "fingerprint": store.fingerprint(),
            "wrote": path,
            "reloaded_ema": reloaded_ema,
            "reloaded_training": reloaded_training,
        },
        os.path.join(out, f"fsdp2-rank{rank}.pt"),
    )
    dist.destroy_process_group()


def force_fsdp_on_cpu() -> None:
    """accelerate enables FSDP only for GPU-like devices; on CPU (gloo) set its distributed type by hand."""
    import accelerate.state as accelerate_state
    from accelerate.utils import DistributedType

    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate_state.AcceleratorState.__init__ = init


def trainer_fsdp2(out: str, resume_from: str | None) -> None:
    """EMATrainer with FSDP2 through accelerate.

    The distributed type is forced on CPU and checkpoints use SHARDED_STATE_DICT (the FULL one cannot save on CPU,
    with or without EMA, in transformers 5.24 / accelerate 1.15). tests/gpu/run_backends.sh runs both on a GPU.
    """
    force_fsdp_on_cpu()
    # transformers 4.x does not hand fsdp_config["version"] to accelerate, which reads FSDP_VERSION (accelerate launch
    # sets it from fsdp_version: 2); without it the Trainer wraps with FSDP1.
    os.environ["FSDP_VERSION"] = "2"
    from helpers import tiny_llama

    from hf_ema import EMAArguments, EMATrainer

    tokens = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = make_args(
        out,
        **SCHEDULE,
        learning_rate=0.5,
        fsdp="full_shard",
        # sync_module_states (the default) needs an accelerator device in transformers 4.x; both ranks build the
        # same seeded model, so there is nothing to broadcast.
        fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT", "sync_module_states": False},
    )
    recorder = Recorder()
    trainer = EMATrainer(
        model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[recorder],
        ema_args=EMAArguments(half_life=["4ba", "8ba"]),
    )  # fmt: skip
    assert trainer.is_fsdp_enabled
    trainer.train(resume_from_checkpoint=resume_from)
    callback = trainer.ema_callback
    ema = full_tensors(callback.store, trainer.model, "4ba")
    ema_8ba = full_tensors(callback.store, trainer.model, "8ba")
    training = full_tensors(callback.store, trainer.model, None)
    local = {n: tuple(t.shape) for n, t in callback.store.shadow.items()}
    rank = trainer.args.process_index
    torch.save(
        {
            "sharded": callback.averager.sharded,
            "weights": recorder.weights,
            "ema": ema,
            "ema_8ba": ema_8ba,
            "training": training,
            "local_shapes": local,
            "global_shapes": callback.store.global_shapes,
            "names": callback.store.names(),
            "shadow_numel": callback.store.numel(),
            "trainable": {n: p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad},
            "steps": trainer.state.global_step,
            "log_history": trainer.state.log_history,
        },
        os.path.join(out, f"fsdp2-trainer-{'resumed' if resume_from else 'full'}-rank{rank}.pt"),
    )


def deepspeed_run(out: str, stage: str, kind: str, resume_from: str | None) -> None:
    """DeepSpeed ZeRO through the Trainer. `stage` is "2", "3" or "3-nopersist" (every ZeRO-3 parameter partitioned
    between steps; by default DeepSpeed keeps small ones gathered). EMATrainer runs without
    stage3_gather_16bit_weights_on_model_save (hf-ema writes the EMA model files itself); the stock Trainer with it.

    On CPU DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu) over gloo: accelerate only starts DeepSpeed
    for GPU-like devices, so the distributed state is configured by hand before the TrainingArguments.
    """
    from accelerate import PartialState
    from helpers import build

    from hf_ema import EMAArguments
    from hf_ema.layout import ZERO3, is_zero3

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    zero = {"stage": int(stage[0]), "stage3_gather_16bit_weights_on_model_save": kind == "callback"}
    if stage == "3-nopersist":
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "zero_optimization": zero,
        # Without an fp16 section transformers 4.x casts float inputs to float16 ("auto" fills in args.fp16: off).
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }
    overrides = dict(**SCHEDULE, use_cpu=False, deepspeed=config, accelerator_config={"use_configured_state": True})
    model = None
    if stage == "3-init":  # from_pretrained partitions the model while building it (zero.Init), as for large models
        import torch.distributed as dist
        from transformers.integrations import is_deepspeed_zero3_enabled

        saved = os.path.join(out, "initial-model")
        if int(os.environ["RANK"]) == 0 and not os.path.isdir(saved):
            TinyModel(TinyConfig()).save_pretrained(saved)
        dist.barrier()
        zero3_args = make_args(out, **overrides)  # noqa: F841 - alive while the model is built: enables zero.Init
        assert is_deepspeed_zero3_enabled()
        model = TinyModel.from_pretrained(saved)
        assert all(hasattr(p, "ds_id") for p in model.parameters())
    trainer, recorder, callback = build(
        out, EMAArguments(half_life=["4ba", "8ba"], update_interval="3ba"), kind, model=model, **overrides
    )
    assert trainer.is_deepspeed_enabled
    trainer.train(resume_from_checkpoint=resume_from)
    # The DeepSpeed internals hf-ema reads, by name on the real objects (EMAMixin._zero3_gathers_on_save, the
    # callback's ZeRO-3 refusals): a rename would otherwise skip them silently.
    assert trainer.model_wrapped._config.zero_config.stage == int(stage[0])
    assert trainer.args.hf_deepspeed_config.config["zero_optimization"]["stage"] == int(stage[0])
    model = trainer.model  # holds the EMA after train()
    ema = state_of(model)
    with callback.training_weights(model):
        training = state_of(model)
    with callback.ema_weights(model, label="8ba"):
        ema_8ba = state_of(model)
    params = dict(model.named_parameters())
    spans = {n: ZERO3.span(params[n])[:2] if is_zero3(params[n]) else (0, params[n].numel()) for n in params}
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "zero3": callback.store.zero3,
            "weights": recorder.weights,
            "ema": ema,
            "ema_8ba": ema_8ba,
            "training": training,
            "spans": spans,
            "local_numel": {n: t.numel() for n, t in callback.store.shadow.items()},
            "global_shapes": callback.store.global_shapes,
            "num_updates": callback.num_updates,
            "log_history": trainer.state.log_history,
            "steps": trainer.state.global_step,
        },
        os.path.join(
            out, f"ds{stage}-{kind}-{'resumed' if resume_from else 'full'}-rank{trainer.args.process_index}.pt"
        ),
    )


def _train_fsdp2_loop(model: torch.nn.Module, steps: int, rank: int, after_step) -> dict[int, dict[str, torch.Tensor]]:
    """`steps` SGD steps of the FSDP2 model on this rank's random batches, calling `after_step(step)` after each (the
    EMA's step); returns the full weights at step 0 and after each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = {0: _full_weights(model)}
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, steps + 1):
        x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step(step)
        weights[step] = _full_weights(model)
    return weights


def fsdp2_snapshots(out: str) -> None:
    """Post-hoc EMA snapshots of an FSDP2 model: each rank writes its shards (float32 and bfloat16 series)."""
    import torch.distributed as dist

    from hf_ema import EMAArguments
    from hf_ema.averager import Averager
    from hf_ema.time import Clock

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = _fsdp2_model()
    max_steps = 12
    averagers = []
    for dtype in ("float32", "bfloat16"):  # driven as the Trainer's hooks would, without a Trainer
        averager = Averager(EMAArguments(sigma_rel=[0.05, 0.1], ema_snapshot_every="3ba", ema_snapshot_dtype=dtype))
        averager.reset(model, sharded=True)
        averager.start(Clock(), 0)
        averager.begin_snapshots(os.path.join(out, dtype), 0, Clock(), main=rank == 0)
        averagers.append(averager)

    def after_step(step: int) -> None:
        clock = Clock.from_counters(step, step / max_steps, 8, 0, max_steps)
        for averager in averagers:
            averager.step(clock, step)
            averager.snapshot(clock, step, final=step == max_steps, main=rank == 0)

    weights = _train_fsdp2_loop(model, max_steps, rank, after_step)
    if rank == 0:
        torch.save({"weights": weights}, os.path.join(out, "fsdp2-snapshots.pt"))


def ema_loop_ddp(out: str) -> None:
    """`hf_ema.EMA` in a hand-written Accelerate loop under DDP: 8 steps, save_state at 4, and a new model, optimizer
    and EMA that load_state and continue to 8."""
    from accelerate import Accelerator

    from hf_ema import EMA, EMAArguments

    def run(resume: bool):
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = TinyModel(TinyConfig())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        model, optimizer = accelerator.prepare(model, optimizer)
        ema = EMA(model, EMAArguments(half_life=["4ba", "8ba"], update_interval="2ba"))
        accelerator.register_for_checkpointing(ema)
        if resume:
            accelerator.load_state(os.path.join(out, "state"))
        weights = {ema.steps: state_of(ema.model)}
        for step in range(ema.steps + 1, 9):
            generator = torch.Generator().manual_seed(100 * step + accelerator.process_index)  # each rank its data
            x = torch.randn(4, 3, generator=generator)
            accelerator.backward(model(x=x, labels=x.sum(-1))["loss"])
            optimizer.step()
            optimizer.zero_grad()
            ema.step()
            weights[step] = state_of(ema.model)
            if step == 4 and not resume:
                accelerator.save_state(os.path.join(out, "state"))
        averages = {label: state_of(m) for label, m in ema.ema_models().items()}
        return accelerator, weights, averages, ema.num_updates

    accelerator, weights, averages, updates = run(resume=False)
    _, _, resumed, resumed_updates = run(resume=True)
    torch.save(
        {"world_size": accelerator.num_processes, "weights": weights, "averages": averages, "updates": updates,
         "resumed": resumed, "resumed_updates": resumed_updates},
        os.path.join(out, f"ema-loop-rank{accelerator.process_index}.pt"),
    )  # fmt: skip


def ema_loop_fsdp2(out: str) -> None:
    """`hf_ema.EMA` on an FSDP2 model: shard-local averages against the full weights, a state_dict round trip into a
    new sharded model, and save_pretrained of the gathered average."""
    import torch.distributed as dist

    from hf_ema import EMA, EMAArguments

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    model = _fsdp2_model()
    ema = EMA(model, EMAArguments(half_life=["4ba", "8ba"]))
    weights = _train_fsdp2_loop(model, 6, rank, lambda step: ema.step())
    store = ema._averager.store
    local = {n: tuple(t.shape) for n, t in store.shadow.items()}
    full = {label: full_tensors(store, model, label) for label in ema.labels}
    state = ema.state_dict()  # gathered: every rank holds the whole averages
    fresh = _fsdp2_model()
    resumed = EMA(fresh, EMAArguments(half_life=["4ba", "8ba"]))
    resumed.load_state_dict(state)
    reloaded = {label: full_tensors(resumed._averager.store, fresh, label) for label in ema.labels}
    ema.save_pretrained(os.path.join(out, "ema-fsdp2"))
    torch.save(
        {"weights": weights, "full": full, "reloaded": reloaded, "local": local, "steps": resumed.steps},
        os.path.join(out, f"ema-fsdp2-rank{rank}.pt"),
    )


def ema_loop_fsdp2_bema(out: str) -> None:
    """`hf_ema.EMA` keeping BEMA on an FSDP2 model: theta_0 shard-local like the average, the readout gathered, and a
    sharded EMA state (every rank its shards, theta_0 included) loaded into a new sharded model."""
    import torch.distributed as dist

    from hf_ema import EMA, EMAArguments
    from hf_ema.averager import Averager

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    args = EMAArguments(bema=True, update_interval="2ba")
    model = _fsdp2_model()
    ema = EMA(model, args)
    weights = _train_fsdp2_loop(model, 7, rank, lambda step: ema.step())
    store = ema._averager.store
    local = {n: tuple(t.shape) for n, t in store.origins["bema"].items()}
    folder = os.path.join(out, "checkpoint-7")
    with ema.average_weights():
        readout = _full_weights(model)
        ema._averager.save(folder, 7, main=rank == 0, holds="bema")  # sharded: the training weights go in too
    fresh = _fsdp2_model()
    loaded = Averager(args)
    loaded.reset(fresh, sharded=True)
    loaded.load(folder, expected_step=7)
    training = _full_weights(fresh)
    with loaded.ema_weights(fresh, label="bema"):
        reloaded = _full_weights(fresh)
    torch.save(
        {"weights": weights, "readout": readout, "reloaded": reloaded, "training": training, "local": local,
         "files": sorted(os.listdir(os.path.join(folder, "ema_state")))},
        os.path.join(out, f"ema-fsdp2-bema-rank{rank}.pt"),
    )  # fmt: skip


def shut_down() -> None:
    """Leaves the process group cleanly: an undestroyed gloo group can abort the process at exit ("terminate called
    without an active exception"), failing the launch after the work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "deepspeed":
        deepspeed_run(*sys.argv[2:5], sys.argv[5] if len(sys.argv) > 5 else None)
    elif sys.argv[1] == "ddp":
        ddp(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif sys.argv[1] == "trainer_fsdp2":
        trainer_fsdp2(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    elif sys.argv[1] == "fsdp2_snapshots":
        fsdp2_snapshots(sys.argv[2])
    elif sys.argv[1] == "ema_loop_ddp":
        ema_loop_ddp(sys.argv[2])
    elif sys.argv[1] == "ema_loop_fsdp2":
        ema_loop_fsdp2(sys.argv[2])
    elif sys.argv[1] == "ema_loop_fsdp2_bema":
        ema_loop_fsdp2_bema(sys.argv[2])
    else:
        fsdp2(sys.argv[2])
    shut_down()
