#!/usr/bin/env bash
# The prepared GPU session (device tool), in two phases of one `run` each (a command may run
# 10 minutes; the session has 15 in all, machine starts included):
#   bash bench/gpu_check.sh check   build, a one-layer training smoke test per backend, the GPU
#                                   tests, a compute-sanitizer pass, the main job   (~9 min at most)
#   bash bench/gpu_check.sh bench   build (a no-op on a warm machine), the kernel benchmarks, the
#                                   "auto" table, B5 end to end              (~10 min at most)
# Logs and results go to $OUT (at most 8 files come back). Every step has its own time limit and
# a failing step does not stop the later ones.
set -uo pipefail
PHASE=${1:-check}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log into $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

{
  echo "phase: $PHASE"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/summary.txt" 2>&1

step build 120 env TORCH_CUDA_ARCH_LIST=9.0 $PY -m pip install --no-build-isolation --no-deps -e .
case $PHASE in
check)
  # first: does one training step of one block's layers finish, per backend, and how long does
  # the first call (compile + autotune) take
  step smoke 60 $PY bench/gpu_smoke.py
  step tests 270 env FUSED_MBCONV_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider -x --maxfail=20 tests
  # depthwise: the vectorised channels_last paths and strided layouts; squeeze-excite (CUDA
  # backend): every weight form and layout, a broadcast upstream gradient, C = 72 (16-byte vectors)
  step sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    $PY -m pytest -q -p no:cacheprovider tests/test_dwconv_bn_silu.py tests/test_squeeze_excite.py -k \
    "test_channels_last_vector_width or (test_parity and float32 and strided) or (cuda and (test_weight_forms or test_broadcast_upstream_gradient or (test_odd_sizes and 72)))"
  step main 45 $PY -m fused_mbconv --device cuda
  ;;
bench)
  step bench_dwconv 150 $PY bench/bench_dwconv.py --quick --out "$OUT/dwconv.csv"
  step bench_se_project 120 $PY bench/bench_se_project.py --quick --out "$OUT/se_project.csv"
  # the "auto" table: commit $OUT/auto_table.json as fused_mbconv/ops/auto_table.json
  step auto_table 120 $PY bench/bench_auto_table.py --time-budget 100 --out "$OUT/auto_table.json"
  # the report and its plots stay behind (8 files come back): `python -m bench --report-only model.csv`
  step bench_model 90 $PY -m bench --variants b5 --providers eager,fused --out "$OUT/model.csv" --report /tmp/model.md
  ;;
*)
  echo "unknown phase $PHASE: expected check or bench" | tee -a "$OUT/summary.txt"
  ;;
esac
cat "$OUT/summary.txt"
