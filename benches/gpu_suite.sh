#!/usr/bin/env bash
# Every GPU test and GPU benchmark of issue 12 in one call (about 8 min on an H200), writing JSON
# (and the device's description) into $OUT, default benches/results/gpu/:
#   PY=python3 bash benches/gpu_suite.sh        # PY: an interpreter with dbcore, torch, cupy
# MNIST: $MNIST (default shared/datasets/mnist inside the checkout, where the device machine gets
# it: `mkdir -p shared/datasets && cp -r ../shared/datasets/mnist shared/datasets/`). Without it
# the trainer's speed is measured on random images of MNIST's shape and the bf16 quality check is
# skipped. PEAK_TFLOPS: the device's dense bf16 peak for model FLOPs utilisation (H200: 989).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benches/results/gpu}
WORK=${WORK:-/tmp/dbcore_gpu_suite}
MNIST=${MNIST:-shared/datasets/mnist}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
QUALITY_STEPS=${QUALITY_STEPS:-2000}
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
# checkpointed runs recompute each layer over 16 slices of the batch (as the CPU figures), here and
# for ViT-B/16 below
for cfg in vit_mnist vit_mnist_light; do
    step "memory_$cfg" 60 sh -c "$PY -m dbcore.cli bench memory configs/$cfg.toml --device cuda --checkpoint-chunks 16 --json > $OUT/memory_$cfg.json"
done
# ViT-B/16 shape (224 px, B = 4, bf16 autocast): every configuration's peak memory, block step vs
# end-to-end step / B, and the baseline's model FLOPs utilisation; the lighter conditioning first
for cfg in vit_b16_light vit_b16; do
    step "blocks_$cfg" 150 $PY benches/bench_blocks.py --config "configs/$cfg.toml" --device cuda \
        --rounds 10 --peak-tflops "$PEAK_TFLOPS" --checkpoint-chunks 16 --out "$OUT"
done

# the trainer's speed on configs/vit_mnist.toml: block 0 and the baseline, seconds per step
if [ -f "$MNIST/train.npz" ]; then
    train_npz="$MNIST/train.npz"
else
    train_npz="$WORK/random_mnist.npz"
    $PY -c "import numpy as np; g = np.random.default_rng(0); np.savez('$train_npz', images=g.integers(0, 256, (50000, 28, 28), dtype=np.uint8), labels=g.integers(0, 10, 50000))"
fi
step cache_mnist 60 $PY -m dbcore.cli cache configs/vit_mnist.toml --data "npz:$train_npz" --out "$WORK/mnist.zarr" --overwrite
step train_block 60 $PY -m dbcore.cli train configs/vit_mnist.toml --store "$WORK/mnist.zarr" --out "$WORK/run_block" --block 0 --steps 300 --quiet
step train_e2e 60 $PY -m dbcore.cli train configs/vit_mnist.toml --store "$WORK/mnist.zarr" --out "$WORK/run_e2e" --e2e --steps 300 --quiet
# the train process on the device (issue 31): device max allocated + host RssAnon, block vs e2e
step process_memory_vit_mnist 120 sh -c "$PY -m dbcore.cli bench memory configs/vit_mnist.toml --device cuda --timed-steps 0 --store $WORK/mnist.zarr --process-steps 30 --json > $OUT/process_memory_vit_mnist.json"
$PY - "$WORK" "$OUT/train_speed.json" "$train_npz" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {"config": "configs/vit_mnist.toml", "data": sys.argv[3]}
for run in ("run_block", "run_e2e"):
    path = work / run / "metrics.jsonl"
    if path.is_file():
        last = json.loads(path.read_text().splitlines()[-1])
        rows[run] = {"steps": last["step"], "elapsed_s": last["elapsed_s"], "s_per_step": last["elapsed_s"] / last["step"]}
out.write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows))
PY

# quality: MNIST valid accuracy of the blocks trained in bf16 (the CUDA default) and in fp32
if [ -f "$MNIST/valid.npz" ]; then
    for precision in bf16 fp32; do
        sed "s/^\[train\]$/[train]\nprecision = \"$precision\"/" configs/vit_mnist.toml > "$WORK/vit_mnist_$precision.toml"
        step "quality_$precision" 150 sh -c "$PY -m dbcore.cli train $WORK/vit_mnist_$precision.toml --store $WORK/mnist.zarr --out $WORK/quality_$precision --steps $QUALITY_STEPS --quiet && $PY -m dbcore.cli eval $WORK/quality_$precision --data npz:$MNIST/valid.npz --json > $OUT/quality_$precision.json"
    done
else
    echo "{\"step\": \"quality\", \"skipped\": \"no $MNIST/valid.npz\"}" | tee -a "$OUT/steps.jsonl"
fi
exit $status
