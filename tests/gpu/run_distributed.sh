#!/usr/bin/env bash
# Distributed checks on one GPU (a lent machine, never CI): FSDP2 through EMATrainer with FULL_STATE_DICT, then an
# exact resume, compared in Python afterwards. From the repository root: `bash tests/gpu/run_distributed.sh [OUTDIR]`.
# DeepSpeed and FSDP1 are refused by hf-ema at train begin (tests/test_distributed.py), so they are not run here.
set -uo pipefail
OUTDIR=${1:-${OUT:-/tmp/hf-ema-gpu}}
rm -rf "$OUTDIR/fsdp2"; mkdir -p "$OUTDIR/fsdp2"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m torch.distributed.run --standalone --nproc_per_node 1 tests/distributed/worker.py gpu_fsdp2 "$OUTDIR/fsdp2" 2>&1 | grep -E "GPU FSDP2|Error|train_runtime" | head -5
python3 -m torch.distributed.run --standalone --nproc_per_node 1 tests/distributed/worker.py gpu_fsdp2 "$OUTDIR/fsdp2" "$OUTDIR/fsdp2/checkpoint-8" > "$OUTDIR/resume.log" 2>&1
grep -v Warning "$OUTDIR/resume.log" | grep -E "Error|error|GPU FSDP2|train_runtime" | head -8
python3 - "$OUTDIR/fsdp2" <<'PY'
import sys, torch
sys.path.insert(0, "tests")
from conftest import reference_ema
d = sys.argv[1]
full = torch.load(f"{d}/fsdp2-trainer-full-rank0.pt", weights_only=False)
res = torch.load(f"{d}/fsdp2-trainer-resumed-rank0.pt", weights_only=False)
ref = reference_ema(full["weights"], 0, [(k, 2 ** (-1 / 4)) for k in range(1, full["steps"] + 1)])
err = max((full["ema"][n].cpu() - ref[n]).abs().max().item() for n in full["ema"])
same = all(torch.equal(res[k][n], full[k][n]) for k in ("ema", "training") for n in full[k])
print(f"GPU FSDP2 sharded={full['sharded']} steps={full['steps']} EMA vs float64 reference max abs err {err:.3e}; resume bit-exact: {same}")
PY
rm -rf "$OUTDIR/fsdp2"/checkpoint-*
