#!/usr/bin/env bash
# The whole GPU check in one command: configure, build, ctest (every test), compute-sanitizer
# (memcheck and racecheck over each chapter's [sanitize] tests), the ladder, chapter 07's KV cache
# table (kv_quant.csv), the plots, and PyTorch's attention backends timed on the same GPU (if
# PyTorch is installed).
# Logs and CSVs go to one folder; a short summary prints last.
#
#   bench/gpu_check.sh [STAGE...]      stages: build test sanitize ladder kvquant plot torch  (default: all)
#
# Environment: OUT_DIR (default ./gpu_check_out), BUILD_DIR (./build-gpu), CUDA_ARCH (90),
#              CMAKE_ARGS (extra configure flags, e.g. -DCMAKE_PREFIX_PATH=...), LADDER_ARGS.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT_DIR:-$root/gpu_check_out}
build=${BUILD_DIR:-$root/build-gpu}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize ladder kvquant plot torch)
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
status=0

stage_build() {
  local t0=$SECONDS
  if cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
       ${CMAKE_ARGS:-} > "$out/configure.log" 2>&1 &&
     cmake --build "$build" -j "$(nproc)" > "$out/build.log" 2>&1; then
    note "build:    ok ($((SECONDS - t0)) s)"
  else
    note "build:    FAILED (see build.log / configure.log)"; tail -30 "$out/build.log" "$out/configure.log"
    return 1
  fi
}

stage_test() {
  local t0=$SECONDS
  ctest --test-dir "$build" --output-on-failure -V > "$out/ctest.log" 2>&1
  local rc=$?
  note "ctest:    $(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -1) ($((SECONDS - t0)) s)"
  grep -E '^[0-9]+: (All tests passed|test cases:|no CUDA device)' "$out/ctest.log" | sed 's/^/          /' | tee -a "$summary"
  grep -E 'Skipped|\*\*\*Failed|Not Run' "$out/ctest.log" | sed 's/^/          /' | tee -a "$summary"
  return $rc
}

stage_sanitize() {
  local rc=0 t0=$SECONDS
  : > "$out/sanitizer.log"
  for t in "$build"/bin/*_test; do
    for tool in memcheck racecheck; do
      echo "=== $tool $(basename "$t") [sanitize]" >> "$out/sanitizer.log"
      compute-sanitizer --tool "$tool" --error-exitcode 99 "$t" "[sanitize]" >> "$out/sanitizer.log" 2>&1
      local r=$?
      local line
      line=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitizer.log" | tail -1)
      note "sanitize: $tool $(basename "$t"): exit $r; ${line:-no summary}"
      [ $r -ne 0 ] && rc=1
    done
  done
  note "sanitize: done ($((SECONDS - t0)) s)"
  return $rc
}

stage_ladder() {
  local t0=$SECONDS
  "$build/bin/ladder" --out "$out" ${LADDER_ARGS:-} 2>&1 | tee "$out/ladder.log"
  local rc=${PIPESTATUS[0]}
  note "ladder:   exit $rc, $(tail -1 "$out/ladder.log") ($((SECONDS - t0)) s)"
  return $rc
}

stage_kvquant() {
  local t0=$SECONDS
  "$build/bin/07_kv_quant_table" --out "$out" 2>&1 | tee "$out/kv_quant.log"
  local rc=${PIPESTATUS[0]}
  note "kvquant:  exit $rc, $(grep -E '^speed target' "$out/kv_quant.log" | tail -1); $(tail -1 "$out/kv_quant.log") ($((SECONDS - t0)) s)"
  return $rc
}

stage_plot() {
  if python3 "$root/docs/plot.py" "$out" > "$out/plot.log" 2>&1; then
    note "plot:     $(tail -1 "$out/plot.log")"
  else
    note "plot:     FAILED (see plot.log)"; return 1
  fi
}

stage_torch() {
  if ! python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
    note "torch:    skipped (no PyTorch with CUDA)"; return 0
  fi
  local t0=$SECONDS
  PYTHONUNBUFFERED=1 python3 "$root/bench/torch_sdpa.py" "$out" ${TORCH_ARGS:-} > "$out/torch.log" 2>&1
  local rc=$?
  note "torch:    exit $rc, $(tail -1 "$out/torch.log") ($((SECONDS - t0)) s)"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
  --format=csv > "$out/gpu.txt" 2>&1 || true
for s in "${stages[@]}"; do
  case "$s" in
    build|test|sanitize|ladder|kvquant|plot|torch) "stage_$s" || status=1 ;;
    *) echo "gpu_check: unknown stage '$s' (allowed: build test sanitize ladder kvquant plot torch)" >&2; exit 2 ;;
  esac
  [ "$s" = build ] && [ $status -ne 0 ] && break
done

echo
echo "==== summary ($(head -2 "$out/gpu.txt" | tail -1))"
cat "$summary"
exit $status
