"""Every kernel configuration a launcher can choose compiles for sm_80 and sm_90 (fp16, bf16, fp32).

Through prefix_kernels.triton.compile_check in a subprocess (helpers.compile_check_spills).
"""
import os
import re
import subprocess
import sys

import pytest

from helpers import TRITON_39, compile_check_spills


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
            # The serving configs (fp16/bf16 on sm_90) must not spill at all (Triton 3.9: 144 B at head dim 256
            # with every mask feature on; the window reaching into the prefix, an edge of sliding-window models,
            # masks every prefix tile: 76 B at head dim 128); nothing may spill much anywhere.
            if "sm_90" in line and "float32" not in line and "-prefix-window" not in line:
                assert spilled == 0 or (TRITON_39 and "-d256-" in line and spilled <= 144), line
            assert spilled <= 256, line
        if name_filter == "dec-":
            _single_part_launches_compile_one_part(spills)


def _single_part_launches_compile_one_part(report_lines):
    """DecodeConfig.own_launch's launches each compile their own part's code only: every own launch needs less
    shared memory than any prefix launch of its head dim (had the prefix code been compiled into it, it would hold
    the prefix tiles too)."""
    launched = {re.search(r"-d(\d+)-", line).group(1) for line in report_lines if "-launch-" in line}
    assert "128" in launched, launched
    for arch in ("sm_80", "sm_90"):
        for block_d in launched:
            def shared(kind):
                return [int(re.search(r"shared=(\d+)", line).group(1)) for line in report_lines
                        if f" {arch} " in line and f"-d{block_d}-" in line and f"-{kind}-launch-" in line]
            assert shared("own") and shared("prefix"), (arch, block_d)
            assert max(shared("own")) < min(shared("prefix")), (arch, block_d, shared("own"), shared("prefix"))


@pytest.mark.compile
def test_lean_training_kernels_compile_for_sm80_and_sm90_without_spills():
    spills, log = compile_check_spills("lean-")
    assert any("lean-xent-bwd-bfloat16-v128256" in line and "sm_90" in line for line in spills), log[-2000:]
    for line, spilled in spills.items():
        # The widest row that also sums the weight's gradient (a trained norm of a 16384-wide model) keeps four
        # row vectors at 32 warps and spills a little; everything else stays in registers.
        assert spilled == 0 or ("-w16384-dx1-dw1" in line and spilled <= 128), line


# Compiles the rotary kernels for sm_90 in a subprocess (no TRITON_INTERPRET there) and prints the float
# instructions of each PTX; Triton's cache makes reruns fast.
_ROPE_FLOAT_OPS = """
import re
from prefix_kernels.triton import compile_check, lean_cases
for name, fn, args, kwargs in lean_cases.lean_cases():
    if name.startswith("lean-rope-") and name.endswith("-s4096"):
        ptx = compile_check.compile_for_target(fn, args, kwargs, 90).asm["ptx"]
        print(name, sorted(set(re.findall(r"\\b(?:fma|mul|add|sub)\\.rn\\.[a-z0-9]+", ptx))))
"""


@pytest.mark.compile
def test_rotary_kernel_rounds_each_product_like_stock_on_sm90():
    """transformers rounds q*cos and rotate_half(q)*sin to the tensor's dtype before the sum. LLVM narrows such a
    product to a bf16/fp16 multiply and, with FP fusion on, fuses it with the sum into one FMA (one rounding
    fewer): on the H200 the kernel came out 1 ulp off stock. The launch turns fusion off; no FMA may appear."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _ROPE_FLOAT_OPS], capture_output=True, text=True, env=env,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert len(lines) >= 6 and any("bfloat16" in line for line in lines), result.stdout
    for line in lines:
        assert "mul.rn" in line and "fma" not in line, line


@pytest.mark.parametrize("arch", [80, 90])
def test_a_ptxas_failure_is_an_error_not_a_missing_count(arch):
    """A kernel whose PTX the resource check cannot assemble fails the compile check. Triton 3.9 emits PTX that
    only its newer bundled ptxas reads for sm_90; with the older one every sm_90 case passed as "regs=None
    spills=None" until a test tried to read the numbers. compile_check now takes the ptxas Triton itself uses."""
    from prefix_kernels.triton import compile_check

    with pytest.raises(RuntimeError, match="did not report registers and spills"):
        compile_check.ptxas_usage(".version 99.9\n.target sm_80\n.address_size 64\n", arch)
