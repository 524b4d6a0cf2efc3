#!/usr/bin/env bash
# One device call for a GPU session (the device tool's `run`, in the repository root, $OUT set): build the CUDA
# extension, run the whole test suite on the GPU, compute-sanitizer on every CUDA kernel, then the benchmark
# suites. Usage: bash bench/gpu_session.sh [suite ...]  (default: every suite).
# Each step's exit status is logged and the script goes on, so one failure does not cost the rest of the call.
# The device tool returns at most 8 files from $OUT, so the logs and results travel as one archive, beside
# steps.txt (each step's exit status and time).
set -u
OUT=${OUT:-/tmp/fa_out}
LOGS=$(mktemp -d)/session
mkdir -p "$OUT" "$LOGS"
trap 'tar -czf "$OUT/session.tar.gz" -C "$(dirname "$LOGS")" session; cp "$LOGS/steps.txt" "$OUT/" 2>/dev/null' EXIT
step() {  # step NAME COMMAND...: run it, log to NAME.log, record its exit status and time
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$LOGS/steps.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null; } >"$LOGS/env.txt" 2>&1

step install env MAX_JOBS=16 pip install --no-build-isolation -e .
step sanitize_memcheck /usr/local/cuda/bin/compute-sanitizer --tool memcheck python csrc/sanitize.py
step sanitize_racecheck /usr/local/cuda/bin/compute-sanitizer --tool racecheck --racecheck-report all python csrc/sanitize.py
step tests python -m pytest tests -q -x --durations=20 -p no:cacheprovider
suites=${*:-attention decoding softmax layernorm rmsnorm model}
for suite in $suites; do
  step "bench_$suite" python -m bench --suite "$suite" --out "$LOGS/results"
done
