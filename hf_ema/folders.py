"""Saved model folders (what `save_pretrained` and the Trainer's checkpoints write): which files hold the weights,
which are training state, and the rest, which an export copies beside its new weights.

Shared by the exports that write a folder `from_pretrained` loads (`hf_ema.posthoc`, `hf_ema.average`); only the
standard library is needed.
"""

from __future__ import annotations

import json
import os
import re
import shutil

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's save_pretrained
# Files of a checkpoint that hold training state (or describe another model), not the model: an export never copies
# them (it writes its own README.md).
TRAINING_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", "README.md")
TRAINING_FILE_RE = re.compile(r"^(rng_state.*\.pth|ema_state.*|\..*)$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(folder: str) -> list[str]:
    """The safetensors files holding `folder`'s model weights: the shards its index names, or `model.safetensors`,
    or none."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    return [MODEL_FILE] if os.path.isfile(os.path.join(folder, MODEL_FILE)) else []


def saved_weight_files(folder: str) -> tuple[list[str], bool]:
    """`(files, adapter)`: `weight_files(folder)` with `adapter` False, else `[ADAPTER_FILE]` with `adapter` True
    where PEFT's `save_pretrained` wrote an adapter there, else `([], False)`."""
    files = weight_files(folder)
    if not files and os.path.isfile(os.path.join(folder, ADAPTER_FILE)):
        return [ADAPTER_FILE], True
    return files, False


def copied_files(folder: str) -> list[str]:
    """The files of `folder` an export copies: config, generation config, tokenizer, processor, adapter config, the
    shard index ...; not weights, training state, hidden files or the model card."""
    return sorted(
        name
        for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name))
        and not name.endswith(WEIGHT_SUFFIXES)
        and name not in TRAINING_FILES
        and not TRAINING_FILE_RE.match(name)
    )


def copy_model_files(folder: str, out: str) -> list[str]:
    """Copies `copied_files(folder)` into `out`; returns their names."""
    names = copied_files(folder)
    for name in names:
        shutil.copy2(os.path.join(folder, name), os.path.join(out, name))
    return names
