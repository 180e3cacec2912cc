#!/usr/bin/env bash
# The prepared GPU session for the models (issue #7): the model, convert and fold-cache tests on
# CUDA, then `python -m fused_mbconv` (parity with torchvision in fp32 and bf16, eval and one
# training step, and timings) for the variants at their native resolution, most important first,
# until the time budget is spent. Logs into $OUT: models_summary.txt, models_tests.log, models_main.log.
#   bash bench/gpu_models.sh            (OUT defaults to ./out; BUDGET_S, default 480)
set -uo pipefail
OUT=${OUT:-$PWD/out}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUMMARY="$OUT/models_summary.txt"
step() {  # step LOG SECONDS COMMAND...: run with a time limit unless the budget is spent, append to LOG
  local log=$1 limit=$2
  shift 2
  if ((SECONDS + limit > BUDGET_S)); then
    echo "skipped (budget): $*" | tee -a "$SUMMARY"
    return
  fi
  local start=$SECONDS
  echo "### $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "rc=$? in $((SECONDS - start)) s: $*" | tee -a "$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch, torchvision, timm, triton; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
} >"$SUMMARY" 2>&1

step "$OUT/models_tests.log" 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_efficientnet.py tests/test_convert.py tests/test_fold_cache.py
MAIN="$OUT/models_main.log"
for run in "b0 8" "b7 2" "b4 4" "b1 8" "b2 8" "b3 8" "b5 4" "b6 2"; do
  set -- $run
  for dtype in float32 bfloat16; do
    step "$MAIN" 60 $PY -m fused_mbconv --variant "$1" --batch "$2" --dtype "$dtype" --steps 5
  done
done
cat "$SUMMARY"
