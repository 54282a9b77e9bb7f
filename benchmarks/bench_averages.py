"""Cost of each extra average: update time, memory, and evaluation time, with 1, 2 and 3 averages in one callback.

Update: `EMAStore.update_` as the callback calls it (one update of every average towards the live weights), on a
Llama of 33M parameters (float32 weights, and bf16 weights with float32 averages), interleaved repetitions,
medians, against one `torch._foreach_lerp_` over the same tensors (the one-average floor) measured in the same run,
and against the same three averages updated in three separate passes (what sharing the read of the weights saves).
Evaluation: `EMATrainer.evaluate()` on 64 sequences of 128 tokens, the other averages evaluated in the same call.

    python benchmarks/bench_averages.py            # about a minute on 2 CPU cores
    python benchmarks/bench_averages.py --write    # also appends the tables to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from report import publish  # noqa: E402

from hf_ema.core import UpdatePlan  # noqa: E402
from hf_ema.store import EMAStore  # noqa: E402

LABELS = ["a", "b", "c"]


def llama(hidden: int = 512, layers: int = 6, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def timed(function, *args) -> float:
    """Milliseconds one call takes."""
    start = time.perf_counter()
    function(*args)
    return (time.perf_counter() - start) * 1e3


def run_apart(plans) -> None:
    for plan in plans:
        plan.run([0.999])


def update_rows(repeats: int) -> list[str]:
    rows = []
    for name, dtype in (("float32", torch.float32), ("bf16 -> float32", torch.bfloat16)):
        model = llama(dtype=dtype)
        stores = {k: EMAStore(model, labels=LABELS[:k]) for k in (1, 2, 3)}
        params = [p for p in model.parameters() if p.requires_grad]
        # The same three averages updated one pass each (each pass reads the weights again): what sharing the read
        # of the weights saves.
        apart = [UpdatePlan([stores[3]._lists[label]], stores[3]._sources) for label in LABELS]
        floor_ema = [torch.empty_like(p, dtype=torch.float32).copy_(p) for p in params]
        floor_live = [p.detach().float() for p in params]  # the floor: same-dtype lerp, one average
        results = {k: [] for k in ("floor", 1, 2, 3, "apart")}
        for _ in range(repeats):  # interleaved: every variant once per round
            results["floor"].append(timed(torch._foreach_lerp_, floor_ema, floor_live, 0.001))
            for k, store in stores.items():
                results[k].append(timed(store.update_, model, dict.fromkeys(LABELS[:k], 0.999)))
            results["apart"].append(timed(run_apart, apart))
        med = {k: statistics.median(v) for k, v in results.items()}
        numel = sum(p.numel() for p in params)
        for k in (1, 2, 3):
            rows.append(
                f"| {name} | {k} | {med[k]:.1f} | {med[k] / med[1]:.2f}x | {med[k] / med['floor']:.2f}x | "
                f"{stores[k].nbytes() / 2**20:.0f} MiB |"
            )
        rows.append(
            f"| {name} | 3, one pass each (not what hf-ema runs) | {med['apart']:.1f} | {med['apart'] / med[1]:.2f}x | "
            f"{med['apart'] / med['floor']:.2f}x | |"
        )
        rows.append(f"| {name} | floor (`_foreach_lerp_`, 1 average, float32) | {med['floor']:.1f} | | 1.00x | |")
        print(f"{name}: {numel / 1e6:.1f}M parameters done", flush=True)
    return rows


def evaluate_rows(repeats: int) -> list[str]:
    from transformers import TrainingArguments

    from hf_ema import EMAArguments, EMATrainer

    tokens = torch.randint(0, 8000, (64, 128), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as out:
        trainers = {}
        for k in (1, 2, 3):
            args = TrainingArguments(
                output_dir=out, use_cpu=True, report_to="none", per_device_eval_batch_size=16, max_steps=1,
                disable_tqdm=True, logging_strategy="no", save_strategy="no",
            )  # fmt: skip
            trainer = EMATrainer(
                model=llama(layers=2), args=args, train_dataset=data[:8], eval_dataset=data,
                ema_args=EMAArguments(half_life=[f"{10 * (i + 1)}ba" for i in range(k)]),
            )  # fmt: skip
            trainer.train()  # one step: averaging has started
            trainers[k] = trainer
        for k in trainers:
            times[k] = []
        for _ in range(repeats):
            for k, trainer in trainers.items():
                times[k].append(timed(trainer.evaluate))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in (1, 2, 3):
        rows.append(f"| {k} | {med[k]:.0f} | {med[k] / med[1]:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="append the tables to docs/benchmarks.md")
    cli = parser.parse_args()
    torch.manual_seed(0)
    header = (
        f"### Several averages, cpu ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}, "
        f"{datetime.date.today()}\n\nCommand: `python benchmarks/bench_averages.py` ({cli.repeats} interleaved "
        "rounds, medians)\n\n"
    )
    update = ["| weights | averages | update (ms) | x one average | x floor | memory of the averages |"]
    update += ["| --- | --- | --- | --- | --- | --- |"] + update_rows(cli.repeats)
    evaluate = ["| averages | evaluate() (ms) | x one average |", "| --- | --- | --- |"]
    evaluate += evaluate_rows(max(3, cli.repeats // 3))
    text = header + "Update of every average (Llama, 33.4M parameters):\n\n" + "\n".join(update)
    text += "\n\nEvaluation, every average in one `evaluate()` (Llama 2 layers, 64 x 128 tokens):\n\n" + "\n".join(
        evaluate
    )
    publish(text + "\n", cli.write)


if __name__ == "__main__":
    main()
