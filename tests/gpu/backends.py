"""One GPU, each parallel backend through the Trainer (a lent machine, never CI): `bash tests/gpu/run_backends.sh`.

    python -m torch.distributed.run --standalone --nproc_per_node 1 tests/gpu/backends.py BACKEND OUT [RESUME_FROM]

BACKEND is ddp, fsdp1, fsdp2, zero2, zero3 (EMATrainer) or fsdp2-stock (a stock Trainer without EMA, FULL_STATE_DICT,
to tell apart failures of the Trainer's own resume). A ~58M-parameter Llama trains 16 steps (bf16 autocast or
DeepSpeed bf16), a checkpoint at 8 and 16, an evaluation at 8. Three tensors are recorded every step in float64 for the
reference EMA. Two callbacks around EMACallback time the EMA update inside each step (CUDA-synchronised), so the
overhead is a ratio measured in the same run. World size 1 still partitions under ZeRO-3 (ds_tensor).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from conftest import _full  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_ema import EMAArguments, EMATrainer  # noqa: E402

NAMES = ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.3.self_attn.q_proj.weight"]
STEPS, SMOOTHING = 16, 2 ** (-1 / 4)


def watched(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: _full(params[n]).to("cpu", torch.float64).clone() for n in NAMES}


class Recorder(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.setdefault(state.global_step, watched(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = watched(model)


class Clock(TrainerCallback):
    """Placed before (`mark="before"`) and after EMACallback: the gap is the EMA's share of the step."""

    def __init__(self, mark, times):
        self.mark, self.times = mark, times

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.setdefault(state.global_step, {})[self.mark] = time.perf_counter()


def main(backend: str, out: str, resume_from: str | None) -> None:
    small = os.environ.get("HF_EMA_SMOKE") == "1"  # a quick CPU run of this script's own logic
    config = LlamaConfig(
        vocab_size=32000, hidden_size=64 if small else 512, intermediate_size=1376, num_hidden_layers=4 if small else 8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokens = torch.randint(0, 32000, (STEPS * 8, 32 if small else 256), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    extra = {}
    if backend == "fsdp1":
        extra = dict(fsdp="full_shard", fsdp_config={"version": 1})
    elif backend.startswith("fsdp2"):
        state_dict = "FULL_STATE_DICT" if backend in ("fsdp2-stock", "fsdp2-full") else "SHARDED_STATE_DICT"
        extra = dict(fsdp="full_shard", fsdp_config={"version": 2, "state_dict_type": state_dict})
    elif backend.startswith("zero"):
        zero = {"stage": int(backend[-1])}
        extra = dict(
            deepspeed={
                "zero_optimization": zero,
                "bf16": {"enabled": "auto"},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
            }
        )
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=STEPS, bf16=not small, use_cpu=small,
        learning_rate=1e-3, lr_scheduler_type="constant", optim="adamw_torch", save_strategy="steps", save_steps=8,
        eval_strategy="steps", eval_steps=8, logging_steps=4, report_to="none", disable_tqdm=True, seed=0,
        data_seed=0, **extra,
    )  # fmt: skip
    recorder, times = Recorder(), {}
    common = dict(model=model, args=args, train_dataset=data, eval_dataset=data[:16])
    if backend == "fsdp2-stock":
        trainer = Trainer(callbacks=[recorder], **common)
    else:
        ema_args = EMAArguments(half_life="4ba")
        first = [] if backend == "fsdp1" else [recorder]  # FSDP1 flattens the names; hf-ema must refuse it first
        trainer = EMATrainer(callbacks=[*first, Clock("before", times)], ema_args=ema_args, **common)
        trainer.add_callback(Clock("after", times))  # appended after EMACallback
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except Exception as error:  # reported, not hidden: the run script prints it
        print(f"RESULT {backend} {'resume' if resume_from else 'run'} FAILED {type(error).__name__}: {error}"[:600])
        raise
    result = {"backend": backend, "steps": trainer.state.global_step, "resumed": bool(resume_from)}
    if backend != "fsdp2-stock":
        callback = trainer.ema_callback
        steps = sorted(times)
        # Step k's wall time runs from step k-1's "after" mark to step k's; the EMA's share is after - before.
        timed = [k for k in steps if k - 1 in times and k not in (1, 8, 9) and "after" in times[k - 1]]
        ema = sum(times[k]["after"] - times[k]["before"] for k in timed)
        whole = sum(times[k]["after"] - times[k - 1]["after"] for k in timed)
        result["ms_per_step"] = 1000 * whole / len(timed)
        result["ema_ms_per_step"] = 1000 * ema / len(timed)
        result["overhead"] = ema / (whole - ema)
        ema_now = watched(trainer.model)  # the model holds the EMA after train(), rounded to its dtype
        full = {
            n: t
            for (label, n), t in callback.store.full_state(trainer.model, False).items()
            if label == callback.primary_label
        }  # full precision (float32), gathered
        ema_full = {n: full[n].to("cpu", torch.float64) for n in NAMES}
        del full
        with callback.training_weights(trainer.model):
            training_now = watched(trainer.model)
        torch.save({"ema": ema_full, "training": training_now}, os.path.join(out, f"final-{bool(resume_from)}.pt"))
        start = min(recorder.weights)
        if start == 0:
            reference = {n: recorder.weights[0][n].clone() for n in NAMES}
            for k in range(1, STEPS + 1):
                for n in NAMES:
                    reference[n] = SMOOTHING * reference[n] + (1 - SMOOTHING) * recorder.weights[k][n]
            result["ema_vs_float64_max_abs"] = max((ema_full[n] - reference[n]).abs().max().item() for n in NAMES)
            result["ema_vs_float64_max_rel"] = max(
                ((ema_full[n] - reference[n]).abs().max() / reference[n].abs().max()).item() for n in NAMES
            )
            result["training_restored_exactly"] = all(
                torch.equal(training_now[n], recorder.weights[STEPS][n]) for n in NAMES
            )
        else:
            full = torch.load(os.path.join(out, "final-False.pt"))
            result["resume_bit_exact"] = all(
                torch.equal(full[k][n], now[n])
                for k, now in (("ema", ema_full), ("training", training_now))
                for n in NAMES
            )
        result["sharded"] = callback.averager.sharded
        result["local_elements"] = callback.store.numel()
        result["checkpoint_files"] = sorted(os.listdir(os.path.join(out, f"checkpoint-{STEPS}")))
        if backend == "fsdp2":  # the HF recipe for a loadable model after sharded training
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(os.path.join(out, f"final-{bool(resume_from)}"))
        if trainer.args.should_save:  # the saved model rounds the EMA to its own dtype: compare in that dtype
            from safetensors import safe_open

            with safe_open(os.path.join(out, f"final-{bool(resume_from)}", "model.safetensors"), "pt") as f:
                raw = {n: f.get_tensor(n) for n in NAMES if n in f.keys()}
            result["saved_dtype"] = str(next(iter(raw.values())).dtype) if raw else None
            result["save_model_equals_rounded_ema"] = bool(raw) and all(
                torch.equal(raw[n], ema_now[n].to(raw[n].dtype)) for n in raw
            )
    if trainer.args.should_save:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
