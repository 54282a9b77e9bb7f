"""The runs tests/test_crash.py kills: each is a fresh process, killed with SIGKILL at a chosen point.

    python tests/crash_run.py train OUT FACE [--resume last|PATH] [--kill-step K] [--kill-trainer-state STEP]
    python tests/crash_run.py export OUT FROM
    python tests/crash_run.py sharded OUT [--resume]

`train`: a tiny regression model, 12 optimizer steps, checkpoints every 4 (`save_steps=4`), two power-function
averages with post-hoc snapshots every 3 steps, through `EMATrainer` (FACE `ema_trainer`) or a stock `Trainer` with
`EMACallback` (`callback`). Kill points inside hf-ema's writes come from `HF_EMA_CRASH_AT` (`hf_ema.files`); the
others from the flags: `--kill-step K` at the end of optimizer step K (before anything of that step is saved),
`--kill-trainer-state STEP` inside the Trainer's save of checkpoint-STEP, after its model and optimizer files, before
its trainer_state.json. A run that ends writes `OUT/result.safetensors`: the training weights (`training/<name>`)
and every average (`<label>/<name>`), and `OUT/trainer_state.json`, the final Trainer state.

`export`: `posthoc.export(FROM, OUT, sigma_rel=0.07)`.

`sharded`: a hand-written loop driving the `Averager` over an FSDP2 model (one process, a one-rank gloo group), so
that the averages are DTensors and the EMA state is written sharded (`ema_state/`, torch.distributed.checkpoint):
8 SGD steps, a `state-<step>` folder every 4 with the weights and the EMA state; `--resume` continues from the newest
folder whose EMA state is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAX_STEPS = 12
SAVE_STEPS = 4


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def train(out: str, face: str, resume: str | None, kill_step: int | None, kill_trainer_state: int | None) -> None:
    import transformers
    from conftest import RegressionDataset, TinyConfig, TinyModel, make_args, state_of
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    from hf_ema import EMAArguments, EMACallback, EMATrainer

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_step:
                _kill()

    if kill_trainer_state is not None:
        save_to_json = transformers.TrainerState.save_to_json

        def killing_save(self, json_path):
            if os.path.basename(os.path.dirname(json_path)) == f"checkpoint-{kill_trainer_state}":
                _kill()
            save_to_json(self, json_path)

        transformers.TrainerState.save_to_json = killing_save

    ema_args = EMAArguments(sigma_rel=[0.05, 0.1], ema_snapshot_every="3ba")
    common = dict(
        model=TinyModel(TinyConfig()),
        args=make_args(out, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS),
        train_dataset=RegressionDataset(32, seed=0),
    )
    killer = [KillAtStep()] if kill_step is not None else []
    if face == "ema_trainer":
        trainer = EMATrainer(callbacks=killer, ema_args=ema_args, **common)
        callback = trainer.ema_callback
    else:
        callback = EMACallback(ema_args)
        trainer = Trainer(callbacks=[*killer, callback], **common)
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    model = trainer.model
    result = {f"training/{name}": t for name, t in state_of(callback.training_model(model)).items()}
    for label, module in callback.ema_models(model).items():
        result.update({f"{label}/{name}": t for name, t in state_of(module).items()})
    save_file({key: t.contiguous() for key, t in result.items()}, os.path.join(out, "result.safetensors"))
    with open(os.path.join(out, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump(dataclasses.asdict(trainer.state), handle, indent=1, sort_keys=True, default=str)


def export(out: str, source: str) -> None:
    from hf_ema import posthoc

    posthoc.export(source, out, sigma_rel=0.07)


def average(out: str, source: str) -> None:
    from hf_ema.average import average_checkpoints

    average_checkpoints(source, out, last=2, overwrite=True, progress=False)


def sharded(out: str, resume: bool) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from torch.distributed.fsdp import fully_shard

    from hf_ema import EMAArguments
    from hf_ema.averager import Averager
    from hf_ema.checkpoint import has_sidecar
    from hf_ema.time import Clock

    os.makedirs(out, exist_ok=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: the weights are the whole training state
    averager = Averager(EMAArguments(half_life=["2ba", "4ba"]))
    averager.reset(model, sharded=True)
    start = 0
    if resume:
        done = sorted(
            int(name.split("-")[1])
            for name in os.listdir(out)
            if name.startswith("state-") and has_sidecar(os.path.join(out, name))
        )
        if done:
            start = done[-1]
            folder = os.path.join(out, f"state-{start}")
            weights = load_file(os.path.join(folder, "weights.safetensors"))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.to_local().copy_(weights[name])
            averager.load(folder, expected_step=start)
    if start == 0:
        averager.start(Clock(), 0)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 9):
        x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
        if step <= start:
            continue
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        averager.step(Clock(ba=float(step)), step, "batch")
        if step % 4 == 0:
            folder = os.path.join(out, f"state-{step}")
            os.makedirs(folder, exist_ok=True)
            weights = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
            save_file(weights, os.path.join(folder, "weights.safetensors"))
            averager.save(folder, step, main=True)
    result = {f"training/{name}": p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    for label in averager.labels:
        with averager.ema_weights(model, label):
            result.update({f"{label}/{n}": p.full_tensor().detach().clone() for n, p in model.named_parameters()})
    save_file(result, os.path.join(out, "result.safetensors"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train")
    run.add_argument("out")
    run.add_argument("face", choices=["ema_trainer", "callback"])
    run.add_argument("--resume")
    run.add_argument("--kill-step", type=int)
    run.add_argument("--kill-trainer-state", type=int)
    for name in ("export", "average"):
        writing = commands.add_parser(name)
        writing.add_argument("out")
        writing.add_argument("source")
    loop = commands.add_parser("sharded")
    loop.add_argument("out")
    loop.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    if args.command == "train":
        train(args.out, args.face, args.resume, args.kill_step, args.kill_trainer_state)
    elif args.command in ("export", "average"):
        {"export": export, "average": average}[args.command](args.out, args.source)
    else:
        sharded(args.out, args.resume)


if __name__ == "__main__":
    main()
