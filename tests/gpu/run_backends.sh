#!/usr/bin/env bash
# Each parallel backend on one GPU through the Trainer (a lent machine, never CI); from the repository root:
#   bash tests/gpu/run_backends.sh [OUTDIR]
# DeepSpeed is not on the GPU image: carry its wheels in .whl/ (see docs/distributed.md) and this installs them.
# Prints one RESULT line per run (JSON): EMA vs float64 reference, training weights restored, resume bit-exact,
# save_model holding the EMA, the EMA update's share of the step time. FSDP1 must be refused with a clear error.
set -uo pipefail
OUTDIR=${1:-${OUT:-/tmp/hf-ema-gpu}}
mkdir -p "$OUTDIR"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())" 2>&1 | tail -1 | tee "$OUTDIR/versions.txt"
run() {  # backend, [resume]: one process on the GPU
  local dir="$OUTDIR/$1"
  [ $# -eq 1 ] && rm -rf "$dir" && mkdir -p "$dir"
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node 1 tests/gpu/backends.py "$1" "$dir" ${2:+"$dir/$2"} \
    > "$dir/log-${2:-run}.txt" 2>&1
  echo "== $1 ${2:-run}: exit $?"
  grep -E "^RESULT|ValueError|Error:" "$dir/log-${2:-run}.txt" | grep -v Warning | head -4 | cut -c1-900
}
for backend in ${BACKENDS:-zero3 zero2 fsdp2 ddp}; do
  run "$backend"
  run "$backend" checkpoint-8
  rm -rf "$OUTDIR/$backend"/checkpoint-* "$OUTDIR/$backend"/final-*/
done
run fsdp1
if [ -z "${SKIP_STOCK:-}" ]; then
  run fsdp2-stock
  run fsdp2-stock checkpoint-8
  rm -rf "$OUTDIR/fsdp2-stock"/checkpoint-*
fi
