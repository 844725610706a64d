#!/usr/bin/env bash
# The ONE GPU check: GPU tests (bf16 included), then the ANCHORS benchmarks against every baseline in the same
# run; results to bench/results/<card>/ (and to $OUT on the device machine). Prints a short table last.
# Runs on the machine's own torch/triton/transformers (nothing is installed). Needs no network.
# Usage: bash bench/gpu_check.sh [--tune]    (--tune adds the forward launch-config sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out="${OUT:-$PWD/.out}"; mkdir -p "$out"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
results="bench/results/$card"; mkdir -p "$results"
export PREFIX_KERNELS_COMMIT="${PREFIX_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
python3 - <<PY | tee "$out/versions.txt"
import torch, triton
try:
    import transformers; tv = transformers.__version__
except ImportError:
    tv = "absent"
print(f"card={torch.cuda.get_device_name()} sms={torch.cuda.get_device_properties(0).multi_processor_count} "
      f"torch={torch.__version__} triton={triton.__version__} transformers={tv} commit=$PREFIX_KERNELS_COMMIT")
PY

echo "== GPU tests"
# pytest-xdist (on the GPU image) spreads the tests over processes sharing the GPU; the kernels' first
# compilations dominate the wall time.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m "not compile" -p no:cacheprovider $parallel ${GPU_TESTS:-tests} 2>&1 \
  | tail -n 30 | tee "$out/tests.txt"
test_status=${PIPESTATUS[0]}

if [ "${1:-}" = "--tune" ]; then
  echo "== forward config sweep at the ANCHORS training shapes"
  timeout 240 python3 bench/tune_forward.py --json "$out/tune_forward.json" 2>&1 | tee "$out/tune_forward.txt"
fi

echo "== benchmarks: anchors preset"
timeout "${BENCH_TIMEOUT:-300}" python3 -m prefix_kernels.bench --preset anchors --out "$out" 2>&1 | tail -n 60 \
  | tee "$out/bench_log.txt"
bench_status=${PIPESTATUS[0]}
cp "$out"/*.json "$out"/*.md "$out"/*.txt "$results"/ 2>/dev/null

echo "== summary ($card, commit $PREFIX_KERNELS_COMMIT)"
echo "tests: $(tail -n 1 "$out/tests.txt") (exit $test_status); bench exit $bench_status"
[ -f "$out/anchors.md" ] && cat "$out/anchors.md"
