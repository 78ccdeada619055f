#!/usr/bin/env bash
# The GPU checks of this project in one command, within a session's device time (about 15 min):
# bench_gpu.py's four parts at the paper's shapes (not yet run on a GPU: an estimated 5 minutes
# on one H100/H200, cut at 460 s; each part prints as it finishes), results
# printed and written to $OUT/gpu_results.json (or ./gpu_results.json). Record them in
# benchmarks/RESULTS.md with the machine.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
set -euo pipefail
out="$(cd "${OUT:-.}" && pwd)/gpu_results.json"
python3 -c "import torch, transformers, timm" 2>/dev/null || pip install -q -r requirements.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cd benchmarks
PYTHONUNBUFFERED=1 timeout 460 python3 bench_gpu.py --out "$out" "$@"
