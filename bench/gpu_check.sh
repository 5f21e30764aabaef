#!/usr/bin/env bash
# The GPU one-shot: everything a CUDA GPU can show that CI cannot, in under 10 minutes, into one
# results folder bench/results/<gpu-name>-<UTC date>/ (docs/gpu-verification.md, "On a GPU").
#
#   bash bench/gpu_check.sh              # on a machine with a CUDA GPU and this repository
#   bash bench/gpu_check.sh --dry-run    # print the steps, check their files (no GPU needed)
#
# Steps (each under `timeout`, within a whole budget of GPU_CHECK_BUDGET_S, default 590 s):
# environment, build, doctor, the CUDA and Triton tests, compute-sanitizer (memcheck, racecheck,
# synccheck, initcheck) on one call of each op, the bitwise determinism stress of the ticketed
# kernels against cuda_emulated, the GPU microbenchmarks. Each writes <NN>-<step>.log; summary.tsv
# says pass/fail/timeout/skipped per step. Exit status 0 when every step passed.
# Without a GPU it says so, does the dry run and exits 0 (1 if a file a step needs is missing or
# the Python driver does not import). Settings: PYTHON (default python), OUT (the results folder),
# GPU_CHECK_BUDGET_S, DETERMINISM_REPEATS (default 100), MAX_JOBS (default: the CPU count).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-590}
REPEATS=${DETERMINISM_REPEATS:-100}
DRIVER=bench/gpu_check_ops.py
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
    /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
SANITIZER=${SANITIZER:-compute-sanitizer}
unset TRITON_INTERPRET  # the GPU runs Triton, never its interpreter

# name | seconds at most | command (run by bash -c in the repository root)
STEPS=(
  "build|180|MAX_JOBS=${MAX_JOBS:-$(nproc)} LOMO_KERNELS_FORCE_BUILD=1 LOMO_KERNELS_CUDA_EMULATION=1 $PYTHON -m pip install -q --no-build-isolation --no-deps -e ."
  "doctor|30|$PYTHON -m lomo_kernels"
  "tests|120|$PYTHON -m pytest -q -rs -p no:cacheprovider -k '(cuda and not emulat) or no_host_sync' tests"
  "memcheck|45|PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool memcheck --error-exitcode 1 --print-limit 20 $PYTHON $DRIVER --once"
  "racecheck|45|$SANITIZER --tool racecheck --error-exitcode 1 --print-limit 20 $PYTHON $DRIVER --once"
  "synccheck|35|$SANITIZER --tool synccheck --error-exitcode 1 --print-limit 20 $PYTHON $DRIVER --once"
  "initcheck|35|$SANITIZER --tool initcheck --error-exitcode 1 --print-limit 20 $PYTHON $DRIVER --once"
  "determinism|40|$PYTHON $DRIVER --determinism $REPEATS"
  "benchmarks|55|$PYTHON bench/run.py --device cuda --sizes small --dtypes bf16 --backends native triton torch --no-backward --no-progress --out \$RESULTS/bench"
)
# files the steps read: a dry run checks that they exist
NEEDS=(setup.py pyproject.toml lomo_kernels/__main__.py lomo_kernels/doctor.py tests/conftest.py
       tests/kernel_backends.py "$DRIVER" bench/run.py bench/environment.py)

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU &&
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

dry_run() {
  echo "gpu_check: dry run (nothing is built or run; RESULTS is the results folder)"
  local i=0 bad=0
  for step in "${STEPS[@]}"; do
    i=$((i + 1))
    IFS='|' read -r name secs cmd <<<"$step"
    printf 'step %02d %-12s timeout %4ss: %s\n' "$i" "$name" "$secs" "$cmd"
  done
  for f in "${NEEDS[@]}"; do
    if [[ -f $f ]]; then echo "file ok: $f"; else echo "MISSING: $f"; bad=1; fi
  done
  if "$PYTHON" "$DRIVER" --list >/dev/null; then
    echo "driver ok: $DRIVER imports and lists its calls"
  else
    echo "DRIVER FAILED: $PYTHON $DRIVER --list"; bad=1
  fi
  if [[ -x $SANITIZER ]] || command -v "$SANITIZER" >/dev/null 2>&1; then
    echo "compute-sanitizer: $SANITIZER"
  else
    echo "compute-sanitizer: not found here (a GPU machine needs it: the CUDA toolkit)"
  fi
  return $bad
}

if [[ ${1:-} == --dry-run ]] || ! has_gpu; then
  [[ ${1:-} == --dry-run ]] || echo "gpu_check: no CUDA GPU here (nvidia-smi / torch.cuda): dry run only"
  dry_run
  exit $?
fi

start=$(date +%s)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
export RESULTS=${OUT:-bench/results/${slug:-cuda}-$stamp}
mkdir -p "$RESULTS"
{
  echo "date: $(date -u --iso-8601=seconds)"
  echo "gpu: $gpu"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(dirty)')"
  echo "python: $("$PYTHON" --version 2>&1)"
  "$PYTHON" -c "import torch; print('torch:', torch.__version__, 'cuda', torch.version.cuda)"
  "$PYTHON" -c "import triton; print('triton:', triton.__version__)" 2>&1
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "compute-sanitizer: $("$SANITIZER" --version 2>/dev/null | tail -n 1)"
  echo "cpus: $(nproc); load: $(cat /proc/loadavg)"
} >"$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"
printf 'step\tstatus\tseconds\texit\n' >"$RESULTS/summary.tsv"

failed=0 i=0
for step in "${STEPS[@]}"; do
  i=$((i + 1))
  IFS='|' read -r name secs cmd <<<"$step"
  log=$(printf '%s/%02d-%s.log' "$RESULTS" "$i" "$name")
  left=$((BUDGET - ($(date +%s) - start)))
  ((secs > left - 5)) && secs=$((left - 5))
  if ((secs < 10)); then
    status=skipped rc=- took=0
    echo "skipped: the whole budget of $BUDGET s is spent" >"$log"
  else
    echo "\$ $cmd  (timeout ${secs}s)" >"$log"
    t0=$(date +%s)
    timeout --kill-after=5 "$secs" bash -c "$cmd" >>"$log" 2>&1
    rc=$? took=$(($(date +%s) - t0))
    if ((rc == 0)); then status=pass; elif ((rc == 124 || rc == 137)); then status=timeout; else status=fail; fi
  fi
  [[ $status == pass ]] || failed=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$rc" >>"$RESULTS/summary.tsv"
  printf 'step %02d %-12s %-8s %4ss  (%s)\n' "$i" "$name" "$status" "$took" "$log"
done
echo "total $(($(date +%s) - start)) s; results in $RESULTS"
exit $failed
