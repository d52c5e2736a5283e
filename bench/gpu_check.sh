#!/usr/bin/env bash
# The one GPU session script: correctness on the card, then the step benchmark tables.
# Needs only torch (>= 2.10 for torch_varlen), transformers, pytest; run from the repo root:
#   bash bench/gpu_check.sh [OUT_DIR]
# Writes gpu_tests.log, gpu_train_check.log, bench_base.txt, bench_large.txt into OUT_DIR (default bench/out).
set -uo pipefail
out=${1:-${OUT:-bench/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# Parity of every backend on the card, packing invariance, gradients, host-sync check.
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/model 2>&1 | tee "$out/gpu_tests.log"
# Whole training steps under set_sync_debug_mode("error"); FSDP2 + StableAdamW vs unsharded, 20 steps.
# Needs the project's environment besides torch: torch-optimi >= 0.3 and composer (pip install -e .).
timeout 300 python3 bench/gpu_train_check.py --steps 20 2>&1 | tee "$out/gpu_train_check.log"
# ModernBERT-base, 1,024 and 8,192, fixed and variable lengths, every backend, compile off and on, vs transformers.
timeout 330 python3 bench/step_bench.py --device cuda --preset base --seq-lens 1024,8192 --tokens 65536 \
  --compile both 2>&1 | tee "$out/bench_base.txt"
timeout 120 python3 bench/step_bench.py --device cuda --preset large --seq-lens 1024 --tokens 65536 \
  --compile on --only ours-torch_varlen-compiled,ours-flex-compiled,hf-sdpa-sparse 2>&1 | tee "$out/bench_large.txt"
