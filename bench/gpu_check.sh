#!/usr/bin/env bash
# The prepared GPU session (device tool). A session has 15 minutes of device time in all, machine
# starts included, and a command 10: so one run does everything in order of importance within a
# time budget, and a rerun after a fix names only the steps it needs.
#   bash bench/gpu_check.sh                  every step, until BUDGET_S (default 450 s) is spent
#   bash bench/gpu_check.sh tests bench_dw   those steps only, in that order (build always runs first)
# Steps, by default in this order (what the issues still lacked after the run of 2026-11-27
# first): smoke (one training step of one block per backend, first-call times), sweeps (every
# layer shape of B0-B7 through each fused op; their kernels precompiled by `make gpu-prep`), tests
# (the suite on CUDA, in parallel workers; on the H200 it did not finish in 150 s: TESTS= picks
# files), sanitizer (compute-sanitizer memcheck over a subset), auto_table (the measured "auto"
# choice), bench_dw, bench_se (kernel benchmarks on the B5 shapes, also from CUDA graphs and by
# host issue time), tile_order (bench_dw's Triton rows in the depthwise kernels' old program
# order), kprofile (one layer kernel by kernel), bench_model (B5 end to end, also from CUDA
# graphs), hostprof (the host's time per fused layer call, by function), hostcost (one MBConv
# block's host time and launches, Triton's fast launch path off and on), racecheck
# (shared-memory hazards of the CUDA depthwise kernels' halo tiles), profile (B5's training step
# kernel by kernel), main (python -m fused_mbconv), counters (Nsight Compute's hardware counters
# of one B5 layer's kernels).
# Only when named: models (python -m fused_mbconv for every variant at its native resolution,
# fp32 and bf16, backend triton: parity with torchvision in eval and one training step, and
# untuned timings), model_sweep (python -m bench over B0-B7: issue 8's report).
# A step is skipped when less than half its time limit is left in the budget (with at least
# half, it runs cut short); a failing step does not stop the later ones.
# With a Triton cache built ahead (`make gpu-prep` or bench/precompile_triton.py, no GPU needed),
# name .triton-cache.tar.xz in the device tool's `carry`: its kernels load instead of compiling.
# Bisecting a failure: FUSED_MBCONV_COMPILE_THREADS=1 (no threaded precompile),
# FUSED_MBCONV_PTX_SIGMOID=0, FUSED_MBCONV_VECTOR_HINTS=0, FUSED_MBCONV_INTERIOR_TILES=0 (depthwise
# tiles always masked), FUSED_MBCONV_TAPS_PER_STRIP=0 (k5 dweight reduced per tile),
# FUSED_MBCONV_CHANNELS_FASTEST=0 (depthwise programs tile or chunk fastest, the old order),
# FUSED_MBCONV_TRITON_AUTOTUNE=0.
# $OUT gets summary.txt, tests.log, steps.log (every other step's output), dwconv.csv,
# se_project.csv, model.csv (bench_model and model_sweep), auto_table.json (commit it as
# fused_mbconv/ops/auto_table.json), models.log, hostprof.log, triton-cache-new.tar.xz (with a
# carried cache), inductor-cache.tar.xz (when torch.compile ran): 8 files come back at most, so
# a call that writes more loses some (the default steps write all but models.log).
set -uo pipefail
OUT=${OUT:-$PWD/out}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
ALL_STEPS="smoke sweeps tests sanitizer auto_table bench_dw bench_se tile_order kprofile bench_model hostprof hostcost racecheck profile main counters"
STEPS=${*:-$ALL_STEPS}

budgeted() {  # budgeted LABEL SECONDS: prints the time limit within BUDGET_S, or fails (noting the skip)
  local label=$1 limit=$2
  if ((SECONDS + limit > BUDGET_S)); then
    if ((2 * (BUDGET_S - SECONDS) < limit)); then
      echo "$label: skipped, ${limit} s would pass the budget (${SECONDS} of ${BUDGET_S} s spent)" | tee -a "$SUMMARY" >&2
      return 1
    fi
    limit=$((BUDGET_S - SECONDS))  # at least half its time left: run it cut short (verbose logs say how far it got)
  fi
  echo "$limit"
}

step() {  # step NAME[:DETAIL] SECONDS LOG COMMAND...: run with a time limit unless over budget
  local label=$1 limit log=$3
  limit=$(budgeted "$1" "$2") || return
  shift 3
  local start=$SECONDS
  echo "### $label: $*" >>"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "$label: rc=$? in $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

{
  echo "steps: $STEPS (budget ${BUDGET_S} s)"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit: $(git describe --always --dirty --abbrev=7 2>/dev/null || echo unknown)"
} >"$SUMMARY" 2>&1

LOG="$OUT/steps.log"
# SKIP_BUILD=1: steps that run only the Triton kernels (models, model_sweep with no measured
# "auto" table) need no fused_mbconv._C, and the build took 60-150 s of a 15-minute session
[[ ${SKIP_BUILD:-0} == 1 ]] || step build 150 "$LOG" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e .
# Triton kernels compiled ahead on a machine without a GPU (bench/precompile_triton.py, run there
# with this image's Python, torch and triton; the device tool carries .triton-cache.tar.xz when
# `carry` names it): used when this machine's triton would hit them, else compiled here as usual
CACHE_DIR=/tmp/fused_mbconv_triton_cache
CACHE_ARCHIVE=${CACHE_ARCHIVE-.triton-cache.tar.xz}  # empty: none
if [[ -f $CACHE_ARCHIVE ]] && $PY bench/precompile_triton.py --unpack "$CACHE_ARCHIVE" >>"$SUMMARY" 2>&1; then
  export TRITON_CACHE_DIR=$CACHE_DIR
  touch "$CACHE_DIR.unpacked"
fi
# torch.compile's own caches (FX graphs, AOTAutograd, max-autotune's choices) from an earlier GPU
# session: its inductor-cache.tar.xz, saved as .inductor-cache.tar.xz and named in `carry`. A hit
# skips inductor's compiling and autotuning (minutes per model or layer shape in max-autotune),
# so the compile providers' rows fit a session beside the fused ones. Inductor keys its graphs on
# the GPU's name, torch and triton: an archive made on an H200 misses on an H100.
INDUCTOR_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fused_mbconv_inductor_cache}
INDUCTOR_ARCHIVE=${INDUCTOR_ARCHIVE-.inductor-cache.tar.xz}  # empty: none
export TORCHINDUCTOR_CACHE_DIR=$INDUCTOR_DIR
mkdir -p "$INDUCTOR_DIR"
if [[ -f $INDUCTOR_ARCHIVE ]] && tar -xJf "$INDUCTOR_ARCHIVE" -C "$INDUCTOR_DIR"; then
  echo "inductor cache: $(find "$INDUCTOR_DIR" -type f | wc -l) files from $INDUCTOR_ARCHIVE" >>"$SUMMARY"
fi
touch "$INDUCTOR_DIR.unpacked"
# Each step is a function; they run in the order named on the command line (default ALL_STEPS).
smoke() {  # does one training step of one block's layers finish, per backend; first-call times
  step smoke 90 "$LOG" $PY bench/gpu_smoke.py  # 2026-11-26: triton's training first call took 34 s
}
# parallel workers compile Triton kernels side by side (compilation, not the GPU, bounds a sweep
# over ~1000 shapes); no tuning: the first config of each kernel. CI's CPU-only checks (the
# ahead-of-time compile, the C++ emulation of the CUDA kernels) are left out here. The shape sweeps
# of B0-B7 are their own step, so that a slow sweep leaves the suite's report whole; -v names each
# test as it ends, so a step cut short by its limit still says how far it got.
PYTEST=(env FUSED_MBCONV_TRITON_AUTOTUNE=0 $PY -m pytest -p no:cacheprovider -rfE --maxfail=30 --durations=15)
$PY -c "import xdist" 2>/dev/null && PYTEST+=(-n 12 --dist loadgroup)  # loadgroup: the tests past 2^31 elements in one worker
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)
# The suite's files, those never run on a GPU first (the H200 run of 2026-11-27 reached the ops'
# parity files, runtime, compile, running_stats and test_eval_fold, whose failures were a test
# bug, fixed since): the whole suite does not finish in 150 s, and workers take tests in the order
# given (files, not the folder: pytest collects a folder's files alphabetically). CPU-only files
# and the sweeps' are left out. TESTS="files or -k ..." replaces the list.
SUITE_FIRST="eval_fold efficientnet parity convert opcheck errors memory eager_dispatch launch backend main ddp
  dwconv_bn_silu squeeze_excite project_bn compile runtime running_stats"
NOT_HERE="triton_compile cuda_kernels_on_cpu cuda_index_math gpu_dwconv_shapes gpu_se_shapes gpu_pointwise_shapes"
suite_files() {  # SUITE_FIRST's files, then every other test file that is not NOT_HERE
  local name files=""
  for name in $SUITE_FIRST $(ls tests/test_*.py | sed 's|tests/test_||; s|\.py$||'); do
    [[ " $files " == *" tests/test_$name.py "* || " $NOT_HERE " == *" $name "* ]] || files+="tests/test_$name.py "
  done
  echo "$files"
}
tests() {
  step tests 150 "$OUT/tests.log" "${PYTEST[@]}" -v ${TESTS:-$(suite_files)}
}
sweeps() {
  step sweeps 120 "$OUT/tests.log" "${PYTEST[@]}" -v tests/test_gpu_dwconv_shapes.py tests/test_gpu_se_shapes.py \
    tests/test_gpu_pointwise_shapes.py
}
# depthwise: channels_last vector paths, strided layouts, the unmasked interior-tile path (bf16);
# squeeze-excite: every weight form and layout, a broadcast upstream gradient, C = 72 (16-byte
# vectors). The CUDA backend's kernels first (issue 6), then the Triton ones, untuned, in what is
# left of the limit; never the reference backend's cases (torch's own kernels), which came first
# in test order: on the H200 (2026-11-27) the 60 s limit ended after 11 tests, mostly those.
# -v names each test as it ends: a cut run still says what was checked.
SANITIZED="test_channels_last_vector_width or (test_parity and float32 and strided) or interior_tiles or test_weight_forms or test_broadcast_upstream_gradient or (test_odd_sizes and 72)"
sanitizer() {
  # shellcheck disable=SC2016  # $backend: the inner bash's loop variable
  step sanitizer 90 "$LOG" env FUSED_MBCONV_TRITON_AUTOTUNE=0 bash -c 'for backend in cuda triton; do
    compute-sanitizer --tool memcheck --error-exitcode 1 '"$PY"' -m pytest -v -p no:cacheprovider \
      tests/test_dwconv_bn_silu.py tests/test_squeeze_excite.py -k "$backend and ('"$SANITIZED"')" || exit 1; done'
}
# --host-share: each provider also timed replayed from a CUDA graph and by the host's issue time.
# DW_PROVIDERS=triton,cuda,eager, SE_PROVIDERS=triton,eager: leave torch.compile out (with it,
# 2026-11-27, each step finished one shape in its limit). Its conv autotuning is kept to cuDNN
# (Triton's conv templates ran 33-68 ms against cuDNN's 0.21 ms on B5's first depthwise conv, and
# timing them took ~10 s a conv)
COMPILE_ARGS=(--compile-conv-backends ATEN)
# BENCH_SHAPES=all: every distinct B5 shape (14 each: issues 4 and 5 set their targets over all of
# them; `make gpu-prep` compiles their Triton kernels) and the longer timing; else the --quick 3.
# DW_LIMIT_S, SE_LIMIT_S: the steps' time limits.
[[ ${BENCH_SHAPES:-quick} == all ]] && SHAPE_ARG= || SHAPE_ARG=--quick
bench_dw() {
  step bench_dw "${DW_LIMIT_S:-110}" "$LOG" $PY bench/bench_dwconv.py $SHAPE_ARG --host-share "${COMPILE_ARGS[@]}" \
    --out "$OUT/dwconv.csv" ${DW_PROVIDERS:+--providers $DW_PROVIDERS}
}
bench_se() {
  step bench_se "${SE_LIMIT_S:-90}" "$LOG" $PY bench/bench_se_project.py $SHAPE_ARG --host-share "${COMPILE_ARGS[@]}" \
    --out "$OUT/se_project.csv" ${SE_PROVIDERS:+--providers $SE_PROVIDERS}
}
# bench_dw's Triton rows in the depthwise kernels' old program order (FUSED_MBCONV_CHANNELS_FASTEST=0,
# read at import: its own process), appended to dwconv.csv as provider "triton-tiles-first" (and
# its +graph, +host rows), to set beside bench_dw's "triton" rows (DW_PROVIDERS=triton,cuda
# bench_dw tile_order: the new order, then the old). The CUDA kernels' order has no switch:
# compare their rows with bench/results/2026-11-27_h200_dwconv.csv
tile_order() {
  rm -f /tmp/tiles_first.csv
  step tile_order 60 "$LOG" env FUSED_MBCONV_CHANNELS_FASTEST=0 $PY bench/bench_dwconv.py --quick --host-share \
    --providers triton --out /tmp/tiles_first.csv
  local header=1
  [[ -f $OUT/dwconv.csv ]] && header=2  # its header once
  [[ -f /tmp/tiles_first.csv ]] && tail -n +$header /tmp/tiles_first.csv \
    | sed 's/,triton\(+[a-z]*\)\?,/,triton-tiles-first\1,/' >>"$OUT/dwconv.csv"
}
kprofile() {  # one B5 layer (KPROFILE_OP dwconv or se_project) kernel by kernel: which pass takes the time
  step kprofile 60 "$LOG" $PY bench/profile_layer.py --op "${KPROFILE_OP:-dwconv}" ${KPROFILE_SHAPE:+--shape "$KPROFILE_SHAPE"} \
    --providers "${KPROFILE_PROVIDERS:-cuda,triton,eager}"
}
# B5 end to end (MODEL_PROVIDERS, MODEL_MODES: see python -m bench --help; "+graph" providers
# replay the step from CUDA graphs; MODEL_LIMIT_S, default 120). fused-triton's first training
# step compiles every config of every training kernel for every B5 shape (on this repository's
# CPU: 294 kernels, 276 s) unless the precompiled cache above holds them; either way it times
# the configs. The report and its plots stay behind (8 files come back): `python -m bench
# --report-only model.csv`
bench_model() {
  local limit=${MODEL_LIMIT_S:-120}
  step bench_model "$limit" "$LOG" $PY -m bench --variants b5 --time-budget $((limit - 20)) --out "$OUT/model.csv" --report /tmp/model.md \
    --providers "${MODEL_PROVIDERS:-eager,eager+graph,fused-triton,fused-triton+graph}" --modes "${MODEL_MODES:-infer}"
}
# issue 8's sweep: python -m bench with its GPU defaults (B5, then B0-B4, B6, B7 at native
# resolution; eager, eager+graph, fused-triton+graph, fused, then torch.compile default and
# max-autotune on B5 only, its conv autotuning kept to cuDNN as in the kernel benches; inference
# and training steps), rows past its time budget recorded as skipped. SWEEP_PROVIDERS, SWEEP_LIMIT_S
model_sweep() {  # its time budget leaves the report 60 s, inside what is left of BUDGET_S
  local limit=${SWEEP_LIMIT_S:-480}
  ((limit > BUDGET_S - SECONDS)) && limit=$((BUDGET_S - SECONDS))
  step model_sweep "$limit" "$LOG" $PY -m bench --time-budget $((limit - 60)) --out "$OUT/model.csv" \
    --report /tmp/model.md "${COMPILE_ARGS[@]}" ${SWEEP_PROVIDERS:+--providers $SWEEP_PROVIDERS}
}
hostprof() {  # where the host's time goes when it issues one triton depthwise / SE + projection layer
  step hostprof 60 "$OUT/hostprof.log" bash -c "$PY bench/profile_host.py --op dwconv --providers triton,eager --calls 30 \
    && $PY bench/profile_host.py --op se_project --providers triton,eager --calls 30"
}
hostcost() {  # one fused MBConv block's host time per call and its launches, without and with the fast launch path
  step hostcost 90 "$OUT/hostprof.log" bash -c "FUSED_MBCONV_FAST_LAUNCH=0 $PY bench/host_cost.py --device cuda \
    && $PY bench/host_cost.py --device cuda && FUSED_MBCONV_FAST_LAUNCH=0 $PY bench/host_cost.py --device cuda"
}
profile() {  # per-kernel time of one B5 training step, eager vs fused: where the time goes
  step profile 60 "$LOG" $PY bench/profile_model.py --variant b5 --mode train --steps 2
}
auto_table() {
  step auto_table 70 "$LOG" $PY bench/bench_auto_table.py --time-budget 55 --out "$OUT/auto_table.json"
}
# the CUDA depthwise kernels stage halo tiles in shared memory: no read of a slot before its
# write, no write over one still read (bf16, channels_last with 16-byte vectors, k3 s1 and k5 s2)
racecheck() {
  step racecheck 45 "$LOG" compute-sanitizer --tool racecheck --error-exitcode 1 \
    $PY -m pytest -q -p no:cacheprovider tests/test_dwconv_bn_silu.py -k "cuda and test_channels_last_vector_width and bfloat16"
}
main() {
  step main 45 "$LOG" $PY -m fused_mbconv --device cuda
}
# hardware counters of one B5 layer's kernels, fused and eager (NCU_OP dwconv or se_project,
# NCU_SHAPE, NCU_PROVIDERS, NCU_MODES): throughput against the GPU's peaks, memory traffic,
# occupancy, where warps stall. --clock-control none: the device notes say to leave clocks alone
counters() {
  step counters 120 "$LOG" ncu --clock-control none --profile-from-start off --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
    $PY bench/profile_layer.py --ncu --op "${NCU_OP:-dwconv}" ${NCU_SHAPE:+--shape "$NCU_SHAPE"} \
    --providers "${NCU_PROVIDERS:-triton,eager}" --modes "${NCU_MODES:-infer,train}"
}
# issue 7's parity of every variant with torchvision at its native resolution, eval and a training
# step, float32 (with torch's TF32 flags as they are, and with TF32 off: see python -m fused_mbconv
# --help) and bfloat16, on the fused Triton kernels (named: a measured "auto" table could
# pick cuda for some), untuned: the variants and batches of bench/precompile_triton.py's MODELS_STEP,
# whose kernels `make gpu-prep` compiles ahead. MODELS_JOBS runs at once (default 6: parity, not
# speed, is what this step checks, and one run is mostly the host's start-up, model building and
# the float64 reference; its timings are then not for reporting), each within MODELS_LIMIT_S.
# On the H200, six at once: 16 runs (no TF32-off ones) in 102 s on 2026-11-27, 95 s on 2026-11-28;
# 24 runs since (8 TF32-off ones more), not yet timed: plan ~1.5x.
models() {
  local runs jobs=${MODELS_JOBS:-6} limit start=$SECONDS logs=/tmp/models_logs
  limit=$(budgeted models "${MODELS_LIMIT_S:-120}") || return
  runs=$($PY -c 'from bench.precompile_triton import MODELS_STEP as M, MODELS_STEP_RUNS as R
print(" ".join(f"{v}:{b}:{d}:{t}" for v, b in M for d, t in R))')
  mkdir -p $logs
  # shellcheck disable=SC2016  # expanded by the inner bash, once per run
  printf '%s\n' $runs | OMP_NUM_THREADS=$((16 / jobs)) xargs -P "$jobs" -I{} bash -c '
    IFS=: read -r variant batch dtype tf32 <<<"{}"; t=$SECONDS; name=$variant-$dtype; [[ $tf32 == off ]] && name+=-tf32off
    timeout '"$limit"' env FUSED_MBCONV_TRITON_AUTOTUNE=0 '"$PY"' -m fused_mbconv --variant $variant --batch $batch \
      --dtype $dtype --tf32 $tf32 --backend triton --steps 5 >'"$logs"'/$name.log 2>&1
    echo "models:$name: rc=$? in $((SECONDS - t)) s"' | tee -a "$SUMMARY"
  for run in $runs; do
    IFS=: read -r variant batch dtype tf32 <<<"$run"; name=$variant-$dtype; [[ $tf32 == off ]] && name+=-tf32off
    { echo "### models:$name (batch $batch, $jobs runs at once)"; cat "$logs/$name.log"; } >>"$OUT/models.log"
  done
  echo "models: $((SECONDS - start)) s in all" | tee -a "$SUMMARY"
}
for name in $STEPS; do
  if [[ " $ALL_STEPS models model_sweep " != *" $name "* ]]; then
    echo "$name: unknown step (steps: $ALL_STEPS models model_sweep)" | tee -a "$SUMMARY"
    continue
  fi
  "$name"
done
# what this run added to the cache (kernels the archive lacked, the autotuner's timings) comes back
# as triton-cache-new.tar.xz: `bench/precompile_triton.py --merge` adds it to the archive, and the
# next session neither compiles nor tunes those again
if [[ -n ${TRITON_CACHE_DIR:-} ]]; then
  $PY bench/precompile_triton.py --pack-new "$CACHE_DIR.unpacked" "$OUT/triton-cache-new.tar.xz" >>"$SUMMARY" 2>&1 \
    && echo "triton cache: $(du -h "$OUT/triton-cache-new.tar.xz" | cut -f1) of new entries" >>"$SUMMARY"
fi
# inductor's cache, whole, when this run added to it (16 MiB at most comes back: a larger one stays)
if [[ -n $(find "$INDUCTOR_DIR" -type f -newer "$INDUCTOR_DIR.unpacked" -print -quit) ]]; then
  XZ_OPT=-1 tar -cJf "$OUT/inductor-cache.tar.xz" -C "$INDUCTOR_DIR" .
  if (($(stat -c %s "$OUT/inductor-cache.tar.xz") > 16 * 1024 * 1024)); then
    echo "inductor cache: $(du -h "$OUT/inductor-cache.tar.xz" | cut -f1), over the 16 MiB a file can come back in: left out" >>"$SUMMARY"
    rm "$OUT/inductor-cache.tar.xz"
  else
    echo "inductor cache: $(du -h "$OUT/inductor-cache.tar.xz" | cut -f1), $(find "$INDUCTOR_DIR" -type f | wc -l) files" >>"$SUMMARY"
  fi
fi
cat "$SUMMARY"
