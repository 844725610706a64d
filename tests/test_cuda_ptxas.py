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
    # sm_90a only (a trap stub on sm_80): the TMA producer's work loop at its 24 registers (setmaxnreg) spills its
    # counters, 12 B at D = 64 and 24 at 128: a few local loads and stores per work, none in the consumers' loop
    ("forward_persistent_kernel", 64): 16,
    ("forward_persistent_kernel", 128): 32,
    ("decode_partials_kernel", 64): 0,    # 4 B on sm_80 before the softmax's FFMA scaling
    ("decode_partials_kernel", 128): 32,  # 252-254 registers, no spill today
    ("decode_prefix_wgmma_kernel", 64): 0,   # sm_90a: 182 registers (a trap stub on sm_80)
    ("decode_prefix_wgmma_kernel", 128): 0,  # sm_90a: 233 registers
    ("decode_merge_kernel", 64): 0,
    ("decode_merge_kernel", 128): 0,
}

ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\w+)'")
HEAD_DIM = re.compile(r"kernelI(?:6__half|13__nv_bfloat16)Li(\d+)E")
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
        # the head dim is the kernel's second template argument (a later one, such as a 128-key tile, may also read
        # Li128E)
        head_dim = int(HEAD_DIM.search(name).group(1))
        budget = SPILL_BUDGET[(kind, head_dim)]
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


def _cuobjdump():
    """CUDA's cuobjdump: on the PATH, or the copy Triton ships (this machine's toolkit has nvcc and ptxas only)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton.backends.nvidia as nvidia_backend
    except ImportError:
        return None
    bundled = Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def _main_loop(sass_function: str) -> list[str]:
    """The instructions of a kernel's main loop: the backward branch whose body holds the most wgmmas (HGMMA)."""
    instructions = [(int(m.group(1), 16), m.group(2).strip())
                    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass_function)]
    index = {address: i for i, (address, _) in enumerate(instructions)}
    best = []
    for i, (address, text) in enumerate(instructions):
        target = re.search(r"BRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            body = [t for _, t in instructions[index[int(target.group(1), 16)]:i + 1]]
            if sum("HGMMA" in t for t in body) > sum("HGMMA" in t for t in best):
                best = body
    return best


@pytest.mark.compile
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found")
@pytest.mark.parametrize("defines,keys,warp_groups", [
    pytest.param((), 128, 2, id="shipped"),
    # the --tune-cuda candidate: one warpgroup, 64-key tiles, two blocks per SM
    pytest.param(("-DPK_HOPPER_WARPGROUPS=1", "-DPK_HOPPER_KEYS=64"), 64, 1, id="one-warpgroup")])
def test_hopper_forward_loop_keeps_the_tensor_cores_fed(defines, keys, warp_groups, tmp_path):
    """The SASS of the Hopper forward with the cp.async feed (overlapped loop) for sm_90a, per dtype and head dim:
    - the wgmmas are issued nearly back to back: one descriptor per tile, stepped by constants (descriptor_plus;
      a matrix_descriptor per k-step put ~14 instructions between the scores' consecutive wgmmas);
    - every copy of the tile loaded ahead is issued after the step's wgmmas and before the wait for its scores
      (the refill runs while the tensor cores work; before, the copies sat between the barrier and the wgmmas)."""
    cubin = tmp_path / "forward-90a.cubin"
    result = subprocess.run(["nvcc", "-std=c++20", "-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
                             *defines, "-I", str(CSRC), "-cubin", str(CSRC / "forward.cu"), "-o", str(cubin)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    # HopperAttention<T, D, keys, 3 stages, overlap, no TMA, no ping-pong, warp_groups>
    pattern = re.compile(rf"HopperAttentionI\w+?Li(\d+)ELi{keys}ELi3ELb1ELb0ELb0ELi{warp_groups}E")
    checked = 0
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        match = pattern.search(function.splitlines()[0])
        if not match:
            continue
        head_dim = int(match.group(1))
        loop = _main_loop(function)
        wgmmas = [i for i, text in enumerate(loop) if "HGMMA" in text]
        assert len(wgmmas) == head_dim // 16 + keys // 16, (head_dim, len(wgmmas))  # S's k-steps, then P.V's
        gaps = [b - a - 1 for a, b in zip(wgmmas, wgmmas[1:])]  # today 5-6 on average, ~9 with a descriptor a step
        assert sum(gaps) <= 7 * len(gaps), f"d{head_dim}: instructions between consecutive wgmmas: {gaps}"
        wait_for_scores = next(i for i in range(wgmmas[-1], len(loop)) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in loop[i])
        copies = sum("LDGSTS" in text for text in loop[wgmmas[-1]:wait_for_scores])
        assert copies == 2 * keys * (head_dim // 8) // (128 * warp_groups), \
            f"d{head_dim}: {copies} copies while the wgmmas run"
        checked += 1
    assert checked == 4, "f16 and bf16 at head dims 64 and 128"
