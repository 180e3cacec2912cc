#!/usr/bin/env bash
# The one prepared GPU session (device tool): build the extension, run the GPU tests, a
# compute-sanitizer pass and the benchmarks, writing logs and results into $OUT (at most 8 files
# come back). Every step has its own time limit so the whole run stays under ~8 minutes, and a
# failing step does not stop the later ones. Usage on the device machine, from the repo root:
#   bash bench/gpu_check.sh            (OUT defaults to ./out)
set -uo pipefail
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
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/summary.txt" 2>&1

step build 150 env TORCH_CUDA_ARCH_LIST=9.0 $PY -m pip install --no-build-isolation --no-deps -e .
step tests 170 env FUSED_MBCONV_TRITON_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider tests
# depthwise: the vectorised channels_last paths and strided layouts; squeeze-excite (CUDA
# backend): every weight form and layout, a broadcast upstream gradient, C = 72 (16-byte vectors)
step sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
  $PY -m pytest -q -p no:cacheprovider tests/test_dwconv_bn_silu.py tests/test_squeeze_excite.py -k \
  "test_channels_last_vector_width or (test_parity and float32 and strided) or (cuda and (test_weight_forms or test_broadcast_upstream_gradient or (test_odd_sizes and 72)))"
step bench_dwconv 150 $PY bench/bench_dwconv.py --out "$OUT/dwconv.csv"
step bench_se_project 120 $PY bench/bench_se_project.py --quick --out -  # CSV into its log: 8 files max
step main 60 $PY -m fused_mbconv --device cuda
cat "$OUT/summary.txt"
