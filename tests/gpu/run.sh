#!/usr/bin/env bash
# GPU checks, for a lent GPU machine (never CI): from the repository root, `bash tests/gpu/run.sh [OUTDIR]`.
# Uses the machine's own torch/transformers (no install): the package is put on PYTHONPATH.
set -uo pipefail
OUTDIR=${1:-${OUT:-/tmp/hf-ema-gpu}}
mkdir -p "$OUTDIR"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())" | tee "$OUTDIR/versions.txt"
nvidia-smi --query-gpu=name,clocks.max.memory,clocks.mem,memory.total --format=csv | tee -a "$OUTDIR/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUTDIR/gpu_tests.log"
# The CPU suite against this machine's transformers release (a second release checks the Trainer internals we use).
python3 -m pytest -q -p no:cacheprovider tests --ignore tests/gpu --ignore tests/test_demo.py 2>&1 | tail -15 | tee "$OUTDIR/cpu_suite.log"
python3 benchmarks/bench_update.py --device cuda --params 1e9 --repeats 20 2>&1 | tee "$OUTDIR/bench.md"
python3 benchmarks/bench_step.py 2>&1 | tee "$OUTDIR/bench_step.md"
