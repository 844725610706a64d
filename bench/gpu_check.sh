#!/usr/bin/env bash
# The ONE GPU check: the GPU tests (bf16 included) and the benchmarks against every baseline in the same run;
# results to bench/results/<card>/ (and to $OUT on the device machine). Prints a short summary last.
# Runs on the machine's own torch/triton/transformers (nothing is installed). Needs no network.
#
# Usage: bash bench/gpu_check.sh [--tune-forward] [--tune-backward] [--no-bench]
#   default          tests, then the anchors preset (forward, fwd+bwd, decode, training step, generate)
#   --tune-forward   also sweep the forward's launch configs (bench/tune_forward.py)
#   --tune-backward  also sweep the backward's launch configs, then fwd+bwd with the best vs the baselines
#   --no-bench       skip the anchors preset
# Environment: GPU_TESTS (pytest targets, default tests), TEST_TIMEOUT, BENCH_TIMEOUT (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out="${OUT:-$PWD/bench/results/$card}"; mkdir -p "$out"   # $OUT: the device tool's folder that comes back
export PREFIX_KERNELS_COMMIT="${PREFIX_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
tune_forward=0; tune_backward=0; bench=1
for arg in "$@"; do
  case "$arg" in
    --tune-forward) tune_forward=1 ;;
    --tune-backward) tune_backward=1 ;;
    --no-bench) bench=0 ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
python3 - <<PY | tee "$out/versions.txt"
import torch, triton
try:
    import transformers; tv = transformers.__version__
except ImportError:
    tv = "absent"
print(f"card={torch.cuda.get_device_name()} sms={torch.cuda.get_device_properties(0).multi_processor_count} "
      f"torch={torch.__version__} triton={triton.__version__} transformers={tv} commit=$PREFIX_KERNELS_COMMIT")
PY

if [ $tune_forward = 1 ]; then
  echo "== forward launch-config sweep at the ANCHORS training shapes"
  timeout "${TUNE_TIMEOUT:-240}" python3 bench/tune_forward.py --json "$out/tune_forward.json" 2>&1 \
    | tee "$out/tune_forward.txt"
fi
echo "== GPU tests"
# pytest-xdist (on the GPU image) spreads the tests over processes sharing the GPU; the kernels' first
# compilations dominate the wall time.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -rf --tb=short -m "not compile" -p no:cacheprovider $parallel \
  ${GPU_TESTS:-tests} > "$out/tests.txt" 2>&1
test_status=$?

if [ $tune_backward = 1 ]; then
  echo "== backward launch-config sweep, then fwd+bwd with the best against the baselines"
  timeout "${TUNE_TIMEOUT:-240}" python3 bench/tune_backward.py --out "$out" \
    ${TUNE_PROVIDERS:+--providers $TUNE_PROVIDERS} 2>&1 | tee "$out/tune_backward.txt"
fi
if [ $bench = 1 ]; then
  echo "== benchmarks: anchors preset"
  timeout "${BENCH_TIMEOUT:-300}" python3 -m prefix_kernels.bench --preset anchors --out "$out" --quiet 2>&1 \
    | tail -n 20 | tee "$out/bench_log.txt"
fi

echo "== summary ($card, commit $PREFIX_KERNELS_COMMIT)"
grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head -n 20
echo "tests: $(tail -n 1 "$out/tests.txt") (exit $test_status)"
[ -f "$out/tune_forward.txt" ] && grep -E "^B=|^  \{" "$out/tune_forward.txt" | head -n 16
[ -f "$out/tune_backward.txt" ] && grep -E "^best" "$out/tune_backward.txt"
for md in "$out/anchors.md" "$out/tuned/anchors.md"; do
  [ -f "$md" ] && grep -E "^\| B=.*(ours|naive|flex)" "$md" | cut -d'|' -f2-8
done
