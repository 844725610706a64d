"""Every kernel configuration a launcher can choose compiles for sm_80 and sm_90 (fp16, bf16, fp32).

Runs prefix_kernels.triton.compile_check in a subprocess: the compiler needs @triton.jit kernels defined
without TRITON_INTERPRET, which this test process sets. Triton's cache (~/.triton) makes reruns fast.
"""
import os
import subprocess
import sys

import pytest


def run_compile_check(name_filter: str):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "prefix_kernels.triton.compile_check", "--filter", name_filter],
                            capture_output=True, text=True, env=env, timeout=1800)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.compile
def test_forward_compiles_for_sm80_and_sm90_without_spills_in_main_configs():
    code, log = run_compile_check("fwd-")
    assert code == 0, log[-4000:]
    lines = [line for line in log.splitlines() if ": ok " in line]
    assert any("bfloat16" in line and "sm_90" in line for line in lines), log[-2000:]
    # The training/prefill configs (fp16/bf16, head dim 64/128, no optional features) must not spill.
    main = [line for line in lines if "-none" in line and ("-d128-m128" in line or "-d64-m128" in line)
            and "float32" not in line]
    assert main, log[-2000:]
    for line in main:
        assert "spills=0" in line, line
    # No configuration may spill more than a token amount (a bad fp32 tiling once spilled ~60 KB).
    for line in lines:
        spilled = int(line.split("spills=")[1].split()[0])
        assert spilled <= 256, line


@pytest.mark.compile
def test_decode_and_merge_compile_for_sm80_and_sm90_with_bounded_spills():
    for name_filter in ("dec-", "merge-"):
        code, log = run_compile_check(name_filter)
        assert code == 0, log[-4000:]
        lines = [line for line in log.splitlines() if ": ok " in line]
        assert lines, log[-2000:]
        for line in lines:
            # The serving configs (fp16/bf16 on sm_90) must not spill at all; nothing may spill much anywhere.
            spilled = int(line.split("spills=")[1].split()[0])
            if "sm_90" in line and "float32" not in line:
                assert spilled == 0, line
            assert spilled <= 256, line


@pytest.mark.compile
def test_lean_training_kernels_compile_for_sm80_and_sm90_without_spills():
    code, log = run_compile_check("lean-")
    assert code == 0, log[-4000:]
    lines = [line for line in log.splitlines() if ": ok " in line]
    assert any("lean-xent-bwd-bfloat16-v128256" in line and "sm_90" in line for line in lines), log[-2000:]
    for line in lines:
        spilled = int(line.split("spills=")[1].split()[0])
        # The widest row that also sums the weight's gradient (a trained norm of a 16384-wide model) keeps four
        # row vectors at 32 warps and spills a little; everything else stays in registers.
        assert spilled == 0 or ("-w16384-dx1-dw1" in line and spilled <= 128), line
