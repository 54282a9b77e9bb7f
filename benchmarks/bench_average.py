"""Peak memory of `python -m hf_ema.average` against two ways of averaging that hold more at once.

Three checkpoints of a 104 MiB float32 GPT-2 (8 layers of 512, vocabulary 2048; the largest tensors 4 MiB), saved
in shards of 20 MB (`tests/helpers.gpt2_checkpoints`). Each approach runs in a fresh process that first imports
torch, transformers, safetensors and hf_ema; the figure is its peak resident memory (`VmHWM`) over that of a fresh
process that only imports them:

- streaming: `hf_ema.average.main([... "--last", "3"])`, what the CLI runs;
- whole shard at a time: each shard of the three checkpoints loaded (`safetensors.torch.load_file`), averaged in
  float64, saved (`save_file`);
- load everything: every checkpoint loaded whole, averaged in float64, saved shard by shard.

    python benchmarks/bench_average.py            # about a minute on 2 CPU cores
    python benchmarks/bench_average.py --write    # also appends the table to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from helpers import gpt2_checkpoints, peak_memory  # noqa: E402
from report import publish  # noqa: E402

MiB = 2**20

_BY_SHARD = """
import json, os, torch
from safetensors.torch import load_file, save_file
folders, out = sys.argv[1:-1], sys.argv[-1]
os.makedirs(out)
files = sorted(set(json.load(open(os.path.join(folders[-1], 'model.safetensors.index.json')))['weight_map'].values()))
for name in files:
    states = [load_file(os.path.join(f, name)) for f in folders]
    mean = {k: (sum(s[k].double() for s in states) / len(states)).to(states[-1][k].dtype) for k in states[-1]}
    save_file(mean, os.path.join(out, name), metadata={'format': 'pt'})
    del states, mean
"""

_EVERYTHING = """
import json, os, torch
from safetensors.torch import load_file, save_file
folders, out = sys.argv[1:-1], sys.argv[-1]
os.makedirs(out)
weight_map = json.load(open(os.path.join(folders[-1], 'model.safetensors.index.json')))['weight_map']
files = sorted(set(weight_map.values()))
states = [{k: v for name in files for k, v in load_file(os.path.join(f, name)).items()} for f in folders]
mean = {k: (sum(s[k].double() for s in states) / len(states)).to(states[-1][k].dtype) for k in states[-1]}
for name in files:
    save_file({k: mean[k] for k in weight_map if weight_map[k] == name}, os.path.join(out, name),
              metadata={'format': 'pt'})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    cli = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-average-")
    try:
        folders = gpt2_checkpoints(folder)
        size = sum(
            os.path.getsize(os.path.join(folders[-1], n))
            for n in os.listdir(folders[-1])
            if n.endswith(".safetensors")
        )
        shard = max(
            os.path.getsize(os.path.join(folders[-1], n))
            for n in os.listdir(folders[-1])
            if n.endswith(".safetensors")
        )
        baseline = peak_memory("pass")
        rows = [
            (
                "streaming: `python -m hf_ema.average OUTPUT_DIR --last 3`",
                peak_memory(
                    "from hf_ema.average import main; assert main(sys.argv[1:]) == 0",
                    folder, "--last", "3", "--out", os.path.join(folder, "streaming"), "--no-progress",
                ),  # fmt: skip
            ),
            ("whole shard at a time (load_file, float64 mean, save_file)",
             peak_memory(_BY_SHARD, *folders, os.path.join(folder, "by-shard"))),
            ("load everything (three whole checkpoints, float64 mean)",
             peak_memory(_EVERYTHING, *folders, os.path.join(folder, "everything"))),
        ]  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    import safetensors
    import torch
    import transformers

    lines = [
        f"### Averaging 3 checkpoints of a {size / MiB:.0f} MiB GPT-2, cpu ({os.cpu_count()} cores, "
        f"{platform.machine()}), torch {torch.__version__}, transformers {transformers.__version__}, safetensors "
        f"{safetensors.__version__}, {datetime.date.today()}",
        "",
        f"Command: `python benchmarks/bench_average.py` (float32, 6 shards of at most {shard / MiB:.1f} MiB, largest "
        "tensor 4 MiB; each row a fresh process)",
        "",
        f"Importing torch, transformers, safetensors and hf_ema: {baseline / MiB:.0f} MiB peak resident memory.",
        "",
        "| approach | peak MiB above importing | x one checkpoint |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {(peak - baseline) / MiB:.1f} | {(peak - baseline) / size:.2f} |" for name, peak in rows]
    publish("\n".join(lines) + "\n", cli.write)


if __name__ == "__main__":
    main()
