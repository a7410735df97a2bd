#!/usr/bin/env bash
# The whole GPU check in one command: configure, build, ctest (every test), the Python tests of
# every chapter against PyTorch, compute-sanitizer (memcheck and racecheck over each chapter's
# [sanitize] tests), the ladder, chapter 07's KV cache table (kv_quant.csv), the plots, PyTorch's
# attention backends timed on the same GPU, and the chapters timed next to them in one process (the
# last two stages and most Python tests need PyTorch).
# Logs and CSVs go to one folder; a short summary prints last.
# One more stage, labs (the workshop labs, bench/lab), is not in the default list: it builds every
# chapter twice more, in build-lab/, and runs each one's GPU tests twice (`test` tests the solutions).
#
#   bench/gpu_check.sh [STAGE...]   stages: build test pytest sanitize smemcap ladder kvquant plot
#                                   torch compare (default: all)
#
# Environment: OUT_DIR (default ./gpu_check_out), BUILD_DIR (./build-gpu), CUDA_ARCH (default: the
#              GPU of this machine),
#              CMAKE_ARGS (extra configure flags, e.g. -DCMAKE_PREFIX_PATH=...), LADDER_ARGS,
#              TORCH_ARGS (bench/torch_sdpa.py), COMPARE_ARGS (bench/compare_torch.py, e.g. --quick),
#              SMEMCAP_CTEST_ARGS (e.g. "-R 08_flash_v3": the tests run under each cap; default all),
#              SMEMCAP_LADDER_ARGS (default "--quick --max-seconds 0.2"),
#              LABS_CHAPTERS (e.g. "04_flash_decoding 07_kv_quant"; default every chapter with blanks).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT_DIR:-$root/gpu_check_out}
build=${BUILD_DIR:-$root/build-gpu}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test pytest sanitize smemcap ladder kvquant plot torch compare)
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
status=0

stage_build() {
  local t0=$SECONDS
  if cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release ${CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH"} \
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
  grep -E '^[0-9]+: (All tests passed|test cases:|skipping the GPU tests|GPU tests FAIL)' "$out/ctest.log" | sed 's/^/          /' | tee -a "$summary"
  grep -E 'Skipped|\*\*\*Failed|Not Run' "$out/ctest.log" | sed 's/^/          /' | tee -a "$summary"
  return $rc
}

torch_with_cuda() { python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; }

# Every chapter through liblab_attention.so against PyTorch's SDPA (python/tests). On the GPU
# machine this stage is the comparison with PyTorch: it fails without pytest, PyTorch with CUDA or
# the library, instead of passing with the comparisons skipped.
stage_pytest() {
  local t0=$SECONDS
  if ! python3 -c "import pytest" 2> /dev/null; then
    note "pytest:   FAILED (pytest is not installed: pip install pytest)"; return 1
  fi
  if ! torch_with_cuda; then
    note "pytest:   FAILED (no PyTorch with CUDA: pip install torch, a CUDA build)"; return 1
  fi
  if [ ! -f "$build/lib/liblab_attention.so" ]; then
    note "pytest:   FAILED ($build/lib/liblab_attention.so is not built: run the build stage)"; return 1
  fi
  LAB_ATTENTION_LIB="$build/lib/liblab_attention.so" python3 -m pytest -q -rs "$root/python/tests" \
    > "$out/pytest.log" 2>&1
  local rc=$?
  note "pytest:   exit $rc, $(grep -E '(passed|failed|skipped|error)' "$out/pytest.log" | tail -1) ($((SECONDS - t0)) s)"
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

# The chapters under the shared memory per block of smaller GPUs (common/device.h, LAB_SMEM_CAP):
# 99K as on sm_86/89/120, 163K as on the A100. Each cap runs the tests and a short ladder; every
# chapter must pass or refuse by name (a refusal shows as "skipped: ..." in the ladder log).
stage_smemcap() {
  local rc=0 t0=$SECONDS cap
  for cap in 99K 163K; do
    LAB_SMEM_CAP=$cap ctest --test-dir "$build" --output-on-failure ${SMEMCAP_CTEST_ARGS:-} \
      > "$out/smemcap_$cap.ctest.log" 2>&1
    local r=$?
    note "smemcap:  $cap ctest exit $r, $(grep -E 'tests passed|tests failed' "$out/smemcap_$cap.ctest.log" | tail -1)"
    [ $r -ne 0 ] && rc=1
    mkdir -p "$out/smemcap_$cap"
    LAB_SMEM_CAP=$cap "$build/bin/ladder" ${SMEMCAP_LADDER_ARGS:---quick --max-seconds 0.2} \
      --out "$out/smemcap_$cap" > "$out/smemcap_$cap.ladder.log" 2>&1
    r=$?
    note "smemcap:  $cap ladder exit $r, $(tail -1 "$out/smemcap_$cap.ladder.log")"
    [ $r -ne 0 ] && rc=1
  done
  note "smemcap:  done ($((SECONDS - t0)) s)"
  return $rc
}

stage_ladder() {
  local t0=$SECONDS
  "$build/bin/ladder" --out "$out" ${LADDER_ARGS:-} 2>&1 | tee "$out/ladder.log"
  local rc=${PIPESTATUS[0]}
  note "ladder:   exit $rc, $(tail -1 "$out/ladder.log") ($((SECONDS - t0)) s)"
  return $rc
}

# 07_kv_quant_table (bench/kv_quant_table.cu): every KV cache scheme's bytes, accuracy and speed.
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
  if ! torch_with_cuda; then
    note "torch:    skipped (no PyTorch with CUDA)"; return 0
  fi
  local t0=$SECONDS
  PYTHONUNBUFFERED=1 python3 "$root/bench/torch_sdpa.py" "$out" ${TORCH_ARGS:-} > "$out/torch.log" 2>&1
  local rc=$?
  note "torch:    exit $rc, $(tail -1 "$out/torch.log") ($((SECONDS - t0)) s)"
  return $rc
}

# The chapters (through liblab_attention.so) and PyTorch's backends on the same tensors, one process.
stage_compare() {
  if ! torch_with_cuda; then
    note "compare:  skipped (no PyTorch with CUDA)"; return 0
  fi
  local t0=$SECONDS
  LAB_ATTENTION_LIB="$build/lib/liblab_attention.so" PYTHONUNBUFFERED=1 \
    python3 "$root/bench/compare_torch.py" "$out" ${COMPARE_ARGS:-} > "$out/compare.log" 2>&1
  local rc=$?
  note "compare:  exit $rc, $(tail -1 "$out/compare.log") ($((SECONDS - t0)) s)"
  return $rc
}

# The workshop labs (bench/lab): every chapter with exercises, handed out blanked, must fail its GPU
# tests, and with every blank filled by the solution must score full marks (tests and speed against
# the solution, same GPU, same run). Workspaces in a temporary folder; builds in build-lab/.
stage_labs() {
  local t0=$SECONDS rc=0 tmp ch r score
  tmp=$(mktemp -d)
  : > "$out/labs.log"
  for ch in ${LABS_CHAPTERS:-$("$root/bench/lab" list | awk '$2 != "no" {print $1}' | uniq)}; do
    for kind in blank filled; do
      echo "=== $ch: $kind" >> "$out/labs.log"
      "$root/bench/lab" start "$ch" --labs "$tmp/$kind" $([ $kind = filled ] && echo --filled) >> "$out/labs.log" 2>&1
      "$root/bench/lab" check "$ch" --labs "$tmp/$kind" > "$tmp/check.txt" 2>&1
      r=$?
      cat "$tmp/check.txt" >> "$out/labs.log"
      if [ $r -eq 3 ]; then
        note "labs:     no GPU (bench/lab check exit 3): nothing built or run"; rm -rf "$tmp"; return 1
      fi
      score=$(grep '^score:' "$tmp/check.txt" | cut -d'(' -f1)
      if [ $kind = blank ]; then
        if [ $r -eq 1 ] && grep -q 'FAILED' "$tmp/check.txt"; then
          note "labs:     $ch blanked: fails its tests, as it must (${score:-no score})"
        else
          note "labs:     $ch blanked: exit $r, expected its tests to fail (${score:-no score})"; rc=1
        fi
      elif [ $r -eq 0 ] && echo "$score" | grep -q 'score: 100.0 / 100'; then
        note "labs:     $ch solution: full marks (${score})"
      else
        note "labs:     $ch solution: exit $r, ${score:-no score} (expected full marks)"; rc=1
      fi
    done
  done
  rm -rf "$tmp"
  note "labs:     done ($((SECONDS - t0)) s, log labs.log)"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
  --format=csv > "$out/gpu.txt" 2>&1 || true
for s in "${stages[@]}"; do
  case "$s" in
    build|test|pytest|sanitize|smemcap|ladder|kvquant|plot|torch|compare|labs) "stage_$s" || status=1 ;;
    *) echo "gpu_check: unknown stage '$s' (allowed: build test pytest sanitize smemcap ladder kvquant plot torch compare labs)" >&2; exit 2 ;;
  esac
  [ "$s" = build ] && [ $status -ne 0 ] && break
done

echo
echo "==== summary ($(head -2 "$out/gpu.txt" | tail -1))"
cat "$summary"
exit $status
