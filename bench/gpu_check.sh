#!/usr/bin/env bash
# The one GPU session script (issues 12 and 16): correctness on the card, the model step against transformers,
# then the trainer itself end to end. Sized for one device call of at most ~9.5 minutes; every section writes
# its output under OUT_DIR as it goes, so a section cut short still leaves the ones before it.
#
# On the GPU machine (torch >= 2.10, transformers 5.x, Python 3.12, no network), from the repo root:
#   bash bench/gpu_wheels.sh                 # HERE, once: wheels of composer, streaming, ... into .whl/
#   bash bench/gpu_check.sh "$OUT"           # THERE, with .whl carried along
# The same path on CPU with tiny shapes (checks the script runs start to finish; minutes on 2 cores):
#   GPU_CHECK_CPU=1 bash bench/gpu_check.sh /tmp/gpu_check_cpu
#
# Writes: gpu.txt, gpu_tests.log, gpu_train_check.log, bench_base.txt, trainer_bench.txt (+ trainer/results.json).
set -uo pipefail
out=${1:-${OUT:-bench/out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
cpu=${GPU_CHECK_CPU:-0}
python=${PYTHON:-python3}

# The GPU machine lacks composer, streaming, omegaconf, torch-optimi and their small dependencies: install the
# carried wheels beside the image's torch/transformers, without letting pip touch those.
if [ -d .whl ] && ! $python -c "import composer, streaming, omegaconf, optimi" 2>/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi (CPU run)"
  $python -c "import torch, transformers, composer, streaming; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'composer', composer.__version__, 'streaming', streaming.__version__)"
  date -u
} 2>&1 | tee "$out/gpu.txt"

scale=1
if [ "$cpu" = 1 ]; then
  scale=5  # 2 shared cores instead of a GPU and 16 cores
  step_args=(--device cpu --preset tiny --seq-lens 256 --tokens 4096 --steps 2)
  trainer_args=(--tiny-cpu --steps 8 --fsdp-steps 4 --workers 2)
else
  step_args=(--device cuda --preset base --seq-lens 1024,8192 --tokens 65536 --compile on)
  trainer_args=(--steps 200 --fsdp-steps 80 --corpus-mb 20)
fi

# 1. Parity of every backend on the card (bf16 and fp32 vs transformers), packing invariance, gradients.
timeout $((80 * scale)) $python -m pytest -q -p no:cacheprovider tests/model 2>&1 | tee "$out/gpu_tests.log"
# 2. Whole training steps under set_sync_debug_mode("error"); FSDP2 + StableAdamW vs unsharded, 20 steps.
timeout $((90 * scale)) $python bench/gpu_train_check.py --steps 20 2>&1 | tee "$out/gpu_train_check.log"
# 3. The model step: ModernBERT-base at 1,024 and 8,192, fixed and variable lengths, every backend, vs transformers.
timeout $((180 * scale)) $python bench/step_bench.py "${step_args[@]}" 2>&1 | tee "$out/bench_base.txt"
# 4. The trainer: real shards prepared here, `modernbert-train train` on the base phase-1 recipe (bf16,
#    StableAdamW, loader, metrics, a checkpoint save), plain and under FSDP2; tokens/s and MFU from metrics.jsonl.
timeout $((230 * scale)) $python bench/trainer_bench.py --out "$out/trainer" --step-bench "$out/bench_base.txt" \
  "${trainer_args[@]}" 2>&1 | tee "$out/trainer_bench.txt"
