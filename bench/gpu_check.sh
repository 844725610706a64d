#!/usr/bin/env bash
# The ONE GPU check: the GPU tests (bf16 included) and the benchmarks against every baseline in the same run;
# results to bench/results/<card>/ (and to $OUT on the device machine). Prints a short summary last.
# Runs on the machine's own torch/triton/transformers (nothing is installed). Needs no network.
#
# Usage: bash bench/gpu_check.sh [--tune-forward] [--tune-backward] [--tune-decode] [--tune-cuda] [--no-bench]
#                                [--no-sanitize] [--profile-cuda]
#   default          build, tests, the anchors preset (forward, fwd+bwd, decode, training step, generate; ours-cuda
#                    next to ours-triton), then compute-sanitizer on the CUDA kernels
#   --tune-forward   also sweep the forward's launch configs (bench/tune_forward.py; after the anchors preset,
#                    its lines in log.txt)
#   --tune-decode    also time the decode: default, pointer tiles, interleaved order (bench/tune_decode.py; after the
#                    anchors preset, its lines in log.txt)
#   --tune-backward  also sweep the backward's launch configs, then fwd+bwd with the best vs the baselines
#   --no-bench       skip the anchors preset
#   --no-sanitize    skip compute-sanitizer (memcheck, racecheck: sanitize.txt)
#   --tune-cuda      last, time the CUDA forward and decode built with other tile settings (TUNE_CUDA_VARIANTS,
#                    "rows,keys,blocks,forward_stages,decode_stages,hopper_stages,hopper_overlap,hopper_pingpong,
#                    hopper_keys,hopper_warpgroups" for csrc/forward.cu's PK_FORWARD_* and PK_HOPPER_*, csrc/decode.cu's
#                    PK_DECODE_STAGES; the first default variant is the shipped build), each built in its own copy of
#                    the tree (in the background, while the tests run), next to Triton;
#                    on an sm_90 card each forward also with its wgmma loops (cp.async and TMA feeds) and each
#                    decode with its wgmma prefix programs; every decode also with its own programs in 64-row
#                    blocks, PK_CUDA_DECODE_OWN=rows (bench/tune_cuda.py: tune_cuda.json,
#                    log.txt lines)
#   --profile-cuda   last, ncu on the forward at B=8 S=2048 P=128 (the CUDA wgmma loop with each feed, cp.async and
#                    TMA, and the Triton kernel) and on the wgmma decode's three kernels (prefix, own partials,
#                    merge) at B=256 P=16384: occupancy, the pipes, and the warps' stall reasons per issued
#                    instruction (ncu.txt; summary lines in the output); then both CUDA forward loops' stalls per
#                    SASS instruction (ncu's source page: the CSVs in ncu_source.tar.gz, a summary of each by
#                    bench/ncu_source_summary.py in ncu.txt), for CPU sessions to read against their own SASS
# The device tool returns at most 8 files: the default run writes 6 (build with the versions first, tests,
# sanitize, anchors.json, anchors.md, log); --tune-forward, --tune-decode and --tune-cuda one JSON more each,
# --tune-backward three (tune_backward.json, tuned/anchors.{json,md}), --profile-cuda two (ncu.txt,
# ncu_source.tar.gz); all their lines go to log.txt. So: the default run with two of --tune-forward,
# --tune-decode and --tune-cuda, or with --profile-cuda alone; as --no-bench --no-sanitize (3 files: build, tests,
# log) --profile-cuda with two of the one-JSON sweeps or with --tune-backward; add files only by merging others.
# First builds the CUDA extension (csrc/) in place for the card's own arch (log and wall time: build.txt).
# Environment: GPU_TESTS (pytest targets, default tests), BUILD_TIMEOUT, TEST_TIMEOUT, SANITIZE_TIMEOUT (per tool),
#   BENCH_TIMEOUT, SMOKE_TIMEOUT (per Hopper loop, before the tests) (seconds),
#   MAX_JOBS (parallel compile jobs, default 16), DEADLINE_S (the whole script's seconds: later steps' timeouts are
#   cut to what is left, and a step with under 20 s left is skipped; set it to the device call's timeout_s - 30).
set -uo pipefail
cd "$(dirname "$0")/.."
# DEADLINE_S: the seconds this script may take in all (the device call's timeout less a margin). Each later step's
# timeout is cut to what is left (step_timeout), and a step with under 20 s left is skipped and says so, so that a
# call ends with every finished step's results written instead of being killed mid-step.
script_start=$(date +%s)
step_timeout() {  # step_timeout <the step's own timeout>: that, or what is left before DEADLINE_S (0: skip)
  local left=$(( ${DEADLINE_S:-1000000} - ($(date +%s) - script_start) - 10 ))
  [ $left -lt 20 ] && { echo 0; return; }
  echo $(( $1 < left ? $1 : left ))
}
timed() {  # timed <the step's own timeout> <command...>: `timeout` cut by step_timeout; skipped (exit 125) at 0
  local seconds; seconds=$(step_timeout "$1"); shift
  [ "$seconds" = 0 ] && { echo "skipped, DEADLINE_S reached: $*" >&2; return 125; }
  timeout "$seconds" "$@"
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# (an inherited loop choice would run everywhere, a broken one too)
unset TRITON_INTERPRET PK_CUDA_FORWARD PK_CUDA_DECODE PK_CUDA_DECODE_OWN
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out="${OUT:-$PWD/bench/results/$card}"; mkdir -p "$out"   # $OUT: the device tool's folder that comes back
# Pass PREFIX_KERNELS_COMMIT from the checkout: on the device machine git reported the session's first commit
# (e396d34) for a later tree.
export PREFIX_KERNELS_COMMIT="${PREFIX_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
tune_forward=0; tune_backward=0; tune_cuda=0; tune_decode=0; bench=1; sanitize=1; profile_cuda=0
for arg in "$@"; do
  case "$arg" in
    --tune-forward) tune_forward=1 ;;
    --tune-backward) tune_backward=1 ;;
    --no-bench) bench=0 ;;
    --no-sanitize) sanitize=0 ;;
    --tune-cuda) tune_cuda=1 ;;
    --tune-decode) tune_decode=1 ;;
    --profile-cuda) profile_cuda=1 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
rm -f "$out/log.txt"  # the run's human-readable log (benchmark tail, sweep lines), appended to below
python3 - <<PY | tee "$out/build.txt"  # the versions: the first line of build.txt (one file fewer to bring back)
import torch, triton, setuptools
try:
    import transformers; tv = transformers.__version__
except ImportError:
    tv = "absent"
# (setuptools: setup.py builds with the image's own; pyproject's license table needs a string from 77 on)
print(f"card={torch.cuda.get_device_name()} sms={torch.cuda.get_device_properties(0).multi_processor_count} "
      f"torch={torch.__version__} triton={triton.__version__} transformers={tv} setuptools={setuptools.__version__} "
      f"commit=$PREFIX_KERNELS_COMMIT")
PY

echo "== CUDA extension: building prefix_kernels._C in place for this card (log: $out/build.txt)"
# Built here, for this card's arch only: a binary built on the CPU machines links another torch. A failed build
# is reported in the summary and does not stop the Triton tests and benchmarks.
archs=$(python3 -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))")
build_start=$(date +%s)
rm -f prefix_kernels/_C*.so build/cuda_extension.log
(
  unset PREFIX_KERNELS_SKIP_CUDA_BUILD
  export PREFIX_KERNELS_FORCE_CUDA_BUILD=1 PREFIX_KERNELS_CUDA_ARCHS="$archs" MAX_JOBS="${MAX_JOBS:-16}"
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
  timeout "${BUILD_TIMEOUT:-240}" python3 setup.py -q build_ext --inplace
) >> "$out/build.txt" 2>&1
build_status=$?
build_s=$(( $(date +%s) - build_start ))
[ -f build/cuda_extension.log ] && { echo "== build/cuda_extension.log"; cat build/cuda_extension.log; } >> "$out/build.txt"
ext=$(python3 -c "from prefix_kernels import cuda; print('loads' if cuda._C is not None else cuda.UNAVAILABLE_REASON)" 2>&1 \
  | tail -n 1)
if [ $build_status = 0 ] && [ "$ext" = loads ]; then
  build_summary="built for $archs in ${build_s} s, loads"
elif ! compgen -G "csrc/*.cu" > /dev/null && ! compgen -G "csrc/*.cpp" > /dev/null; then
  build_summary="nothing to build (csrc/ has no .cu/.cpp sources)"
else
  build_summary="FAILED (exit $build_status, ${build_s} s, archs $archs): $(grep -m 1 -E ": (fatal )?error[: #]|prefix-kernels:" \
    "$out/build.txt" | cut -c1-200); extension: $ext"
fi
echo "build: $build_summary" | tee -a "$out/build.txt"

# --tune-cuda's builds, one per variant, each in its own copy of the tree: started in the background right after the
# main build, so that they compile while the smoke runs and the tests use the GPU.
# (the shipped build; the Hopper forward's one-warpgroup blocks of 64 rows x 64 keys; its ping-pong)
variants=${TUNE_CUDA_VARIANTS:-"2,32,1,1,3,3,1,0 2,32,1,1,3,3,1,0,64,1 2,32,1,1,3,3,1,1"}
# parse_variant <variant>: its fields as variables (older, shorter variants: the shipped values), its tree's copy
# and its label
parse_variant() {
  IFS=, read -r rows keys blocks fstages dstages hstages hoverlap hpingpong hkeys hwarpgroups <<< "$1"
  fstages=${fstages:-1}; dstages=${dstages:-3}; hstages=${hstages:-3}; hoverlap=${hoverlap:-1}
  hpingpong=${hpingpong:-0}; hkeys=${hkeys:-128}; hwarpgroups=${hwarpgroups:-2}
  local name="${rows}_${keys}_${blocks}_${fstages}_${dstages}_${hstages}_${hoverlap}_${hpingpong}_${hkeys}_${hwarpgroups}"
  copy="/tmp/pk_tune_$name"
  label="r${rows}-k${keys}-b${blocks}-fs${fstages}-ds${dstages}-hs${hstages}-ho${hoverlap}-hp${hpingpong}"
  label="$label-hk${hkeys}-hw${hwarpgroups}"
}
deduped="" seen=""  # one entry per distinct build: a short variant and its spelled-out form share a copy
for variant in $variants; do
  parse_variant "$variant"
  case " $seen " in *" $copy "*) continue ;; esac
  seen="$seen $copy" deduped="$deduped $variant"
done
variants=${deduped# }
build_variants() {
  for variant in $variants; do
    parse_variant "$variant"
    rm -rf "$copy" && mkdir -p "$copy"
    tar --exclude=./.git --exclude=./build --exclude='./prefix_kernels/_C*.so' -cf - . | tar -xf - -C "$copy"
    (cd "$copy" && unset PREFIX_KERNELS_SKIP_CUDA_BUILD && PREFIX_KERNELS_FORCE_CUDA_BUILD=1 \
      PREFIX_KERNELS_CUDA_ARCHS="$archs" MAX_JOBS=4 NVCC_APPEND_FLAGS="-DPK_FORWARD_ROW_TILES=$rows \
      -DPK_FORWARD_KEYS_D128=$keys -DPK_FORWARD_MIN_BLOCKS=$blocks -DPK_FORWARD_STAGES=$fstages \
      -DPK_DECODE_STAGES=$dstages -DPK_HOPPER_STAGES=$hstages -DPK_HOPPER_OVERLAP=$hoverlap \
      -DPK_HOPPER_PINGPONG=$hpingpong -DPK_HOPPER_KEYS=$hkeys -DPK_HOPPER_WARPGROUPS=$hwarpgroups" timeout "${BUILD_TIMEOUT:-240}" \
      python3 setup.py -q build_ext --inplace > build_variant.txt 2>&1 || echo "variant $variant: build failed") &
  done
  wait
}
variant_builds=""
if [ $tune_cuda = 1 ] && [ "$ext" = loads ]; then
  build_variants >> "$out/log.txt" 2>&1 &
  variant_builds=$!
fi

# The Hopper loops (async copies, mbarriers, setmaxnreg: a mistake hangs or traps) passed on an H200 at 8816e5e, but
# each build's, a --tune-cuda variant's too, runs a small sweep alone first, under a short timeout, so that one
# that hangs or crashes is left out of the tests, the sanitizer and --tune-cuda (named in PK_BROKEN_CUDA_LOOPS)
# instead of stalling or breaking every later CUDA call of the run. Wrong numbers (exit 3) stay in: the tests report
# them. smoke_loops <tree> prints the broken ones of the extension built in <tree> (log lines to log.txt).
smoke_loops() {
  local tree=$1 loop status broken=""
  for loop in $(PYTHONPATH="$tree" python3 "$tree/bench/sanitize_cuda.py" --list-hopper-loops); do
    PYTHONPATH="$tree" timeout -k 10 "${SMOKE_TIMEOUT:-60}" python3 "$tree/bench/sanitize_cuda.py" --loops "$loop" \
      > "/tmp/smoke_$loop.txt" 2>&1
    status=$?  # 124: the timeout (a hang)
    [ $status = 0 ] || [ $status = 3 ] || broken="$broken $loop"
    { echo "smoke ${tree##*/} $loop: exit $status$([ $status = 124 ] && echo " (timed out)")"
      grep -E "^BAD|Error" "/tmp/smoke_$loop.txt" | head -n 5; [ $status = 0 ] || tail -n 3 "/tmp/smoke_$loop.txt"
    } >> "$out/log.txt"
  done
  echo "${broken# }"
}
smoke_summary="not run (extension not loaded)"
export PK_BROKEN_CUDA_LOOPS=""
if [ "$ext" = loads ]; then
  PK_BROKEN_CUDA_LOOPS=$(smoke_loops "$PWD")
  smoke_summary="${PK_BROKEN_CUDA_LOOPS:-none}"
  # the wgmma loops are the forward's default on sm_90a (the TMA feed at D = 128, cp.async's at 64): a broken one is
  # left out of every call that names no loop too
  case " $PK_BROKEN_CUDA_LOOPS " in
    *" wgmma "*) export PK_CUDA_FORWARD=mma ;;
    *" wgmma-tma "*) export PK_CUDA_FORWARD=wgmma ;;
  esac
  grep -q "^smoke " "$out/log.txt" 2>/dev/null || smoke_summary="not run (no Hopper loop on this card)"
fi

echo "== GPU tests"
# pytest-xdist (on the GPU image) spreads the tests over processes sharing the GPU; the kernels' first
# compilations dominate the wall time.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
# A hung kernel fails its own test (pytest-timeout, also on the image) instead of eating the whole call's time.
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${PER_TEST_TIMEOUT:-90}" || echo "")
timed "${TEST_TIMEOUT:-300}" python3 -m pytest -q -rf --tb=short --durations=15 -m "not compile" -p no:cacheprovider \
  $parallel $per_test \
  ${GPU_TESTS:-tests --ignore=tests/test_cuda_emulator.py} > "$out/tests.txt" 2>&1  # (the emulator is CPU-only)
test_status=$?

# The anchors preset before the sanitizer: its time is known (~150 s on an H200), the sanitizer's first run over
# the Hopper loops is not; its JSON is rewritten after every row, so a kill keeps the rows finished.
bench_summary="skipped (--no-bench)"
if [ $bench = 1 ]; then
  echo "== benchmarks: anchors preset"
  timed "${BENCH_TIMEOUT:-450}" python3 -m prefix_kernels.bench --preset anchors --out "$out" --quiet 2>&1 \
    | tail -n 20 | tee -a "$out/log.txt"
  bench_status=${PIPESTATUS[0]}  # 1: a WRONG row or interrupted; 124: the timeout; 125: skipped (DEADLINE_S)
  bench_summary="exit $bench_status$([ $bench_status = 124 ] && echo " (timed out)")$([ $bench_status = 125 ] \
    && echo " (skipped: DEADLINE_S reached)")"
fi

sanitize_summary=" skipped ($([ $sanitize = 1 ] && echo "extension not loaded" || echo "--no-sanitize"))"
if [ $sanitize = 1 ] && [ "$ext" = loads ]; then
  echo "== compute-sanitizer memcheck + racecheck on a small sweep of the CUDA kernels (bench/sanitize_cuda.py)"
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -z "$sanitizer" ]; then
    sanitize_summary="skipped (no compute-sanitizer)"
  else
    sanitize_summary=""
    rm -f "$out/sanitize.txt"
    for tool in memcheck racecheck; do
      tool_timeout=$(step_timeout "${SANITIZE_TIMEOUT:-150}")
      [ "$tool_timeout" = 0 ] && { sanitize_summary="$sanitize_summary $tool: skipped (DEADLINE_S reached)"; continue; }
      echo "== compute-sanitizer --tool $tool (timeout ${tool_timeout} s)" >> "$out/sanitize.txt"
      # straight into $out: a call killed mid-tool still brings back what the tool printed so far
      timeout "$tool_timeout" "$sanitizer" --tool $tool --error-exitcode 9 python3 bench/sanitize_cuda.py \
        > "/tmp/sanitize_$tool.txt" 2>&1
      tool_status=$?
      cat "/tmp/sanitize_$tool.txt" >> "$out/sanitize.txt"
      sanitize_summary="$sanitize_summary $tool: exit $tool_status$([ $tool_status = 124 ] && echo " (timed out)") ($(grep \
        -m 1 -E "ERROR SUMMARY|RACECHECK SUMMARY" "/tmp/sanitize_$tool.txt" | sed 's/=* *//'))"
    done
  fi
fi

if [ $tune_backward = 1 ]; then
  echo "== backward launch-config sweep, then fwd+bwd with the best against the baselines"
  timed "${TUNE_TIMEOUT:-240}" python3 bench/tune_backward.py --out "$out" \
    ${TUNE_PROVIDERS:+--providers $TUNE_PROVIDERS} 2>&1 | sed 's/^/tune_backward: /' | tee -a "$out/log.txt"
fi

# The sweeps come after the anchors preset: a sweep cut short by the time limit costs only itself.
if [ $tune_decode = 1 ]; then
  echo "== decode variants (default, pointer tiles, interleaved order) at the ANCHORS decode shapes, CUDA-graph replays"
  timed "${TUNE_TIMEOUT:-240}" python3 bench/tune_decode.py --json "$out/tune_decode.json" 2>&1 \
    | sed 's/^/tune_decode: /' | tee -a "$out/log.txt"
fi
if [ $tune_forward = 1 ]; then
  echo "== forward launch-config sweep at the ANCHORS training shapes"
  timed "${TUNE_TIMEOUT:-240}" python3 bench/tune_forward.py --json "$out/tune_forward.json" 2>&1 \
    | sed 's/^/tune_forward: /' | tee -a "$out/log.txt"
fi
if [ $tune_cuda = 1 ] && [ "$ext" = loads ]; then
  echo "== CUDA tile settings (forward and decode): timing each variant's build (waiting for the builds first)"
  rm -f "$out/tune_cuda.json"
  wait "$variant_builds"
  for variant in $variants; do
    parse_variant "$variant"
    # each build's own Hopper loops (ping-pong, other depths) get their own smoke run first
    PK_BROKEN_CUDA_LOOPS=$(smoke_loops "$copy") PYTHONPATH="$copy" timed "${TUNE_TIMEOUT:-240}" \
      python3 "$copy/bench/tune_cuda.py" --label "$label" --json "$out/tune_cuda.json" 2>&1 | tail -n 20 \
      | tee -a "$out/log.txt"
  done
fi

if [ $profile_cuda = 1 ] && [ "$ext" = loads ]; then
  echo "== ncu: the forward (CUDA's wgmma loop with each feed, Triton) and the wgmma decode's kernels (ncu.txt)"
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
  rm -rf "$out/ncu.txt" "$out/ncu_source.tar.gz" /tmp/ncu_source && mkdir -p /tmp/ncu_source
  [ -n "$ncu" ] || echo "no ncu found" > "$out/ncu.txt"
  forward="--op forward -B 8 -S 2048 -P 128"
  # label | Hopper loop (its smoke name; "-" for none) | loop choice (env) | kernel regex | launches | arguments
  # (a loop that hung or crashed in its smoke run is left out: under ncu it would only hang again)
  [ -n "$ncu" ] && while IFS='|' read -r label loop env kernel count args; do
    case " $PK_BROKEN_CUDA_LOOPS " in *" $loop "*) echo "==== $label: skipped (broken in its smoke run)"; continue ;; esac
    { echo "==== $label ($kernel) $args"
      env $env timeout "${PROFILE_TIMEOUT:-120}" "$ncu" --clock-control none -k "regex:$kernel" -c "$count" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --section SchedulerStats --section WarpStateStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        python3 bench/profile_case.py $args 2>&1 < /dev/null; } >> "$out/ncu.txt"  # (stdin: the loop's lines)
  done <<RUNS
forward cuda wgmma|wgmma|PK_CUDA_FORWARD=wgmma|forward_kernel|1|$forward --backend cuda
forward cuda wgmma-tma|wgmma-tma|PK_CUDA_FORWARD=wgmma-tma|forward_kernel|1|$forward --backend cuda
forward cuda wgmma-tma-persistent|wgmma-tma-persistent|PK_CUDA_FORWARD=wgmma-tma-persistent|forward_persistent_kernel|1|$forward --backend cuda
forward triton|-|PK_CUDA_FORWARD=|_prefix_attention_fwd|1|$forward --backend triton
decode cuda wgmma|decode-wgmma|PK_CUDA_DECODE=wgmma|decode|3|--op decode --backend cuda -B 256 -P 16384 -L 128 --heads 32/8
RUNS
  # Where each forward loop's warps stall, per SASS instruction (the source page; CPU sessions have no ncu): the
  # CSVs in ncu_source.tar.gz, a summary of each in ncu.txt (bench/ncu_source_summary.py)
  [ -n "$ncu" ] && for loop in wgmma wgmma-tma wgmma-tma-persistent; do
    case " $PK_BROKEN_CUDA_LOOPS " in *" $loop "*) continue ;; esac
    { echo "==== source page: forward cuda $loop, B=8 S=2048 P=128"
      PK_CUDA_FORWARD=$loop timeout "${PROFILE_TIMEOUT:-120}" "$ncu" --clock-control none -k "regex:forward_(persistent_)?kernel" \
        -c 1 --section SourceCounters -f -o "/tmp/ncu_source/$loop" python3 bench/profile_case.py $forward \
        --backend cuda > "/tmp/ncu_source/$loop.log" 2>&1 || tail -n 5 "/tmp/ncu_source/$loop.log"
      "$ncu" -i "/tmp/ncu_source/$loop.ncu-rep" --page source --print-source sass --csv \
        > "/tmp/ncu_source/$loop.csv" 2> "/tmp/ncu_source/$loop.err" || head -n 5 "/tmp/ncu_source/$loop.err"
      python3 bench/ncu_source_summary.py "/tmp/ncu_source/$loop.csv" 2>&1 | cut -c1-400
    } >> "$out/ncu.txt"
  done
  [ -n "$ncu" ] && tar -czf "$out/ncu_source.tar.gz" -C /tmp --exclude='*.ncu-rep' ncu_source
fi

echo "== summary ($card, commit $PREFIX_KERNELS_COMMIT)"
grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head -n 20
echo "cuda extension: $build_summary"
echo "Hopper loops that hung or crashed in their smoke run (left out of the rest): $smoke_summary"
grep -E "^smoke " "$out/log.txt" 2>/dev/null
echo "compute-sanitizer:$sanitize_summary"
echo "tests: $(tail -n 1 "$out/tests.txt") (exit $test_status)"
echo "anchors preset: $bench_summary"
[ -f "$out/anchors.md" ] && grep -E "Interrupted|WRONG|incomplete" "$out/anchors.md" | head -n 5
[ -f "$out/log.txt" ] && grep -E "^tune_(forward|decode): (B=|  \{)" "$out/log.txt" | head -n 30
[ -f "$out/log.txt" ] && grep -E "^tune_backward: best" "$out/log.txt"
[ -f "$out/log.txt" ] && grep -E "^r[0-9]+-k[0-9]+-b" "$out/log.txt"
[ -f "$out/ncu.txt" ] && grep -E "^====|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Warp Cycles Per Issued" \
  "$out/ncu.txt"
for md in "$out/anchors.md" "$out/tuned/anchors.md"; do
  [ -f "$md" ] && grep -E "^\| B=.*(ours|naive|flex)" "$md" | cut -d'|' -f2-8
  [ -f "$md" ] && grep -E "^\| (train_step|generate) \|" "$md" | cut -d'|' -f2-7,10
done
