#!/usr/bin/env bash
# The ONE GPU check: GPU tests (bf16 included), then benchmarks; results to bench/results/<card>/ (and $OUT).
# Runs on the device image's own torch/triton/transformers (nothing is installed there). No network needed.
# Usage: bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out="${OUT:-$PWD/.out}"; mkdir -p "$out"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
results="bench/results/$card"; mkdir -p "$results"
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 - <<PY | tee "$out/versions.txt"
import torch, triton
try:
    import transformers; tv = transformers.__version__
except ImportError:
    tv = "absent"
print(f"card={torch.cuda.get_device_name()} sms={torch.cuda.get_device_properties(0).multi_processor_count} "
      f"torch={torch.__version__} triton={triton.__version__} transformers={tv} commit=$commit")
PY

echo "== GPU tests"
timeout 300 python3 -m pytest -q -m "not compile" -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tail -n 25 | tee "$out/tests.txt"
test_status=${PIPESTATUS[0]}

echo "== forward config sweep at the ANCHORS training shapes"
timeout 240 python3 bench/tune_forward.py --json "$out/tune_forward.json" 2>&1 | tee "$out/tune_forward.txt"
cp "$out/tune_forward.json" "$results/tune_forward.json" 2>/dev/null

echo "== summary ($card, commit $commit)"
echo "tests: $(tail -n 1 "$out/tests.txt") (exit $test_status)"
grep -E "^B=|^  \{" "$out/tune_forward.txt" | head -n 30
