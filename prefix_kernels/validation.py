"""Argument checks for prefix_attention: every error is raised here, before any kernel launch.

Each message names the argument, what was given and what is expected.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .triton.configs import DECODE_MAX_SEQ_Q  # (configs.py imports no Triton)

# The kernels compute in base 2: scale * log2(e), a float32 on the device, must be a normal number there.
_LOG2E = 1.4426950408889634
_FLOAT32 = torch.finfo(torch.float32)


def _is_normal_float32(value: int | float) -> bool:
    """Positive and a normal float32. False for NaN, negatives, and ints beyond a float."""
    try:
        return _FLOAT32.tiny <= float(value) <= _FLOAT32.max
    except OverflowError:
        return False


def _is_kernel_scale(scale: int | float) -> bool:
    """The kernels take scale * log2(e) as a float32 and flush denormals: 0 or inf there would turn masked scores
    (-inf * 0) into NaN."""
    return _is_normal_float32(scale) and _is_normal_float32(float(scale) * _LOG2E)


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256
BACKENDS = ("auto", "triton", "cuda", "torch")


@dataclass
class PrefixAttentionCall:
    """A validated call: prefix tensors always 4-D [N, Hkv, P, D], scale always a float."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    causal: bool
    scale: float
    key_padding_mask: torch.Tensor | None
    prefix_index: torch.Tensor | None
    prefix_lens: torch.Tensor | None
    window: int | None
    softcap: float | None
    window_includes_prefix: bool = False  # always False without a window
    left_padding: torch.Tensor | None = None  # only with window_includes_prefix
    sinks: torch.Tensor | None = None  # [Hq]: the Triton forward's epilogue, the decode's merge, or after CUDA

    def options(self) -> dict:
        """The keyword arguments every backend takes besides the five tensors."""
        return dict(causal=self.causal, scale=self.scale, key_padding_mask=self.key_padding_mask,
                    prefix_index=self.prefix_index, prefix_lens=self.prefix_lens, window=self.window,
                    softcap=self.softcap, window_includes_prefix=self.window_includes_prefix,
                    left_padding=self.left_padding)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.q, self.k, self.v, self.prefix_k, self.prefix_v))

    @property
    def uses_decode(self) -> bool:
        """The decode strategy (prefix batched across sequences, split-K, LSE merge; Triton and CUDA) serves
        short query lengths when no gradient is needed (it has no backward)."""
        return self.q.shape[2] <= DECODE_MAX_SEQ_Q and not self.needs_grad


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_shape(name, tensor, expected, meaning):
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(tensor.shape)}")


def _require_device(name, tensor, device):
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but q is on {device}; all tensors must be on one device")


def values_checkable(tensor) -> bool:
    # Reading values forces a host sync, which is illegal while a CUDA graph is being captured, and a graph break
    # (an error under fullgraph=True) while torch.compile traces.
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


# Index tensors whose values the library knows to be in range: (name, id) -> (weak reference, version counter or None
# for an inference tensor, (lower, upper)), each entry dropped with its tensor. A model calls the attention once per
# layer with the same prefix_index / prefix_lens / left_padding of a serving cache, and reading their values syncs
# the host with the device: the cache reads its own once per forward (check_and_trust_index_values), and what the
# library derives from them (the left padding, the index repeated for beams) is never read; the layers skip them.
# A caller's own tensor is read on every call: a write through .data or numpy would not show in its version counter.
_TRUSTED: dict[tuple, tuple] = {}


def _version(tensor):
    return None if tensor.is_inference() else tensor._version


def trust_index_values(name, tensor, lower, upper):
    """For library code that made `tensor` (an index argument of prefix_attention) with values in [lower, upper]:
    validate() skips reading them while the tensor is unchanged (an in-place write bumps its version counter;
    inference tensors have none, so the library trusts only those no caller holds). Nothing is trusted while
    compiling or capturing a CUDA graph, where the tensor may hold no values yet."""
    if not values_checkable(tensor):
        return
    key = (name, id(tensor))
    reference = weakref.ref(tensor, lambda _, key=key: _TRUSTED.pop(key, None))
    _TRUSTED[key] = (reference, _version(tensor), (lower, upper))


def is_trusted(name, tensor, lower, upper) -> bool:
    """Whether `tensor` is trusted (trust_index_values) to lie within [lower, upper]."""
    entry = _TRUSTED.get((name, id(tensor)))
    return entry is not None and entry[0]() is tensor and entry[1] == _version(tensor) and \
        lower <= entry[2][0] and entry[2][1] <= upper


def _read_and_check(name, tensor, lower, upper, upper_meaning):
    low, high = torch.stack(torch.aminmax(tensor)).tolist()  # one host sync for both
    if low < lower or high > upper:
        raise ValueError(f"{name} values must lie in [{lower}, {upper}] ({upper_meaning}), "
                         f"got values in [{low}, {high}]")


def check_index_values(name, tensor, upper, upper_meaning, lower=0):
    """A ValueError naming `name` unless its values lie in [lower, upper]: one host sync (none for a trusted
    tensor, nor while compiling or capturing a CUDA graph, where values cannot be read)."""
    if tensor.numel() and values_checkable(tensor) and not is_trusted(name, tensor, lower, upper):
        _read_and_check(name, tensor, lower, upper, upper_meaning)


def check_and_trust_index_values(name, tensor, upper, upper_meaning, lower=0):
    """check_index_values, reading the values even where trusted before, then trusting them: for library code that
    checks a tensor of its own once (a serving cache, once per forward) for the many calls that follow."""
    if tensor.numel() and values_checkable(tensor):
        _read_and_check(name, tensor, lower, upper, upper_meaning)
        trust_index_values(name, tensor, lower, upper)


def _check_index_tensor(name, tensor, length, length_meaning, device, upper, upper_meaning, lower=0):
    _require_tensor(name, tensor)
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {tensor.dtype}")
    _require_shape(name, tensor, (length,), length_meaning)
    _require_device(name, tensor, device)
    check_index_values(name, tensor, upper, upper_meaning, lower)


def validate(q, k, v, prefix_k, prefix_v, *, causal, scale, key_padding_mask, prefix_index, prefix_lens,
             window, softcap, backend, window_includes_prefix=False, left_padding=None,
             sinks=None) -> PrefixAttentionCall:
    for name, value in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        _require_tensor(name, value)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, Hq, S, D], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be 4-D [B, Hkv, L, D], got shape {tuple(k.shape)}")
    batch, heads_q, seq_q, head_dim = q.shape
    _, heads_kv, seq_k, _ = k.shape
    _require_shape("k", k, (batch, heads_kv, seq_k, head_dim), "[B, Hkv, L, D] with q's B and D")
    _require_shape("v", v, k.shape, "k's shape [B, Hkv, L, D]")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, tensor in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but q has {q.dtype}; they must match")
        _require_device(name, tensor, q.device)
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"the number of query heads (q.shape[1] = {heads_q}) must be a whole multiple of the "
                         f"number of KV heads (k.shape[1] = {heads_kv})")
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        raise ValueError(f"head dim (q.shape[-1]) must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], "
                         f"got {head_dim}")

    if prefix_k.dim() not in (3, 4):
        raise ValueError(f"prefix_k must be [Hkv, P, D] or [N, Hkv, P, D], got shape {tuple(prefix_k.shape)}")
    if prefix_k.dim() == 3:
        prefix_k = prefix_k.unsqueeze(0)
        prefix_v = prefix_v.unsqueeze(0) if prefix_v.dim() == 3 else prefix_v
    num_prefixes, _, prefix_len, _ = prefix_k.shape
    _require_shape("prefix_k", prefix_k, (num_prefixes, heads_kv, prefix_len, head_dim),
                   "[N, Hkv, P, D] with k's Hkv and D")
    _require_shape("prefix_v", prefix_v, prefix_k.shape, "prefix_k's shape")

    if num_prefixes == 0 and batch > 0:  # the kernels would read prefix 0 of an empty tensor
        raise ValueError(f"prefix_k holds no prefix (N = 0, shape {tuple(prefix_k.shape)}) for a batch of {batch}: "
                         "pass one prefix, of length 0 ([Hkv, 0, D]) for none")
    if prefix_index is None and num_prefixes > 1:
        raise ValueError(f"prefix_index is required when prefix_k holds N = {num_prefixes} prefixes: "
                         "it says which prefix each sequence uses")
    # The kernels read both index tensors as dense arrays: a strided or expanded one (stride 0) is copied here
    # (B or N integers), or its values would be read from the wrong places.
    if prefix_index is not None:
        _check_index_tensor("prefix_index", prefix_index, batch, "[B]", q.device, num_prefixes - 1,
                            f"N = {num_prefixes} prefixes")
        prefix_index = prefix_index.contiguous()
    if prefix_lens is not None:
        _check_index_tensor("prefix_lens", prefix_lens, num_prefixes, "[N]", q.device, prefix_len,
                            f"prefix length P = {prefix_len}")
        prefix_lens = prefix_lens.contiguous()
    if key_padding_mask is not None:
        _require_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got {key_padding_mask.dtype}")
        _require_shape("key_padding_mask", key_padding_mask, (batch, seq_k), "[B, L]")
        _require_device("key_padding_mask", key_padding_mask, q.device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not isinstance(window_includes_prefix, bool):
        raise TypeError(f"window_includes_prefix must be a bool, got {type(window_includes_prefix).__name__}")
    if left_padding is not None:
        if not window_includes_prefix:
            raise ValueError("left_padding says where the window measures the prefix from: it needs "
                             "window_includes_prefix=True")
        _check_index_tensor("left_padding", left_padding, batch, "[B]", q.device, seq_k,
                            f"the sequences' own key length L = {seq_k}")
        left_padding = left_padding.contiguous() if window is not None else None
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not _is_kernel_scale(scale):
        raise ValueError(f"scale must be a positive number whose scale * log2(e) is a normal float32 "
                         f"(about 1.2e-38 to 2e38), or None, got {scale!r}")
    # The kernels take softcap * log2(e) and scale / softcap as float32s: inf (or past ~2e38) made every score NaN.
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not _is_kernel_scale(softcap) or not _is_normal_float32(scale / softcap)):
        raise ValueError(f"softcap must be a positive number or None, with softcap * log2(e) and scale / softcap "
                         f"normal float32s (scale = {scale:g}), got {softcap!r}")
    if sinks is not None:
        _require_tensor("sinks", sinks)
        if not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating-point tensor (one logit per query head), got {sinks.dtype}")
        _require_shape("sinks", sinks, (heads_q,), "[Hq]")
        _require_device("sinks", sinks, q.device)
    return PrefixAttentionCall(q, k, v, prefix_k, prefix_v, causal, float(scale), key_padding_mask,
                               prefix_index, prefix_lens, window, None if softcap is None else float(softcap),
                               window_includes_prefix and window is not None, left_padding, sinks)
