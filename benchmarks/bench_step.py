"""Training-step overhead of EMA on a GPU for a ~1B-parameter Llama: average on the GPU vs in host memory.

A hand-written bf16 training loop (AdamW, batch 4 x 512 tokens) runs the same steps three ways: without EMA, with the
float32 average on the GPU, and with it in pinned host memory (`ema_device="cpu"`: copies on a side stream, the
arithmetic on a background thread). It reports milliseconds per step, the overhead against no EMA measured in the
same run, and peak GPU memory. A first pass updates both averages from the same steps and checks they agree.

    python benchmarks/bench_step.py            # needs CUDA
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from hf_ema.store import EMAStore  # noqa: E402


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model


def step(model, optimizer, batch, stores, update: bool = True):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    for store in stores:
        store.fence()  # as EMACallback.on_pre_optimizer_step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if update:
        for store in stores:
            store.update_(model, 0.999)


def run(mode: str, layers: int, steps: int, batch, every: int = 1) -> dict:
    model = build(layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stores = [] if mode == "none" else [EMAStore(model, device="cpu" if mode == "cpu" else None)]
    for _ in range(3):
        step(model, optimizer, batch, stores)
    for store in stores:
        store.wait()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(model, optimizer, batch, stores, update=(i + 1) % every == 0)
    for store in stores:
        store.wait()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    result = {
        "mode": mode,
        "every": every,
        "ms": 1000 * elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params": sum(p.numel() for p in model.parameters()),
    }
    for store in stores:
        store.close()
    del model, optimizer, stores
    torch.cuda.empty_cache()
    return result


def check_agreement(layers: int, batch) -> float:
    model = build(layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    on_gpu, on_host = EMAStore(model), EMAStore(model, device="cpu")
    assert all(t.is_pinned() for t in on_host.shadow.values())
    for _ in range(5):
        step(model, optimizer, batch, [on_gpu, on_host])
    gpu, host = on_gpu.ema_tensors(model), on_host.ema_tensors(model)
    worst = max(((gpu[n].cpu() - host[n]).abs().max() / gpu[n].abs().max().clamp_min(1e-12)).item() for n in gpu)
    on_host.close()
    del model, optimizer
    torch.cuda.empty_cache()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    batch = torch.randint(0, 32000, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    worst = check_agreement(args.layers, batch)
    print(f"host vs GPU average after 5 steps: largest relative difference {worst:.2e}")
    assert worst < 1e-5, worst
    # "none" runs first and last: the spread between the two is the run-to-run noise of the step time.
    plan = [("none", 1), ("gpu", 1), ("gpu", 10), ("cpu", 1), ("cpu", 10), ("cpu", 100), ("none", 1)]
    results = [run(mode, args.layers, args.steps, batch, every) for mode, every in plan]
    base = min(r["ms"] for r in results if r["mode"] == "none")
    print(
        f"\n### Step time, {torch.cuda.get_device_name()}, Llama {results[0]['params'] / 1e9:.2f}B bf16, AdamW, "
        f"batch 4 x 512, torch {torch.__version__}\n\nCommand: `python benchmarks/bench_step.py` "
        f"({args.steps} timed steps per row; x no EMA is against the faster of the two no-EMA rows)\n\n"
        "| EMA | update interval | ms / step | x no EMA | peak GPU GiB |\n| --- | --- | --- | --- | --- |"
    )
    names = {"none": "none", "gpu": "float32 average on the GPU", "cpu": "float32 average in host memory"}
    for r in results:
        print(f"| {names[r['mode']]} | {r['every']}ba | {r['ms']:.1f} | {r['ms'] / base:.3f} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
