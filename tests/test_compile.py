"""Every kernel configuration a launcher can choose compiles for sm_80 and sm_90 (fp16, bf16, fp32).

Through prefix_kernels.triton.compile_check in a subprocess (helpers.compile_check_spills).
"""
import pytest

from helpers import compile_check_spills


@pytest.mark.compile
def test_forward_compiles_for_sm80_and_sm90_without_spills_in_main_configs():
    spills, log = compile_check_spills("fwd-")
    lines = list(spills)
    assert any("bfloat16" in line and "sm_90" in line for line in lines), log[-2000:]
    # The training/prefill configs (fp16/bf16, head dim 64/128, no optional features) must not spill.
    main = [line for line in lines if "-none" in line and ("-d128-m128" in line or "-d64-m128" in line)
            and "float32" not in line]
    assert main, log[-2000:]
    for line in main:
        assert "spills=0" in line, line
    # No configuration may spill more than a token amount (a bad fp32 tiling once spilled ~60 KB).
    for line, spilled in spills.items():
        assert spilled <= 256, line


@pytest.mark.compile
def test_decode_and_merge_compile_for_sm80_and_sm90_with_bounded_spills():
    for name_filter in ("dec-", "merge-"):
        spills, log = compile_check_spills(name_filter)
        assert spills, log[-2000:]
        for line, spilled in spills.items():
            # The serving configs (fp16/bf16 on sm_90) must not spill at all; nothing may spill much anywhere.
            if "sm_90" in line and "float32" not in line:
                assert spilled == 0, line
            assert spilled <= 256, line


@pytest.mark.compile
def test_lean_training_kernels_compile_for_sm80_and_sm90_without_spills():
    spills, log = compile_check_spills("lean-")
    assert any("lean-xent-bwd-bfloat16-v128256" in line and "sm_90" in line for line in spills), log[-2000:]
    for line, spilled in spills.items():
        # The widest row that also sums the weight's gradient (a trained norm of a 16384-wide model) keeps four
        # row vectors at 32 warps and spills a little; everything else stays in registers.
        assert spilled == 0 or ("-w16384-dx1-dw1" in line and spilled <= 128), line
