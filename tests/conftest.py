"""Test setup: where there is no GPU, the Triton kernels run under the interpreter.

TRITON_INTERPRET is read when @triton.jit runs, so it is set here, before any test imports prefix_kernels.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def device():
    return DEVICE


def _dtype_param(dtype):
    marks = []
    if dtype == torch.bfloat16 and not HAS_CUDA:
        marks.append(pytest.mark.skip(reason="bf16 arithmetic is broken in the Triton interpreter; tested on GPU"))
    return pytest.param(dtype, id=str(dtype).removeprefix("torch."), marks=marks)


KERNEL_DTYPES = [_dtype_param(d) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs each run, but reproducible from the printed seed when a test fails:
    # PREFIX_KERNELS_TEST_SEED=<seed> python3 -m pytest <that test>.
    seed = int(os.environ.get("PREFIX_KERNELS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"torch seed: {seed}")  # pytest shows this on failure
    yield


# The CUDA kernels read their loop choices from the environment at each call, and bench scripts the tests import set
# them directly: whatever a test leaves behind would silently change the loop of every later test in its process.
_LOOP_VARIABLES = ("PK_CUDA_FORWARD", "PK_CUDA_DECODE", "PK_CUDA_DECODE_OWN", "PK_BROKEN_CUDA_LOOPS")
# The card the launchers plan for (its SMs; the emulated grid limit): each test that wants another sets them, the
# others get the defaults
_CARD_VARIABLES = ("PK_CUDA_SMS", "PK_EMU_SMS", "PK_EMU_MAX_GRID_Y")


@pytest.fixture(autouse=True)
def _loop_choices_restored():
    saved = {name: os.environ.get(name) for name in _LOOP_VARIABLES + _CARD_VARIABLES}
    for name in _CARD_VARIABLES:
        os.environ.pop(name, None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
