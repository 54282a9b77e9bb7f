"""An EMA in a hand-written Accelerate loop: `hf_ema.EMA`, resumed exactly through `save_state` / `load_state`.

A tiny Llama (built from a config, nothing downloaded) learns the bytes of a Python standard-library file. Every
`--save-every` steps the loop writes `accelerator.save_state` into `<out>/state-<step>` (model, optimizer, data position and, registered with
`accelerator.register_for_checkpointing`, the EMA); `--resume` continues from the newest one, and ends with the same
EMA, bit for bit, as a run that was never interrupted. At the end the EMA weights go to `<out>/ema` (a folder
`LlamaForCausalLM.from_pretrained` loads) and both sets of weights are evaluated.

    python examples/accelerate_ema.py --steps 200                     # 11 s on 2 CPU cores
    python examples/accelerate_ema.py --steps 200 --stop-at 100       # "crash" after the save at step 100 ...
    python examples/accelerate_ema.py --steps 200 --resume            # ... and continue from it
    accelerate launch --num_processes 2 examples/accelerate_ema.py    # the same loop under DDP
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ema import EMA, EMAArguments

SEQ, BATCH = 64, 8


def byte_batches(steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of byte sequences from the standard library's `os.py` (every Python has it)."""
    with open(os.__file__, "rb") as handle:
        data = torch.tensor(list(handle.read()), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - SEQ - 1, (steps, BATCH), generator=generator)
    return [torch.stack([data[s : s + SEQ] for s in row.tolist()]) for row in starts]


@torch.no_grad()
def eval_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the whole run")
    parser.add_argument("--half-life", default="20ba", help="the EMA's half-life (a time string)")
    parser.add_argument("--save-every", type=int, default=None, help="save_state interval (default: steps / 2)")
    parser.add_argument("--stop-at", type=int, default=None, help="exit right after the save at this step")
    parser.add_argument("--resume", action="store_true", help="continue from the last save_state in --out")
    parser.add_argument("--out", default="outputs/accelerate_ema", help="output folder")
    args = parser.parse_args()
    save_every = args.save_every or max(args.steps // 2, 1)

    set_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(model, EMAArguments(half_life=args.half_life), max_steps=args.steps)
    accelerator.register_for_checkpointing(ema)  # save_state / load_state carry the averages and counters

    if args.resume:
        saved = [int(name.split("-")[1]) for name in os.listdir(args.out) if name.startswith("state-")]
        accelerator.load_state(os.path.join(args.out, f"state-{max(saved)}"))  # ema.steps comes back with it
        accelerator.print(f"resumed from step {ema.steps}")
    train = byte_batches(args.steps, seed=accelerator.process_index)
    for step in range(ema.steps + 1, args.steps + 1):
        batch = train[step - 1].to(accelerator.device)
        accelerator.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
        if step % save_every == 0:
            accelerator.save_state(os.path.join(args.out, f"state-{step}"))
            if step == args.stop_at:
                accelerator.print(f"stopped after saving step {step}")
                return

    held_out = [b.to(accelerator.device) for b in byte_batches(4, seed=1000)]
    training_loss = eval_loss(model, held_out)
    with ema.average_weights():
        ema_loss = eval_loss(model, held_out)
    ema.save_pretrained(os.path.join(args.out, "ema"))
    accelerator.print(
        f"step {ema.steps}: eval loss {ema_loss:.4f} (EMA {args.half_life}, {ema.num_updates} updates) vs "
        f"{training_loss:.4f} (training weights); EMA weights in {os.path.join(args.out, 'ema')}"
    )


if __name__ == "__main__":
    main()
