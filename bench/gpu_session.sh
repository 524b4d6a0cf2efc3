#!/usr/bin/env bash
# One device call of a GPU session (the device tool's `run`, in the repository root, $OUT set).
#
#   bash bench/gpu_session.sh [PHASE ...]      default: install smoke sanitize tests bench:attention
#
# Phases, run in the order given:
#   install          pip install -e . (builds the CUDA extension, under a minute on 16 cores)
#   smoke            every suite's correctness checks of every backend, no timing (python -m bench --checks-only)
#   sanitize         compute-sanitizer memcheck and racecheck on a small run of every CUDA kernel
#   sanitize:GROUPS  the same for some of csrc/sanitize.py's groups: "sanitize:attention,dropout,decoding"
#   racecheck[:GROUPS]  racecheck alone (memcheck of the attention group takes about 35 s on the H200)
#   tests            the test suite without the big GPU grids, in XDIST pytest-xdist workers (default 8) where
#                    xdist is installed
#   tests:EXPR       the part of it a pytest -k EXPR selects: "tests:cuda or norm"
#   grid[:EXPR]      the GPU grids (full_grid, tma_grid), optionally narrowed by a pytest -k EXPR, quoted as one
#                    argument: "grid:bfloat16 and D128"
#   retest           rerun, one process, with full tracebacks, the tests an earlier tests/grid phase of this call
#                    reported FAILED or ERROR (xdist prints a failure's traceback only in its final summary)
#   precompile       compile the attention benchmark's Triton configs in parallel (bench/precompile.py)
#   bench:SUITE      one benchmark suite (attention, decoding, softmax, layernorm, rmsnorm, model); BENCH_ARGS
#                    adds options (--quick, --no-checks, --exclude REGEX)
#   graphs:SUITE     the same, timed as CUDA-graph replays (--cuda-graphs), into results-graphs/
#   bench:SUITE/REGEX, graphs:SUITE/REGEX
#                    only the cases whose label matches REGEX (--cases; no '+', '@' or '/' in it):
#                    "bench:attention/^fwd D" times the attention forward alone. One run per suite and folder: a
#                    second overwrites the first
# A phase may end in @SECONDS, the most it may take ("tests@200"); phases joined by + run at the same time
# ("tests+smoke+precompile@180"; a cap at the end applies to each): for correctness work only, never timing.
#
# A call has at most 10 minutes and a session 15, so the phases share a deadline (DEADLINE_S, default 560 s):
# each step gets what is left, is stopped with SIGINT when it runs out (pytest still prints its summary, the bench
# keeps every finished case), and the logs always come back. Each step's exit status and time go to steps.txt;
# the logs and results travel as one archive, session.tar.gz (the tool returns at most 8 files from $OUT).
set -u
OUT=${OUT:-/tmp/fa_out}
DEADLINE_S=${DEADLINE_S:-560}
LOGS=$(mktemp -d)/session
mkdir -p "$OUT" "$LOGS"
trap 'tar -czf "$OUT/session.tar.gz" -C "$(dirname "$LOGS")" session; cp "$LOGS/steps.txt" "$OUT/" 2>/dev/null' EXIT

CAP_S=100000  # the current phase's own cap (phase@SECONDS)

step() {  # step NAME COMMAND...: run it within the time left, log to NAME.log, record exit status and time
  local name=$1; shift
  local left=$((DEADLINE_S - SECONDS))
  ((CAP_S < left)) && left=$CAP_S
  if ((left < 15)); then
    echo "$name: not run, the call's deadline is reached" | tee -a "$LOGS/steps.txt"
    return
  fi
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$left" "$@" >"$LOGS/$name.log" 2>&1 &
  local pid=$!
  wait "$pid"
  local rc=$?
  # timeout leads a process group of its own and returns when its command does: what the command started and left
  # running (xdist workers past the SIGINT) is still in that group. It would share the GPU and the CPUs with the
  # steps after it, timing steps too: at 81a2eed torch's own host time per call doubled after a stopped test phase.
  kill -KILL -- "-$pid" 2>/dev/null
  local how=""
  ((rc == 124 || rc == 130)) && how=" (stopped at the deadline)"
  echo "$name: exit $rc$how, $((SECONDS - start)) s" | tee -a "$LOGS/steps.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
                                        'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20; } >"$LOGS/env.txt" 2>&1

GRIDS="full_grid or tma_grid"
# -v: a line per test as it ends ("[gw3] FAILED tests/..."), so a run stopped at its deadline still names its
# failures; xdist stopped by SIGINT dies with an INTERNALERROR before the -rfE summary (seen on the H200).
PYTEST=(python -m pytest tests -v -p no:cacheprovider --maxfail=30 --durations=20 -rfE --tb=short)
XDIST=${XDIST:-8}
PARALLEL=()  # pytest-xdist's workers where it is installed (the GPU image has it)
python -c "import xdist" 2>/dev/null && PARALLEL=(-n "$XDIST")
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"

settle() {  # settle NAME: before a timing step, wait (30 s at most) until no process computes on the GPU; say if any does
  local apps
  for _ in {1..30}; do
    apps=$(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null)
    [[ -z $apps ]] && return
    sleep 1
  done
  echo "$1: timed while other processes computed on the GPU: $(tr '\n' ';' <<<"$apps")" | tee -a "$LOGS/steps.txt"
}

gpu_arch() {  # the first GPU's compute capability, "9.0"; nothing (setup.py's default) if nvidia-smi cannot say
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' '
}

failed_tests() {  # the node ids the test logs so far report FAILED or ERROR, once each
  grep -hoE "(FAILED|ERROR) tests/[^ ]+" "$LOGS"/tests*.log "$LOGS"/grid*.log 2>/dev/null | cut -d' ' -f2 | sort -u
}

run_phase() {
  local phase=$1
  case $phase in
    # `python -m pip`: the image's plain `pip` belongs to another Python, finds no torch and tries the network;
    # --no-deps --no-index: nothing can be fetched there, and the image has every dependency. The kernels are
    # compiled for this GPU's architecture alone (setup.py's default adds sm_80: twice the nvcc work)
    install) step install env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(gpu_arch)}" \
               python -m pip install --no-build-isolation --no-deps --no-index -e . ;;
    smoke) step smoke python -m bench --checks-only --no-progress ;;
    sanitize | sanitize:* | racecheck | racecheck:*)
      local groups=()  # sanitize:attention,decoding: those groups of csrc/sanitize.py only
      [[ $phase == *:* ]] && IFS=, read -ra groups <<<"${phase#*:}"
      # no caching allocator: each tensor its own allocation, so an overrun cannot land inside a pooled block
      [[ $phase == sanitize* ]] && step sanitize_memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        /usr/local/cuda/bin/compute-sanitizer --tool memcheck python csrc/sanitize.py ${groups[@]+"${groups[@]}"}
      step sanitize_racecheck /usr/local/cuda/bin/compute-sanitizer --tool racecheck --racecheck-report all \
        python csrc/sanitize.py ${groups[@]+"${groups[@]}"} ;;
    tests | tests:* | grid | grid:*)
      local what=${phase%%:*} select="not ($GRIDS)" name=${phase%%:*}
      [[ $what == grid ]] && select="($GRIDS)"
      if [[ $phase == *:* ]]; then
        select="$select and (${phase#*:})"
        name="${what}_$(tr -c 'A-Za-z0-9_\n' _ <<<"${phase#*:}")"
      fi
      step "$name" "${PYTEST[@]}" "${PARALLEL[@]}" -k "$select" ;;
    retest)
      local failed
      mapfile -t failed < <(failed_tests)
      if ((${#failed[@]})); then
        step retest python -m pytest -v -p no:cacheprovider --tb=long -rfE "${failed[@]}"
      else
        echo "retest: no failed test to rerun" | tee -a "$LOGS/steps.txt"
      fi ;;
    precompile)
      local quick=()
      [[ " ${BENCH_ARGS[*]} " == *" --quick "* ]] && quick=(--quick)
      step precompile python -m bench.precompile "${quick[@]}" ;;
    bench:* | graphs:*)
      local kind=${phase%%:*} spec=${phase#*:}
      local suite=${spec%%/*} args=(--no-progress "${BENCH_ARGS[@]}")
      [[ $spec == */* ]] && args+=(--cases "${spec#*/}")
      settle "${kind}_$suite"
      if [[ $kind == bench ]]; then
        step "bench_$suite" python -m bench --suite "$suite" --out "$LOGS/results" "${args[@]}"
      else
        step "graphs_$suite" python -m bench --suite "$suite" --cuda-graphs --out "$LOGS/results-graphs" "${args[@]}"
      fi ;;
    *) echo "$phase: unknown phase" | tee -a "$LOGS/steps.txt" ;;
  esac
}

phases=("$@")
((${#phases[@]})) || phases=(install smoke sanitize tests bench:attention)
for group in "${phases[@]}"; do
  CAP_S=100000
  if [[ $group == *@* ]]; then
    CAP_S=${group##*@}
    group=${group%@*}
  fi
  IFS=+ read -r -a parallel <<<"$group"
  for phase in "${parallel[@]}"; do
    run_phase "$phase" &
  done
  wait
done
for results in "$LOGS/results" "$LOGS/results-graphs"; do
  if [[ -d $results ]]; then
    python -m bench.targets "$results" | tee "$results/targets.md"
  fi
done
echo "== steps"; cat "$LOGS/steps.txt"
echo "== failed tests"; failed_tests | head -40
for log in "$LOGS"/*.log; do echo "== $(basename "$log")"; tail -n 6 "$log"; done
