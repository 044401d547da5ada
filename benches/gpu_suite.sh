#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one call, for a session with a CUDA device (budget: 8 min).
# Writes JSON (and the device's description) into $OUT, default benches/results/gpu/.
#   PY=python3 bash benches/gpu_suite.sh        # PY: an interpreter with dbcore, torch, cupy
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benches/results/gpu}
WORK=${WORK:-/tmp/dbcore_gpu_suite}
mkdir -p "$OUT" "$WORK"
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep going, remember failures
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" | tee -a "$OUT/steps.jsonl"
    [ $rc -eq 0 ] || status=1
}
rm -f "$OUT/steps.jsonl"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  $PY -c "import torch, dbcore; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'dbcore', dbcore.__version__)"
  $PY -c "import cupy; print('cupy', cupy.__version__)" || true; } > "$OUT/device.txt" 2>&1

step gpu_tests 120 $PY -m pytest -q -m gpu tests --junitxml "$OUT/gpu_tests.xml"
step kernels_float32 90 $PY benches/bench_kernels.py --dtype float32 --out "$OUT/kernels_float32.json"
step kernels_bfloat16 90 $PY benches/bench_kernels.py --dtype bfloat16 --out "$OUT/kernels_bfloat16.json"
for cfg in vit_mnist vit_mnist_light; do
    step "memory_$cfg" 60 sh -c "$PY -m dbcore.cli bench memory configs/$cfg.toml --device cuda --json > $OUT/memory_$cfg.json"
done
# trainer speed: a block and the baseline on the embedded digits, seconds per step from metrics
step cache_digits 60 $PY -m dbcore.cli cache configs/vit_digits.toml --data digits:train --out "$WORK/digits.zarr" --overwrite
step train_block 60 $PY -m dbcore.cli train configs/vit_digits.toml --store "$WORK/digits.zarr" --out "$WORK/run_block" --block 0 --steps 300 --quiet
step train_e2e 60 $PY -m dbcore.cli train configs/vit_digits.toml --store "$WORK/digits.zarr" --out "$WORK/run_e2e" --e2e --steps 300 --quiet
$PY - "$WORK" "$OUT/train_speed.json" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {}
for run in ("run_block", "run_e2e"):
    path = work / run / "metrics.jsonl"
    if path.is_file():
        last = json.loads(path.read_text().splitlines()[-1])
        rows[run] = {"steps": last["step"], "elapsed_s": last["elapsed_s"], "s_per_step": last["elapsed_s"] / last["step"]}
out.write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows))
PY
exit $status
