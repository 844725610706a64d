"""The CUDA kernels (csrc/*.cu) through nvcc and ptxas for sm_80 and sm_90a, on the CPU: every instantiation
compiles without warnings, and its register spills and local-memory stack stay within the budgets below.

A budget is today's value rounded up: a change that, say, stops a fixed-trip loop over a register array from
unrolling (the arrays go to local memory: a 300-byte stack frame, seen once) fails here, not only later on a GPU.
No torch headers are needed for the kernels, so each file takes seconds.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("80", "90a")

# (kernel name fragment, head dim) -> most spill-store bytes allowed; the stack frame may hold the spills plus 8 B.
SPILL_BUDGET = {
    ("forward_kernel", 64): 0,
    ("forward_kernel", 128): 32,          # 254-255 registers, no spill today (36 B before idle warps skipped math)
    ("decode_partials_kernel", 64): 8,    # 4 B on sm_80 today
    ("decode_partials_kernel", 128): 32,  # 252-254 registers, no spill today
    ("decode_prefix_wgmma_kernel", 64): 0,   # sm_90a: 165 registers (a trap stub on sm_80)
    ("decode_prefix_wgmma_kernel", 128): 0,  # sm_90a: 203 registers
    ("decode_merge_kernel", 64): 0,
    ("decode_merge_kernel", 128): 0,
}
# The decode's 2-stage ring at head dim 64 (mangled "Li64ELi2E") runs only on cards with ~100 KiB of shared memory
# per SM (sm_86/89; an sm_90 takes 3 stages): there ptxas for sm_90a spills 24 B, where it never runs.
UNUSED_ON_ARCH_BUDGET = {("decode_partials_kernel", "Li64ELi2E", "90a"): 24}

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\w+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(source: Path, arch: str, tmp_path: Path, defines=()) -> str:
    result = subprocess.run(
        ["nvcc", "-std=c++20", "-O3", "--use_fast_math", "-Werror=all-warnings", "-Xptxas", "-v", *defines,
         f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", str(CSRC), "-c", str(source),
         "-o", str(tmp_path / f"{source.stem}-{arch}.o")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def kernels_in(report: str):
    """(mangled name, arch, stack bytes, spill store bytes) per compiled entry."""
    entry = None
    for line in report.splitlines():
        if m := ENTRY.search(line):
            entry = (m.group(1), m.group(2))
        elif (m := SPILLS.search(line)) and entry:
            yield entry[0], entry[1], int(m.group(1)), int(m.group(2))
            entry = None


@pytest.mark.compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source,arch,defines", [pytest.param(source, arch, (), id=f"{source}-{arch}")
                                                 for source in ("forward.cu", "decode.cu") for arch in ARCHS] +
                         # the Hopper loop's --tune-cuda candidates: its two warpgroups taking turns; one warpgroup
                         # with 64-key tiles (two blocks per SM: the launch bounds cap it at 255 registers)
                         [pytest.param("forward.cu", "90a", ("-DPK_HOPPER_PINGPONG=1",), id="forward.cu-90a-pingpong"),
                          pytest.param("forward.cu", "90a", ("-DPK_HOPPER_WARPGROUPS=1", "-DPK_HOPPER_KEYS=64"),
                                       id="forward.cu-90a-one-warpgroup")])
def test_kernels_compile_within_spill_budgets(source, arch, defines, tmp_path):
    seen = set()
    report = ptxas_report(CSRC / source, arch, tmp_path, defines)
    # e.g. C7520: wgmma serialized because it sits in a divergent path (the Hopper loop's overlap would be lost)
    assert "Potential Performance Loss" not in report, report
    for name, entry_arch, stack, spills in kernels_in(report):
        assert entry_arch == arch
        kind = next(k for k, _ in SPILL_BUDGET if k in name)
        head_dim = 128 if "Li128E" in name else 64
        budget = SPILL_BUDGET[(kind, head_dim)]
        budget = max([budget] + [b for (k, fragment, a), b in UNUSED_ON_ARCH_BUDGET.items()
                                 if k == kind and fragment in name and a == arch])
        assert spills <= budget and stack <= budget + 8, \
            f"{name} sm_{arch}: {spills} B spilled, {stack} B stack (budget {budget} B)"
        seen.add((kind, head_dim, "bf16" if "bfloat16" in name else "f16"))
    expected = {(k, d, t) for k, d in SPILL_BUDGET for t in ("bf16", "f16") if k.split("_")[0] in source}
    assert seen == expected, f"instantiations compiled: {sorted(seen)}"


def _ptx(source, arch, tmp_path):
    out = tmp_path / f"{source}-{arch}.ptx"
    result = subprocess.run(["nvcc", "-std=c++20", "-O3", "--use_fast_math", f"-arch=sm_{arch}", "-I", str(CSRC),
                             "-ptx", str(CSRC / source), "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text()


@pytest.mark.compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_hopper_forward_uses_wgmma_on_sm90a_only(tmp_path):
    """The forward's Hopper loops (attend_sm90.h) are wgmma (and TMA, mbarriers, setmaxnreg) in the sm_90a code and
    trap stubs elsewhere (the launcher never runs them there): a build that lost the sm_90a feature macro would
    silently trap on an H100."""
    hopper = _ptx("forward.cu", "90a", tmp_path)
    # S = Q K^T (m64n128, both from shared memory) and O += P V (A from registers) for f16 and bf16, head dims 64
    # and 128
    for dtype in ("f16", "bf16"):
        assert f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{dtype}.{dtype}" in hopper
        assert f"wgmma.mma_async.sync.aligned.m64n64k16.f32.{dtype}.{dtype}" in hopper
    assert "fence.proxy.async.shared::cta" in hopper
    # the TMA feed: tensor copies onto transaction barriers, and the producer's registers handed to the consumers
    for instruction in ("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes",
                        "mbarrier.try_wait.parity.shared::cta.b64", "mbarrier.arrive.expect_tx.shared::cta.b64",
                        "setmaxnreg.dec.sync.aligned.u32 24", "setmaxnreg.inc.sync.aligned.u32 240"):
        assert instruction in hopper, instruction
    other = _ptx("forward.cu", "80", tmp_path)
    assert "wgmma.mma_async" not in other and "trap;" in other
    assert "cp.async.bulk.tensor" not in other and "setmaxnreg" not in other


@pytest.mark.compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_hopper_decode_uses_wgmma_on_sm90a_only(tmp_path):
    """The decode's wgmma prefix programs (PK_CUDA_DECODE=wgmma): wgmma in the sm_90a code, a trap stub on sm_80."""
    hopper = _ptx("decode.cu", "90a", tmp_path)
    for dtype in ("f16", "bf16"):
        assert f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{dtype}.{dtype}" in hopper
    other = _ptx("decode.cu", "80", tmp_path)
    assert "wgmma.mma_async" not in other and "trap;" in other
