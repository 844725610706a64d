"""Kernels launch on their tensors' GPU, not on whichever is current (a model split across GPUs), and with their
launch options fixed (FP fusion)."""
import contextlib
import re
import types
from pathlib import Path

import pytest
import torch

from prefix_kernels.triton import device as launch


def test_launch_device_switches_only_when_the_tensor_is_elsewhere(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def record(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", record)
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with launch.launch_device(on_gpu1):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch.launch_device(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))):
        pass
    with launch.launch_device(torch.zeros(1)):  # CPU (the interpreter): nothing to switch
        pass
    assert entered == [torch.device("cuda", 1)]

    calls = []
    wrapped = launch.on_first_tensor_device(lambda first, *a, **k: calls.append((first, a, k, list(entered))) or 7)
    assert wrapped(on_gpu1, 2, x=3) == 7
    assert calls == [(on_gpu1, (2,), {"x": 3}, [torch.device("cuda", 1)] * 2)]  # ran inside the switch


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    import prefix_kernels
    from prefix_kernels.reference import prefix_attention_reference
    from prefix_kernels.triton import lean_ops

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q = torch.randn(2, 4, 33, 64, device=dev, dtype=torch.bfloat16)
    k = v = torch.randn(2, 2, 33, 64, device=dev, dtype=torch.bfloat16)
    pk = pv = torch.randn(2, 17, 64, device=dev, dtype=torch.bfloat16)
    for seq in (33, 1):  # the forward and the decode path
        out = prefix_kernels.prefix_attention(q[:, :, :seq], k, v, pk, pv, causal=True, backend="triton")
        want = prefix_attention_reference(q[:, :, :seq].float(), k.float(), v.float(), pk.float(), pv.float(),
                                          causal=True)
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    x = torch.randn(5, 64, device=dev)
    out, _ = lean_ops.rms_norm_forward(x, torch.ones(64, device=dev), 1e-6)
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_every_launch_sets_fp_fusion_explicitly():
    """Triton 3.9 warns at the first launch that leaves enable_fp_fusion unset, and 3.10 turns FMA contraction off
    by default (every kernel's speed and rounding would change): launch() always passes it, a kernel's own choice
    (the rotary embedding's False) wins, and no launcher bypasses launch()."""
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, args, kwargs))

    launch.launch(Kernel(), (3,), (1, 2), {"BLOCK": 4})
    launch.launch(Kernel(), (1,), (), {"enable_fp_fusion": False})
    assert seen == [((3,), (1, 2), {"enable_fp_fusion": True, "BLOCK": 4}), ((1,), (), {"enable_fp_fusion": False})]
    triton_dir = Path(launch.__file__).parent
    direct = [f"{path.name}: {m.group(0)}" for path in triton_dir.glob("*.py") if path.name != "device.py"
              for m in re.finditer(r"\w+\[[^\]]*\]\(\*args", path.read_text())]
    assert not direct, f"launches that bypass launch(): {direct}"
