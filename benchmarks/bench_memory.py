"""Peak host memory of EMA on CPU for a ~100M-parameter Llama: training with and without EMA, the swap, the save.

Each measurement resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, Linux) and reads `VmHWM` after the
phase, so a number is the phase's peak minus the resident memory before it. Training runs are separate processes, so
one run's freed memory cannot hide the next one's. The expected extra memory is printed beside each measurement:

- EMA during training: one copy of the trainable parameters in the average's dtype;
- BEMA during training (`bema=True`): two copies, the average and its start weights theta_0;
- swap with matching dtypes: the largest single tensor (contents are exchanged tensor by tensor);
- swap of a bf16 model with float32 averages: one bf16 copy of the parameters (the stash);
- save_model under EMA: what save_model itself needs (the swap is done in place);
- BEMA's readout in + out: one copy of the parameters (the stash: a BEMA average is never exchanged) and a temporary
  of the largest tensor.

    python benchmarks/bench_memory.py --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from report import publish  # noqa: E402

MiB = 2**20


def hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def build_model(dtype_name: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, dtype_name))


def measure(phase_fn) -> int:
    before = status("VmRSS")
    hwm_reset()
    phase_fn()
    return status("VmHWM") - before


def phase_train(kind: str, steps: int) -> dict:
    """A short training run with `kind` "none" (no EMA), "ema" (one half-life average), "bema" (`bema=True` alone, the
    primary: train() ends with its readout placed, the training weights stashed) or "ema+bema" (a half-life primary and
    BEMA: the training phase's cost of BEMA alone, nothing stashed at the end)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_ema import EMAArguments, EMACallback

    model = build_model("float32")
    tokens = torch.randint(0, 32000, (steps * 2, 64), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out, use_cpu=True, report_to="none", per_device_train_batch_size=2, max_steps=steps, optim="sgd",
            save_strategy="no", logging_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        settings = {
            "ema": EMAArguments(half_life="100ba"),
            "bema": EMAArguments(bema=True),
            "ema+bema": EMAArguments(half_life="100ba", bema=True),
        }.get(kind)
        callbacks = [EMACallback(settings)] if settings is not None else []
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        extra = measure(trainer.train)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    copies = {"none": 0, "ema": 1, "bema": 2, "ema+bema": 3}[kind]  # float32 model: 4 bytes per parameter and copy
    return {"extra": extra, "expected": 4 * params * copies, "params": params}


def phase_bema_store() -> dict:
    """Building a BEMA store (the average and theta_0) of the float32 model, and placing its readout in and out."""
    from hf_ema.store import EMAStore

    model = build_model("float32")
    params = [p for p in model.parameters() if p.requires_grad]
    holder = {}
    build = measure(
        lambda: holder.setdefault("store", EMAStore(model, labels=["bema"], corrected={"bema": lambda: 0.5}))
    )
    store = holder["store"]

    def swap():
        store.place_(model, "bema")
        store.place_(model, None)

    swap_extra = measure(swap)
    total = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    return {"store": build, "store_expected": store.nbytes(), "swap": swap_extra, "swap_expected": total + largest}


def phase_swap_save(dtype_name: str) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_ema import EMAArguments, EMACallback
    from hf_ema.store import EMAStore

    model = build_model(dtype_name)
    params = [p for p in model.parameters() if p.requires_grad]
    store_holder = {}
    labels = EMAArguments().labels  # the callback's below, whose primary the save places
    build = measure(lambda: store_holder.setdefault("store", EMAStore(model, labels=labels)))
    store = store_holder["store"]

    def swap():
        store.place_(model, store.primary)
        store.place_(model, None)

    swap_extra = measure(swap)
    largest = max(p.numel() * p.element_size() for p in params)
    stash = sum(p.numel() * p.element_size() for p in params) if dtype_name != "float32" else largest
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
        callback = EMACallback(EMAArguments())
        trainer = Trainer(model=model, args=args, callbacks=[callback])
        callback.averager.model, callback.averager.store = model, store
        callback.schedule.start(None, 0)

        def save_ema():
            with callback.ema_weights(model):
                trainer.save_model(os.path.join(out, "ema"))

        save_plain = measure(lambda: trainer.save_model(os.path.join(out, "plain")))
        save_extra = measure(save_ema)
    return {
        "store": build,
        "store_expected": store.nbytes(),
        "swap": swap_extra,
        "swap_expected": stash,
        "save_plain": save_plain,
        "save_ema": save_extra,
        "params": sum(p.numel() for p in params),
        "dtype": str(torch.empty(0, dtype=getattr(torch, dtype_name)).dtype).removeprefix("torch."),
    }


def run_phase(*argv: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()
    if args.phase:
        kind, value = args.phase
        if kind == "train":
            result = phase_train(value, args.steps)
        elif kind == "bema":
            result = phase_bema_store()
        else:
            result = phase_swap_save(value)
        print(json.dumps(result))
        return
    plain = run_phase("train", "none")
    with_ema = run_phase("train", "ema")
    fp32 = run_phase("swap", "float32")
    bf16 = run_phase("swap", "bfloat16")
    with_bema = run_phase("train", "bema")
    with_both = run_phase("train", "ema+bema")
    bema = run_phase("bema", "float32")
    m = lambda b: f"{b / MiB:.0f}"  # noqa: E731
    rows = [
        ("training, no EMA (peak over resident model)", plain["extra"], None),
        ("training with EMA (float32 model)", with_ema["extra"], None),
        ("  difference: the EMA's cost in training", with_ema["extra"] - plain["extra"], with_ema["expected"]),
        ("building the average, float32 model", fp32["store"], fp32["store_expected"]),
        ("swap in + out, float32 model (exchange)", fp32["swap"], fp32["swap_expected"]),
        ("save_model, training weights, float32", fp32["save_plain"], None),
        ("save_model under EMA, float32", fp32["save_ema"], None),
        ("building the average, bf16 model (float32 average)", bf16["store"], bf16["store_expected"]),
        ("swap in + out, bf16 model, float32 average (stash)", bf16["swap"], bf16["swap_expected"]),
        ("save_model, training weights, bf16", bf16["save_plain"], None),
        ("save_model under EMA, bf16", bf16["save_ema"], None),
        ("training with BEMA alone (the primary: its readout placed at the end)", with_bema["extra"], None),
        ("  difference to no EMA: average + theta_0, and the stash at the end", with_bema["extra"] - plain["extra"],
         with_bema["expected"]),
        ("training with a half-life primary and BEMA", with_both["extra"], None),
        ("  difference to the half-life alone: BEMA's cost in training (average + theta_0)",
         with_both["extra"] - with_ema["extra"], with_both["expected"] - with_ema["expected"]),
        ("building a BEMA average (average + theta_0), float32 model", bema["store"], bema["store_expected"]),
        ("BEMA readout in + out, float32 model (stash + largest tensor)", bema["swap"], bema["swap_expected"]),
    ]  # fmt: skip
    header = (
        f"### Peak host memory, Llama {plain['params'] / 1e6:.0f}M parameters on CPU, {datetime.date.today().isoformat()}"
        f"\n\nCommand: `python benchmarks/bench_memory.py` ({args.steps} SGD steps, batch 2 x 64 tokens)\n\n"
        "| phase | extra peak MiB | expected MiB |\n| --- | --- | --- |\n"
    )
    table = "".join(
        f"| {name} | {m(value)} | {m(expected) if expected is not None else ''} |\n" for name, value, expected in rows
    )
    publish(header + table, args.write)


if __name__ == "__main__":
    main()
