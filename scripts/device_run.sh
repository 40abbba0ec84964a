#!/usr/bin/env bash
# The one command that runs on the device (an H100/H200): GPU tests (the kernel fuzzer among them), compute-sanitizer
# (memcheck, initcheck, racecheck) on small cases and fixed-seed fuzz subsets,
# the kernel benchmark (bench/results/<name>.json), the sparse kernel benchmark on the model shapes at densities
# 0.5 0.25 0.1 0.05, bw 16 (--sparse: bench/results/<name with kernels -> kernels_sparse>.json, e.g.
# kernels_sparse_h100.json; with it GPT-OSS-20B's biased experts, kernels_gpt-oss_h100.json), the Hare paper's
# real and synthetic settings (--paper: <name with kernels -> paper>, e.g. paper_h100.json), programmatic dependent
# launch on/off (--launch: <name with kernels -> launch>), eager hare.moe host time beside its graph replay
# (--overhead: bench/results/overhead_<gpu>.json), the launch plan's overrides swept on the peer shapes (--tune:
# $OUT/tune_plan.json, scripts/tune_plan.py; TUNE_ARGS its options), the demo on the GPU, the decode attention benchmark
# (--attention: $OUT/attention.json) and the end-to-end model benchmark (bench/results/model_<gpu>.json).
# Logs, the JSON files and the plots go to $OUT (default ./device_out). --sparse and --paper each stop after
# SPARSE_TIMEOUT / PAPER_TIMEOUT seconds (default 300); their JSON is rewritten as they go, so it keeps what ran.
#
#   scripts/device_run.sh [--tests] [--sanitize] [--bench] [--sparse] [--paper] [--launch] [--overhead] [--tune] [--demo]
#                         [--attention] [--model]
#                         [--name NAME]
#                         [-- extra bench args]
# With no selection flags all run. Extra args go to --bench and --sparse (hare.bench.kernels options).
# Example: scripts/device_run.sh --bench -- --shapes qwen3-30b-a3b
# MODEL_ARGS passes options to `hare bench model` (e.g. "--models mixtral-8x7b"); TEST_WORKERS=N runs the GPU tests
# in N pytest-xdist processes on the one GPU; HARE_CACHE_DIR may point at a cubin built ahead (carry it). Logs and plots end up in
# $OUT/logs.tgz, the JSON results beside it. Set HARE_COMMIT to the commit under test where the tree travels
# without .git.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT" bench/results
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export HARE_CACHE_DIR=${HARE_CACHE_DIR:-/tmp/hare_cache}
PY=${PYTHON:-python3}
DO_TESTS=0; DO_SAN=0; DO_BENCH=0; DO_SPARSE=0; DO_PAPER=0; DO_LAUNCH=0; DO_OVERHEAD=0; DO_TUNE=0; DO_DEMO=0; DO_ATTN=0; DO_MODEL=0; DO_EP=0; NAME=kernels_h100; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) DO_TESTS=1 ;;
    --sanitize) DO_SAN=1 ;;
    --bench) DO_BENCH=1 ;;
    --sparse) DO_SPARSE=1 ;;
    --paper) DO_PAPER=1 ;;
    --launch) DO_LAUNCH=1 ;;
    --overhead) DO_OVERHEAD=1 ;;
    --tune) DO_TUNE=1 ;;
    --demo) DO_DEMO=1 ;;
    --attention) DO_ATTN=1 ;;
    --model) DO_MODEL=1 ;;
    --ep) DO_EP=1 ;;
    --name) NAME=$2; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown flag $1"; exit 2 ;;
  esac
  shift
done
if [ $((DO_TESTS + DO_SAN + DO_BENCH + DO_SPARSE + DO_PAPER + DO_LAUNCH + DO_OVERHEAD + DO_TUNE + DO_DEMO + DO_ATTN + DO_MODEL + DO_EP)) = 0 ]; then
  DO_TESTS=1; DO_SAN=1; DO_BENCH=1; DO_SPARSE=1; DO_PAPER=1; DO_LAUNCH=1; DO_OVERHEAD=1; DO_TUNE=1; DO_DEMO=1; DO_ATTN=1; DO_MODEL=1; DO_EP=1
fi
# NAME with "kernels" replaced by $1 (or NAME_$1 when it has no "kernels")
derived_name() { local n=${NAME/kernels/$1}; [ "$n" = "$NAME" ] && n=${NAME}_$1; echo "$n"; }
SPARSE_NAME=$(derived_name kernels_sparse); PAPER_NAME=$(derived_name paper); LAUNCH_NAME=$(derived_name launch)
GPT_OSS_NAME=$(derived_name kernels_gpt-oss)
STATUS=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
t0=$(date +%s)
# compile once up front (cached by source hash) so the tests time kernels, not nvcc
$PY -c "from hare.gpu import _build; print('cubin', _build.cubin_path())" 2>&1 | tee "$OUT/build.log" || STATUS=1
# the checked debug build (HARE_DEBUG=1), which tests/gpu/test_fuzz.py runs in subprocesses
HARE_DEBUG=1 $PY -c "from hare.gpu import _build; print('debug cubin', _build.cubin_path())" 2>&1 | tee -a "$OUT/build.log" || STATUS=1
CUBIN=$(ls -t $HARE_CACHE_DIR/hare_kernels-*.cubin 2>/dev/null | grep -v -- -debug- | head -1)
if [ -n "$CUBIN" ] && command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$CUBIN" > "$OUT/sass.txt" 2>&1
  echo "SASS: HGMMA $(grep -c HGMMA "$OUT/sass.txt"), UTMALDG $(grep -c UTMALDG "$OUT/sass.txt"), LDL/STL $(grep -cE 'LDL|STL' "$OUT/sass.txt")"
  gzip -f "$OUT/sass.txt"
fi
if [ $DO_TESTS = 1 ]; then
  $PY -m pytest tests/gpu -q -x --timeout=600 -p no:cacheprovider ${TEST_WORKERS:+-n $TEST_WORKERS} 2>&1 | tee "$OUT/tests.log" | tail -25
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
fi
t1=$(date +%s)
if [ $DO_SAN = 1 ]; then
  # memcheck on the small cases and a fixed-seed fuzz subset (dirty memory, graphs on side streams); initcheck on
  # eager fuzz cases with every allocation fresh from cudaMalloc (so a read of anything unwritten is reported);
  # racecheck (shared memory) on a few small fuzz cases and the fused decode kernel's cases
  sanitize() {
    local name=$1; shift
    timeout ${SAN_TIMEOUT:-300} compute-sanitizer --report-api-errors no --error-exitcode 9 "$@" > "$OUT/sanitizer_$name.log" 2>&1
    local rc=$?; tail -3 "$OUT/sanitizer_$name.log"; echo "$name exit code: $rc"; [ $rc = 0 ] || STATUS=1
  }
  sanitize memcheck_cases --tool memcheck $PY tests/gpu/sanitize_case.py
  sanitize memcheck_gemv --tool memcheck $PY tests/gpu/sanitize_case.py --gemv
  sanitize racecheck_gemv --tool racecheck $PY tests/gpu/sanitize_case.py --gemv
  sanitize memcheck_fuzz --tool memcheck $PY -m tests.gpu.fuzz --seed 7 --cases 16 --small --max-tokens 300
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize initcheck_fuzz --tool initcheck $PY -m tests.gpu.fuzz --seed 8 --cases 10 \
    --small --max-tokens 300 --modes eager --no-garbage
  sanitize racecheck_fuzz --tool racecheck $PY -m tests.gpu.fuzz --seed 9 --cases 3 --small --max-tokens 17 --modes eager
  sanitize racecheck_decode --tool racecheck $PY tests/gpu/sanitize_case.py --decode
fi
t2=$(date +%s)
if [ $DO_BENCH = 1 ]; then
  $PY -m hare.bench.kernels --out-json "bench/results/$NAME.json" --plot-dir "$OUT" --log "$OUT/bench_full.txt" "${EXTRA[@]}" 2>&1 | tee "$OUT/bench.log" | tail -120
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
  cp "bench/results/$NAME.json" "$OUT/" 2>/dev/null
fi
t3=$(date +%s)
if [ $DO_SPARSE = 1 ]; then
  timeout ${SPARSE_TIMEOUT:-300} $PY -m hare.bench.kernels --density 0.5 0.25 0.1 0.05 --bw 16 \
    --out-json "bench/results/$SPARSE_NAME.json" --log "$OUT/bench_sparse_full.txt" "${EXTRA[@]}" 2>&1 \
    | tee "$OUT/bench_sparse.log" | tail -70
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
  cp bench/results/$SPARSE_NAME.json bench/results/${SPARSE_NAME}_*.png "$OUT/" 2>/dev/null
  # GPT-OSS-20B's biased clamped-SwiGLU experts through hare.moe, dense and at the same densities (its own layer:
  # no extra bench args) -> bench/results/<name with kernels -> kernels_gpt-oss>.json, e.g. kernels_gpt-oss_h100.json
  timeout ${SPARSE_TIMEOUT:-300} $PY -m hare.bench.kernels --suite gpt-oss --density 0.5 0.25 0.1 0.05 --bw 16 \
    --out-json "bench/results/$GPT_OSS_NAME.json" --log "$OUT/bench_gpt_oss_full.txt" 2>&1 \
    | tee "$OUT/bench_gpt_oss.log" | tail -20
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
  cp bench/results/$GPT_OSS_NAME.json bench/results/$GPT_OSS_NAME.png "$OUT/" 2>/dev/null
fi
t4=$(date +%s)
if [ $DO_PAPER = 1 ]; then
  timeout ${PAPER_TIMEOUT:-300} $PY -m hare.bench.kernels --suite real synthetic \
    --out-json "bench/results/$PAPER_NAME.json" --log "$OUT/bench_paper_full.txt" 2>&1 \
    | tee "$OUT/bench_paper.log" | tail -40
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
  cp bench/results/$PAPER_NAME.json bench/results/${PAPER_NAME}_*.png "$OUT/" 2>/dev/null
fi
if [ $DO_LAUNCH = 1 ]; then
  $PY -m hare.bench.launch --out-json "bench/results/$LAUNCH_NAME.json" 2>&1 | tee "$OUT/bench_launch.log" | tail -5
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
  cp "bench/results/$LAUNCH_NAME.json" "$OUT/" 2>/dev/null
fi
if [ $DO_OVERHEAD = 1 ]; then
  # eager hare.moe host and wall time per call beside its CUDA-graph replay, check_ids on and off
  $PY -m hare.cli bench overhead 2>&1 | tee "$OUT/bench_overhead.log" | tail -20
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
  cp bench/results/overhead_*.json "$OUT/" 2>/dev/null
fi
if [ $DO_TUNE = 1 ]; then
  timeout ${TUNE_TIMEOUT:-400} $PY scripts/tune_plan.py --out "$OUT/tune_plan.json" ${TUNE_ARGS:-} 2>&1 \
    | tee "$OUT/tune_plan.log" | tail -30
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
fi
t5=$(date +%s)
if [ $DO_DEMO = 1 ]; then
  $PY -m hare.cli demo 2>&1 | tee "$OUT/demo.log" | tail -40
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
fi
if [ $DO_ATTN = 1 ]; then
  $PY -m hare.bench.attention --out-json "$OUT/attention.json" 2>&1 | tee "$OUT/bench_attention.log" | tail -40
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
fi
if [ $DO_MODEL = 1 ]; then
  # written straight to $OUT and rewritten after each model, so a run cut short keeps what it measured
  timeout ${MODEL_TIMEOUT:-540} $PY -m hare.cli bench model --out-json "$OUT/model.json" ${MODEL_ARGS:-} 2>&1 \
    | tee "$OUT/bench_model.log" | tail -60
  [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
fi
t6=$(date +%s)
if [ $DO_EP = 1 ]; then
  # --ep: `hare bench ep` over NCCL, one torchrun process per GPU, NVLink multicast off (EP_ARGS: its options,
  # EP_TIMEOUT: its limit) -> bench/results/ep_<gpu>x<N>.json; skipped on fewer than 2 GPUs. The EP tests
  # (tests/test_distributed.py) run gloo on the CPU only: their rank programs keep every tensor on the CPU.
  EP_GPUS=$(nvidia-smi -L | wc -l)
  if [ "$EP_GPUS" -lt 2 ]; then
    echo "ep: skipped, $EP_GPUS GPU (needs 2 or more)"
  else
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    timeout ${EP_TIMEOUT:-540} $PY -m hare.cli bench ep --gpus "$EP_GPUS" ${EP_ARGS:-} 2>&1 \
      | tee "$OUT/bench_ep.log" | tail -40
    [ ${PIPESTATUS[0]} = 0 ] || STATUS=1
    cp bench/results/ep_*x"$EP_GPUS".json "$OUT/" 2>/dev/null
    echo "ep: $(($(date +%s) - t6))s"
  fi
fi
echo "times: tests $((t1-t0))s sanitize $((t2-t1))s bench $((t3-t2))s sparse $((t4-t3))s paper+launch $((t5-t4))s" \
  "demo+model $((t6-t5))s; status $STATUS"
# the device tool brings back few files: the JSON results stay loose, everything else goes into one archive
# (archived outside $OUT first: tar fails on a folder that changes while it reads it)
TGZ=$(mktemp /tmp/hare_logs.XXXXXX.tgz)
tar czf "$TGZ" -C "$OUT" --exclude='*.json' . && find "$OUT" -type f ! -name '*.json' -delete && mv "$TGZ" "$OUT/logs.tgz"
exit $STATUS
