#!/usr/bin/env bash
# Every GPU check still open (README "GPU checks still open"), in one call on an H100/H200 machine,
# cheapest first, each bounded so one slow step cannot eat the rest. Results (rows, plots, logs)
# go to bench/results/ and are copied to $OUT.
#
# Here (with network), once:   bash ../shared/device/stage-dali.sh av omegaconf antlr4-python3-runtime \
#                                   tqdm nvidia-ml-py scikit-learn joblib threadpoolctl
# Then back-to-back `run` calls each carrying one .dali/pNN, the last one running:
#   bash .dali/p00/install-dali.sh && export PYTHONPATH=/tmp/site:$PYTHONPATH && bash bench/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
log() { echo "=== $* ($(date +%T))"; }
step() {  # step SECONDS NAME COMMAND...
  local t=$1 name=$2; shift 2
  log "$name"
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40
  echo "--- $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.backends.cudnn.version())"
# the kernel tests compiled (fp32, fp16, bf16) and the torchvision weights test
step 150 tests_gpu python -m pytest -q -x tests/test_kernel_contrastive.py tests/test_models.py
# the loss kernel against eager and compiled PyTorch: the grid
step 150 bench_loss python bench/bench_loss.py
# model-only throughput and MFU: the target configuration first
step 120 bench_model python bench/bench_model.py --models r2plus1d_18 audio --batch-sizes 32 64 \
     --compile off --precision bf16 fp32
# loaders alone, then end to end vs model-only with NVML counters
step 120 bench_data python bench/bench_data.py --device gpu --loader dali pyav --batch-size 64 --workers 16
step 150 bench_train python bench/bench_train.py --loader dali pyav
python bench/plot.py
cp -r bench/results "$OUT/results"
log done
