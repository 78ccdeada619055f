#!/usr/bin/env bash
# The GPU checks of this project in one command, within a session's device time (about 15 min):
# bench_gpu.py's four parts at the paper's shapes (not yet run on a GPU: an estimated 5 minutes
# on one H100/H200, cut at 340 s; each part prints as it finishes), results
# printed and written to $OUT/gpu_results.json (or ./gpu_results.json); then
# bench_emulate.py: one emulate_world_size=8 step of COCO retrieval (8 x 32 at 384 px, bf16)
# against accum_steps=8 and one micro-batch (cut at 110 s), printed and written to
# $OUT/gpu_emulate.txt. Record them in benchmarks/RESULTS.md with the machine.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
set -euo pipefail
out="$(cd "${OUT:-.}" && pwd)/gpu_results.json"
python3 -c "import torch, transformers, timm" 2>/dev/null || pip install -q -r requirements.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cd benchmarks
PYTHONUNBUFFERED=1 timeout 340 python3 bench_gpu.py --out "$out" "$@" || echo "bench_gpu.py: exit $?"
PYTHONUNBUFFERED=1 timeout 110 python3 bench_emulate.py --device cuda --image_size 384 --batch 32 --amp bf16 \
    --repeats 3 | tee "$(dirname "$out")/gpu_emulate.txt"
