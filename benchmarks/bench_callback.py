"""What the EMA costs inside a stock `transformers.Trainer`: `EMACallback.on_step_end` per update, and the step time.

Part 1, per-update cost against the `_foreach` floor. A stock `Trainer` (CPU, SGD, tiny synthetic data) trains
`tiny-4000` (2000 `nn.Linear(8, 8)`: 4000 tensors of 64 or 8 elements) and `medium-400` (200 `nn.Linear(256, 256)`:
200 weights of 65536 elements and 200 biases of 256), each with float32 weights and with bf16 weights (the model is
cast, `bf16=False`, so the step really runs in bf16 and the script checks the Trainer left it so; the averages are
float32, `ema_dtype="auto"`), with `callbacks=[EMACallback(EMAArguments(half_life="10ba"))]`. The forward is the sum
of the layers applied to one small input, computed as one linear layer of the summed weights (the same function, one
stack per kind of tensor, so the step stays cheap). The bound method `on_step_end` of that EMACallback instance is
replaced by a wrapper that times the original with `time.perf_counter()` as the Trainer calls it: what a user pays
per update, schedule, placement and bookkeeping included. Right after it, in the same wrapper, the floor is timed:
one `torch._foreach_lerp_(avgs, lives, 0.1)` under `torch.no_grad()`, on float32 copies of the trainable tensors
made once at train begin (`avgs`) towards the model's own parameters (float32 weights) or towards float32 copies of
them (bf16 weights: the float32 floor); the model's weights are never written. With a zero `ema_start` the averages
are created in `on_train_begin` (global_step 0), so every `on_step_end` from step 1 on is an update; the first 5 steps
are discarded as warm-up and medians over the other 35 are reported. A second run per model, with
`update_interval="10ba"`, times `on_step_end` on the steps that do not update: the constant cost of every step.

Part 2, step overhead on a Llama of 33M parameters (8000-token vocabulary, hidden 512, 6 layers; float32, AdamW,
batch 4 x 32 tokens of random ids). A timing callback, listed after the EMACallback, stamps each `on_step_end`; a
step is the time between two successive stamps, so it holds everything the Trainer does per optimizer step (data,
forward, backward, clipping, optimizer, scheduler, every callback, the EMA's `on_step_end` included), not only the
stretch from `on_step_begin` to `on_step_end`. Runs: no EMA, EMA at `update_interval` 1ba, 10ba and 100ba, in three
interleaved rounds of 10 timed steps after 3 warm-up steps (after one discarded run: the process's first Trainer run
is slower), then no EMA once more; the spread of the no-EMA runs is the noise. ms / step pools a configuration's
rounds: the median step without an update plus the median extra time of an update step once per interval, which
resists the other job's bursts better than a mean (the 100ba runs never reach their first update, at step 100, so
that row is the constant per-step cost). The bare update is the float32 `_foreach_lerp_` floor on the model's
tensors, timed right after each stamp in every run (and subtracted from that step's time), and hf-ema's update timed
as in Part 1 (the EMACallback's `on_step_end` on update steps of the 1ba runs). Within the 10ba runs, update steps
and steps without one alternate within seconds: the difference of their medians is also printed, as the update's
cost inside a step free of the drift between runs.

One torch thread by default: on a machine shared with another job, a kernel split across both cores stalls whenever
one of its threads is descheduled (a 40 ms `_foreach_lerp_` measured up to 1.4 s at 2 threads, never above 60 ms at 1).
`--threads 0` keeps torch's default (every core), for an idle machine. One thread slows the floor's memory-bound
kernels more than hf-ema's Python bookkeeping, so ratios to the floor read lower than with every core.

    python benchmarks/bench_callback.py            # both parts: about 3.5 minutes on 2 shared CPU cores
    python benchmarks/bench_callback.py --quick    # a smoke run with few steps: about 2 minutes
    python benchmarks/bench_callback.py --part 1   # only the per-update tables
    python benchmarks/bench_callback.py --write    # also appends the tables to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU-only: DeepSpeed, if installed, warns of its fallback

import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from report import publish  # noqa: E402

from hf_ema import EMAArguments, EMACallback  # noqa: E402

WEIGHTS = {"float32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"tiny-4000": 1.5, "medium-400": 1.3}
SEQ = 32  # Part 2's tokens per sequence (batch 4): a step of about 0.65 s on one shared core


class SumOfLinears(nn.Module):
    """`count` linear layers applied to the same small input and summed, computed as one linear layer with the summed
    weights (the same function): one stack per kind of tensor, so the step stays cheap and every tensor gets a
    gradient."""

    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(count))

    def forward(self, x, labels=None):
        weight = torch.stack([layer.weight for layer in self.layers]).sum(0)
        bias = torch.stack([layer.bias for layer in self.layers]).sum(0)
        logits = nn.functional.linear(x.to(weight.dtype), weight, bias).float()
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def build(name: str, dtype: torch.dtype) -> SumOfLinears:
    torch.manual_seed(0)
    model = SumOfLinears(2000, 8) if name == "tiny-4000" else SumOfLinears(200, 256)
    return model.to(dtype)


def trainer_args(out: str, steps: int, batch: int, optim: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no",
        optim=optim, learning_rate=1e-3, max_steps=steps, per_device_train_batch_size=batch, disable_tqdm=True,
        bf16=False, dataloader_num_workers=0,
    )  # fmt: skip


class Timed:
    """Replaces `callback.on_step_end` (on the instance) with a wrapper that times it as the Trainer calls it, and
    after it, when `floor` is set, one float32 `_foreach_lerp_` over copies of the trainable tensors made at train
    begin."""

    def __init__(self, callback: EMACallback, floor: bool) -> None:
        self.callback, self.floor = callback, floor
        self.samples: list[tuple[int, bool, float, float | None]] = []  # (global_step, updated, callback ms, floor ms)
        self.created_at: int | None = None  # global_step when the EMA store appeared
        self.avgs: list[torch.Tensor] = []
        self.lives: list[torch.Tensor] = []
        self.dtype: torch.dtype | None = None
        self.average_dtype: torch.dtype | None = None
        begin, end = callback.on_train_begin, callback.on_step_end

        def on_train_begin(args, state, control, model=None, **kwargs):
            result = begin(args, state, control, model=model, **kwargs)
            params = [p for p in model.parameters() if p.requires_grad]
            self.dtype = params[0].dtype  # as the Trainer left it: it must not have upcast a bf16 model
            if callback.store is not None:
                self.created_at = state.global_step
                self.average_dtype = next(iter(callback.store.shadow.values())).dtype
            with torch.no_grad():
                self.avgs = [p.detach().float().clone() for p in params]  # written by the floor: never the weights
                self.lives = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in params]
            return result

        def on_step_end(args, state, control, **kwargs):
            had_store, updates = callback.store is not None, callback.schedule.num_updates
            start = time.perf_counter()
            result = end(args, state, control, **kwargs)
            ms = (time.perf_counter() - start) * 1e3
            if not had_store and callback.store is not None:
                self.created_at = state.global_step
                self.average_dtype = next(iter(callback.store.shadow.values())).dtype
            updated = had_store and callback.schedule.num_updates > updates
            floor_ms = None
            if self.floor:
                start = time.perf_counter()
                with torch.no_grad():
                    torch._foreach_lerp_(self.avgs, self.lives, 0.1)
                floor_ms = (time.perf_counter() - start) * 1e3
            self.samples.append((state.global_step, updated, ms, floor_ms))
            return result

        callback.on_train_begin, callback.on_step_end = on_train_begin, on_step_end


def part1_run(name: str, weights: str, interval: str, steps: int, out: str) -> Timed:
    model = build(name, WEIGHTS[weights])
    width = model.layers[0].in_features
    generator = torch.Generator().manual_seed(0)
    batch = 4
    data = [
        {"x": x, "labels": y}
        for x, y in zip(
            torch.randn(steps * batch, width, generator=generator),
            torch.randint(0, width, (steps * batch,), generator=generator),
            strict=True,
        )
    ]  # one epoch covers every step: no epoch ends inside the timed steps
    callback = EMACallback(EMAArguments(half_life="10ba", update_interval=interval))
    timed = Timed(callback, floor=interval == "1ba")
    trainer = Trainer(
        model=model, args=trainer_args(out, steps, batch, "sgd"), train_dataset=data, callbacks=[callback]
    )
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
    trainer.train()
    if timed.dtype != WEIGHTS[weights]:
        raise RuntimeError(f"{name}: the Trainer trained {timed.dtype} weights, not {weights}.")
    return timed


def part1(steps: int, warmup: int, out: str) -> tuple[list[str], list[str], list[str]]:
    update = [
        "| model | weights | average | callback on_step_end ms | _foreach floor ms | x floor | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    constant = [
        '| model | weights | on_step_end ms, steps without an update (`update_interval="10ba"`) | steps | '
        "on_step_end ms, update steps (1ba run) |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for name in TARGETS:
        for weights in WEIGHTS:
            every = part1_run(name, weights, "1ba", steps, out)
            sparse = part1_run(name, weights, "10ba", steps, out)
            timed = [s for s in every.samples if s[0] > warmup and s[1]]
            quiet = [s[2] for s in sparse.samples if s[0] > warmup and not s[1]]
            ms = statistics.median(s[2] for s in timed)
            floor = statistics.median(s[3] for s in timed)
            ratio, target = ms / floor, TARGETS[name]
            average = str(every.average_dtype).removeprefix("torch.")
            update.append(
                f"| {name} | {weights} | {average} | {ms:.2f} | {floor:.2f} | {ratio:.2f}x | "
                f"<= {target}x: {'met' if ratio <= target else 'missed'} |"
            )
            constant.append(f"| {name} | {weights} | {statistics.median(quiet):.3f} | {len(quiet)} | {ms:.2f} |")
            first = min((s[0] for s in every.samples if s[1]), default=None)
            notes.append(
                f"{name} {weights}: averages created at global_step {every.created_at}, first update at step {first}, "
                f"{len(timed)} update steps timed"
            )
            print(f"part 1: {name} {weights} done ({ms:.2f} ms, floor {floor:.2f} ms)", flush=True)
    return update, constant, notes


class StepClock(TrainerCallback):
    """Stamps each `on_step_end` (listed after the EMACallback); after the stamp, times one float32 `_foreach_lerp_`
    over copies of the trainable tensors (the bare-update floor) and takes it out of that step's time."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []  # (global_step, ms since the previous stamp, floor excluded)
        self.floors: list[float] = []
        self.last: float | None = None
        self.extra = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            params = [p for p in model.parameters() if p.requires_grad]
            self.avgs = [p.detach().float().clone() for p in params]
            self.lives = [p.detach().float() for p in params]  # float32 weights: these are the parameters

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append((state.global_step, (now - self.last - self.extra) * 1e3))
        with torch.no_grad():
            torch._foreach_lerp_(self.avgs, self.lives, 0.1)
        self.extra = time.perf_counter() - now
        self.floors.append(self.extra * 1e3)
        self.last = now


def part2_run(interval: str | None, steps: int, warmup: int, out: str) -> dict:
    config = LlamaConfig(
        vocab_size=8000, hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, 8000, (4 * (warmup + steps), SEQ), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    clock, callbacks, timed = StepClock(), [], None
    if interval is not None:
        callback = EMACallback(EMAArguments(half_life="10ba", update_interval=interval))
        timed = Timed(callback, floor=False)
        callbacks.append(callback)
    trainer = Trainer(
        model=model, args=trainer_args(out, warmup + steps, 4, "adamw_torch"), train_dataset=data,
        callbacks=[*callbacks, clock],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    updated = {step for step, did, _, _ in timed.samples if did} if timed is not None else set()
    return {
        "interval": interval,
        "update_steps": [ms for step, ms in clock.steps if step > warmup and step in updated],
        "quiet_steps": [ms for step, ms in clock.steps if step > warmup and step not in updated],
        "floor": clock.floors[warmup:],
        "update_ms": [] if timed is None else [s[2] for s in timed.samples if s[0] > warmup and s[1]],
        "params": sum(p.numel() for p in model.parameters()),
    }


def per_step(runs: list[dict], every: int | None) -> float:
    """Milliseconds per step, robust to the other job's bursts: the median step without an update, plus one update
    step's median extra time every `every` steps (None: no EMA; every step of a 1ba run updates)."""
    quiet = [ms for r in runs for ms in r["quiet_steps"]]
    updates = [ms for r in runs for ms in r["update_steps"]]
    if not updates:
        return statistics.median(quiet)
    if not quiet:
        return statistics.median(updates)
    return statistics.median(quiet) + (statistics.median(updates) - statistics.median(quiet)) / every


def part2(steps: int, warmup: int, rounds: int, out: str) -> tuple[list[str], str]:
    configs = {None: None, "1ba": 1, "10ba": 10, "100ba": 100}
    runs: dict[str | None, list[dict]] = {c: [] for c in configs}
    part2_run(None, 2, 1, out)  # discarded: the first Trainer run of the process is slower (lazy imports, allocator)
    for _ in range(rounds):  # interleaved: load drift hits every configuration alike
        for interval in configs:
            runs[interval].append(part2_run(interval, steps, warmup, out))
            print(f"part 2: {interval or 'no EMA'} {per_step(runs[interval][-1:], configs[interval]):.0f} ms / step")
    last = part2_run(None, steps, warmup, out)
    print(f"part 2: no EMA (again) {per_step([last], None):.0f} ms / step", flush=True)
    base = per_step(runs[None], None)
    nones = [per_step([r], None) for r in runs[None] + [last]]
    floor = statistics.median(ms for rs in runs.values() for r in rs for ms in r["floor"])
    update = statistics.median(ms for r in runs["1ba"] for ms in r["update_ms"])
    rows = [
        "| EMA | update interval | ms / step | x no EMA | EMA ms per step (step - no-EMA step) | "
        "as a multiple of the bare update |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| none | | {base:.1f} | 1.000 | | |",
    ]
    for interval, every in list(configs.items())[1:]:
        ms = per_step(runs[interval], every)
        extra = ms - base
        count = sum(len(r["update_steps"]) for r in runs[interval])
        rows.append(
            f"| float32 average | {interval} ({count} update steps timed) | {ms:.1f} | {ms / base:.3f} | "
            f"{extra:+.1f} | {extra / floor:+.2f}x floor, {extra / update:+.2f}x hf-ema |"
        )
    rows.append(f"| none, run again last | | {nones[-1]:.1f} | {nones[-1] / base:.3f} | | |")
    rows.append(f"| bare update: `_foreach_lerp_` float32 floor | | {floor:.1f} | | | 1.00x floor |")
    rows.append(
        f"| bare update: hf-ema on_step_end (1ba, update steps) | | {update:.1f} | | | {update / floor:.2f}x floor |"
    )
    # Within the 10ba runs, steps with and without an update alternate within seconds: their difference is the
    # update's cost inside a step, free of the drift between runs.
    ten = runs["10ba"]
    paired = statistics.median(ms for r in ten for ms in r["update_steps"]) - statistics.median(
        ms for r in ten for ms in r["quiet_steps"]
    )
    spread = (max(nones) - min(nones)) / min(nones)
    note = (
        f"Llama {runs[None][0]['params'] / 1e6:.1f}M parameters, float32, AdamW, batch 4 x {SEQ} tokens. "
        f"{rounds} interleaved rounds of {steps} timed steps after {warmup} warm-up steps per configuration, then no "
        "EMA once more. ms / step: the median step without an update, plus the median extra time of an update step "
        "once per interval (the 100ba runs never reach their first update, at step 100: that row is the constant "
        f"per-step cost). No-EMA runs: {', '.join(f'{ms:.1f}' for ms in nones)} ms / step, spread "
        f"{100 * spread:.1f}%. Within the 10ba runs an update step took {paired:+.1f} ms more than the steps without "
        f"(medians), against {update:.1f} ms for hf-ema's on_step_end alone"
    )
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default, every core); see the docstring"
    )
    parser.add_argument("--write", action="store_true", help="append the tables to docs/benchmarks.md")
    cli = parser.parse_args()
    if cli.threads > 0:
        torch.set_num_threads(cli.threads)
    transformers.logging.set_verbosity_error()
    # The 100ba run ends before its first update, on purpose (it measures the per-step cost): hf-ema warns of that.
    logging.getLogger("hf_ema").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    steps1, warmup1 = (12, 3) if cli.quick else (40, 5)
    steps2, warmup2, rounds = (10, 2, 1) if cli.quick else (10, 3, 3)
    started = time.perf_counter()
    command = "python benchmarks/bench_callback.py" + (" --quick" if cli.quick else "")
    command += f" --part {cli.part}" if cli.part != "all" else ""
    command += f" --threads {cli.threads}" if cli.threads != 1 else ""
    text = (
        f"### EMACallback in a stock Trainer, cpu ({os.cpu_count()} cores, {platform.machine()}, "
        f"torch threads: {torch.get_num_threads()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {datetime.date.today()}\n\n"
        f"Command: `{command}`\n\n"
    )
    with tempfile.TemporaryDirectory() as out:
        if cli.part in ("1", "all"):
            update, constant, notes = part1(steps1, warmup1, out)
            text += (
                f"Per update, `EMACallback.on_step_end` as the Trainer calls it against one float32 `_foreach_lerp_` "
                f"timed right after it ({steps1} steps, the first {warmup1} discarded, medians):\n\n"
                + "\n".join(update)
                + "\n\nEvery step, with and without an update (medians):\n\n"
                + "\n".join(constant)
                + "\n\n"
                + "".join(f"- {n}\n" for n in notes)
                + "\n"
            )
        if cli.part in ("2", "all"):
            rows, note = part2(steps2, warmup2, rounds, out)
            text += "Step time (" + note + "):\n\n" + "\n".join(rows) + "\n"
    print(f"took {time.perf_counter() - started:.0f} s", flush=True)
    publish(text, cli.write)


if __name__ == "__main__":
    main()
