"""The host-side CUDA emulator (csrc/emulator/) passes its self-test: mma / ldmatrix fragment layouts against CUTLASS's
layouts and a plain matmul, shfl_xor, sync_threads, and deadlock / bad-address detection; under each thread schedule,
with the portable context switch, and under AddressSanitizer.

Builds csrc/emulator/selftest.cpp + emulator.cpp with g++ into a temporary folder and runs it. Needs no GPU: only g++
and the CUDA toolkit's cuda_fp16.h / cuda_bf16.h (host-includable headers).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATOR = CSRC / "emulator"


def _cuda_include_dir():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file():
            return c
    return None


CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
CUDA_INCLUDE = _cuda_include_dir()

pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no g++ (or $CXX) to build the CUDA emulator's self-test"),
    pytest.mark.skipif(
        CUDA_INCLUDE is None,
        reason="no cuda_fp16.h / cuda_bf16.h found ($CUDA_HOME/include, nvcc's include dir, /usr/local/cuda/include)",
    ),
]


def _run(cmd, timeout):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _compile(args, out):
    cmd = [CXX, "-std=c++17", "-O1", f"-I{CUDA_INCLUDE}", f"-I{CSRC}", *args, "-o", str(out)]
    rc, output = _run(cmd, timeout=120)
    assert rc == 0, f"compiling failed:\n{' '.join(cmd)}\n{output}"


@pytest.fixture(scope="module")
def selftest_object(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_emulator")
    obj = tmp / "selftest.o"
    _compile(["-c", str(EMULATOR / "selftest.cpp")], obj)
    return obj


def _run_selftest(exe, schedule=None):
    env = dict(os.environ)
    env.pop("PK_EMU_SCHEDULE", None)
    if schedule:
        env["PK_EMU_SCHEDULE"] = schedule
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"the CUDA emulator's self-test failed (exit code {proc.returncode}):\n{output}"


@pytest.fixture(scope="module")
def selftest_exe(selftest_object, tmp_path_factory):
    exe = tmp_path_factory.mktemp("cuda_emulator_exe") / "selftest"
    _compile([str(selftest_object), str(EMULATOR / "emulator.cpp")], exe)
    return exe


@pytest.mark.parametrize("schedule", [None, "reverse", "random:1"])
def test_emulator_selftest(selftest_exe, schedule):
    """The default build (the hand-written context switch on x86-64), under each thread schedule."""
    _run_selftest(selftest_exe, schedule)


def test_emulator_selftest_ucontext(selftest_object, tmp_path):
    """The portable swapcontext fallback (the default on processors other than x86-64)."""
    exe = tmp_path / "selftest_ucontext"
    _compile(["-DPK_EMU_UCONTEXT", str(selftest_object), str(EMULATOR / "emulator.cpp")], exe)
    _run_selftest(exe)


def _asan_works(tmp):
    src = tmp / "asan_probe.cpp"
    src.write_text("int main() { return 0; }\n")
    rc, _ = _run([CXX, "-fsanitize=address", str(src), "-o", str(tmp / "asan_probe")], timeout=60)
    return rc == 0


def test_emulator_selftest_under_asan(tmp_path):
    """Under AddressSanitizer the fibers announce their stack switches: no false reports, and kernels run in the
    emulator can be built with -fsanitize=address to catch out-of-bounds global-memory accesses."""
    if not _asan_works(tmp_path):
        pytest.skip("g++ -fsanitize=address does not link here (no libasan)")
    exe = tmp_path / "selftest_asan"
    _compile(["-fsanitize=address", str(EMULATOR / "selftest.cpp"), str(EMULATOR / "emulator.cpp")], exe)
    _run_selftest(exe)
