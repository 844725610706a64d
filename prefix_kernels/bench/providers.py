"""Who computes an op case: our kernels and the baselines, all behind one small interface.

A provider's `prepare(case, inputs)` does the untimed setup (pre-built concats, block masks, compilation handles)
and returns a `Prepared` whose `forward()` is the timed region. For "fwd+bwd" the harness differentiates
`forward()` with respect to `Prepared.leaves` and maps the gradients back to (q, k, v, prefix_k, prefix_v)
with `Prepared.canonical_grads` for the correctness guard. A provider that cannot serve a case raises
`Unavailable(reason)`; the row is then reported as "n/a" with that reason.

Other issues plug in here: add a `Provider` to PROVIDERS (or pass extra providers to `harness.run_ops`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .cases import OpCase


class Unavailable(Exception):
    """This provider cannot serve this case here; the message says why."""


@dataclass
class Inputs:
    """The canonical tensors of one case. Leaves requiring grad for fwd+bwd cases."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    scale: float

    @property
    def tensors(self):
        return self.q, self.k, self.v, self.prefix_k, self.prefix_v


GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass
class Prepared:
    forward: Callable[[], torch.Tensor]          # the timed call; returns out [B, Hq, S, D]
    leaves: tuple = ()                            # what fwd+bwd differentiates w.r.t. (built untimed)
    canonical_grads: Callable[[tuple], dict] | None = None   # leaves' grads -> {name in GRAD_NAMES: grad}
    note: str = ""


@dataclass
class Provider:
    name: str
    description: str
    role: str                  # "ours" | "baseline" | "reference" (a bound, not the same op: no guard)
    ops: tuple                 # op names it takes part in
    prepare: Callable[[OpCase, Inputs], Prepared]
    tags: tuple = field(default_factory=tuple)


def make_inputs(case: OpCase, device, *, seed: int = 0) -> Inputs:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = case.torch_dtype

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    b, hq, hkv, s, l, p, d = case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_k, case.prefix, case.head_dim
    q = rand(b, s, hq, d).transpose(1, 2) if case.q_layout == "bshd" else rand(b, hq, s, d)
    tensors = [q, rand(b, hkv, l, d), rand(b, hkv, l, d), rand(hkv, p, d), rand(hkv, p, d)]
    if case.op == "fwd+bwd":
        tensors = [t.requires_grad_() for t in tensors]
    return Inputs(*tensors, scale=1.0 / math.sqrt(d))


def _identity_grads(grads):
    return dict(zip(GRAD_NAMES, grads))


def _all_leaves(inputs: Inputs):
    return inputs.tensors


# --- ours -----------------------------------------------------------------------------------------------------

def _ours(backend: str):
    def prepare(case: OpCase, inputs: Inputs) -> Prepared:
        from .. import prefix_attention

        q, k, v, pk, pv = inputs.tensors

        def forward():
            return prefix_attention(q, k, v, pk, pv, scale=inputs.scale, backend=backend, **case.attention_options())
        try:  # an explicit backend that cannot serve the call says why (ValueError): that is "n/a", not a failure
            with torch.no_grad():
                forward()
        except ValueError as exc:
            raise Unavailable(str(exc)) from None
        return Prepared(forward, _all_leaves(inputs), _identity_grads)
    return prepare


# --- SDPA helpers: what Hugging Face's sdpa_attention does ----------------------------------------------------

def _sdpa_supports_gqa() -> bool:
    import inspect
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: torch >= 2.5 has it
        return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _concat_mask(case: OpCase, device) -> torch.Tensor | None:
    """[1, 1, S, P + L] bool (True = attend) where causality or a window needs one, else None (a decode step
    without a window sees every key). The concat's key j sits at position j - P: the prefix just before own key 0."""
    s, l, p = case.seq_q, case.seq_k, case.prefix
    if case.window is None and (not case.causal or s == 1):
        return None
    q_pos = torch.arange(s, device=device)[:, None] + (l - s)
    key_pos = torch.arange(p + l, device=device)[None, :] - p
    visible = (key_pos < 0) | (key_pos <= q_pos) if case.causal else torch.ones_like(key_pos, dtype=torch.bool)
    if case.window is not None:
        visible = visible & (q_pos - key_pos < case.window)
    return visible[None, None]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _hf_sdpa(q, k, v, mask, scale, groups):
    """HF's sdpa_attention: enable_gqa when there is no mask (torch >= 2.5), repeat_kv otherwise."""
    if groups > 1 and mask is None and _sdpa_supports_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask,
                                          scale=scale)


def _naive(case: OpCase, inputs: Inputs) -> Prepared:
    q, k, v, pk, pv = inputs.tensors
    mask = _concat_mask(case, q.device)  # built once per forward for all layers by HF: untimed here
    groups = case.heads_q // case.heads_kv
    b = case.batch

    def forward():
        keys = torch.cat([pk[None].expand(b, -1, -1, -1), k], dim=2)      # PEFT: B copies of the prefix
        values = torch.cat([pv[None].expand(b, -1, -1, -1), v], dim=2)
        return _hf_sdpa(q, keys, values, mask, inputs.scale, groups)
    return Prepared(forward, _all_leaves(inputs), _identity_grads)


def _naive_lower_right(case: OpCase, inputs: Inputs) -> Prepared:
    """The naive concat with SDPA's strongest form of the mask: causal_lower_right(S, P + L) is exactly the prefix
    visible to all and the own keys bottom-right causal, and SDPA runs it on its flash kernel (efficient attention,
    or the materialized mask where neither serves), where HF's boolean mask keeps flash out. Not what PEFT/HF run:
    the fastest thing a user of the naive concat could write."""
    from torch.nn.attention.bias import causal_lower_right

    if not (case.causal and case.seq_q > 1):
        raise Unavailable("nothing to mask (S = 1 or not causal): the same call as the naive row")
    if case.window is not None:
        raise Unavailable("causal_lower_right has no sliding window")
    q, k, v, pk, pv = inputs.tensors
    groups = case.heads_q // case.heads_kv
    b = case.batch
    bias = causal_lower_right(case.seq_q, case.prefix + case.seq_k)

    def forward():
        keys = torch.cat([pk[None].expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([pv[None].expand(b, -1, -1, -1), v], dim=2)
        # (the flash op behind the bias takes no GQA flag: K/V repeated per query head, as HF does with a mask)
        return F.scaled_dot_product_attention(q, _repeat_kv(keys, groups), _repeat_kv(values, groups), attn_mask=bias,
                                              scale=inputs.scale)
    return Prepared(forward, _all_leaves(inputs), _identity_grads)


def _prebuilt(case: OpCase, inputs: Inputs) -> Prepared:
    q, k, v, pk, pv = inputs.tensors
    mask = _concat_mask(case, q.device)
    groups = case.heads_q // case.heads_kv
    p = case.prefix
    with torch.no_grad():
        keys = torch.cat([pk[None].expand(case.batch, -1, -1, -1), k], dim=2)
        values = torch.cat([pv[None].expand(case.batch, -1, -1, -1), v], dim=2)
    if case.op == "fwd+bwd":
        keys.requires_grad_()
        values.requires_grad_()

    def forward():
        return _hf_sdpa(q, keys, values, mask, inputs.scale, groups)

    def grads(g):
        dq, dkeys, dvalues = g
        return dict(q=dq, k=dkeys[:, :, p:], v=dvalues[:, :, p:], prefix_k=dkeys[:, :, :p].sum(0),
                    prefix_v=dvalues[:, :, :p].sum(0))
    return Prepared(forward, (q, keys, values), grads, note="concat built outside the timed region")


def _no_prefix(case: OpCase, inputs: Inputs) -> Prepared:
    q, k, v, _, _ = inputs.tensors
    if case.seq_q != case.seq_k:
        raise Unavailable("the no-prefix bound is defined for S = L only")
    if case.window is not None:
        raise Unavailable("SDPA's is_causal has no sliding window")
    groups = case.heads_q // case.heads_kv

    def forward():
        if groups > 1 and _sdpa_supports_gqa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, scale=inputs.scale,
                                                  enable_gqa=True)
        return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups),
                                              is_causal=case.causal, scale=inputs.scale)
    return Prepared(forward, (q, k, v), lambda g: dict(zip(("q", "k", "v"), g)),
                    note="no prefix at all: a lower bound, not the same op")


# --- FlexAttention, prefix stored once ------------------------------------------------------------------------

_FLEX_COMPILED = {}


def _flex_fn(device):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise Unavailable(f"FlexAttention is not in this torch ({exc})") from None
    if device.type != "cuda":
        return flex_attention, "eager (not compiled) on CPU"
    if "fn" not in _FLEX_COMPILED:
        import torch._dynamo.config as dynamo_config
        for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape; the name moved across versions
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 256))
        _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["fn"], "compiled"


def _flex(case: OpCase, inputs: Inputs) -> Prepared:
    """All sequences packed into one row: keys = [prefix (once) ; seq 0 ; seq 1 ; ...]; a BlockMask keeps each
    query on the prefix and its own sequence. The packed layout is built outside the timed region (a serving or
    training system would keep its KV that way)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v, pk, pv = inputs.tensors
    fn, how = _flex_fn(q.device)
    b, hq, hkv, s, l, p, d = case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_k, case.prefix, case.head_dim
    with torch.no_grad():
        qp = q.permute(1, 0, 2, 3).reshape(1, hq, b * s, d).contiguous()
        kp = torch.cat([pk, k.permute(1, 0, 2, 3).reshape(hkv, b * l, d)], dim=1)[None].contiguous()
        vp = torch.cat([pv, v.permute(1, 0, 2, 3).reshape(hkv, b * l, d)], dim=1)[None].contiguous()
    if case.op == "fwd+bwd":
        for t in (qp, kp, vp):
            t.requires_grad_()
    causal, window = case.causal, case.window

    def mask_mod(b_, h_, q_idx, kv_idx):
        seq = q_idx // s
        pos = q_idx % s + (l - s)
        own = kv_idx - p
        mine = (own >= 0) & (own // l == seq)
        if causal:
            mine = mine & (own % l <= pos)
        if window is None:
            return (kv_idx < p) | mine
        # the prefix at positions -P..-1, just before each sequence's own key 0
        key_pos = torch.where(own >= 0, own % l, own)
        return ((kv_idx < p) | mine) & (pos - key_pos < window)

    block_mask = create_block_mask(mask_mod, None, None, b * s, p + b * l, device=q.device)
    groups = hq // hkv

    def forward():
        if q.device.type != "cuda":
            with warnings.catch_warnings():  # eager FlexAttention on CPU warns on every call that it is slow
                warnings.simplefilter("ignore")
                out = fn(qp, kp, vp, block_mask=block_mask, scale=inputs.scale, enable_gqa=groups > 1)
        else:
            out = fn(qp, kp, vp, block_mask=block_mask, scale=inputs.scale, enable_gqa=groups > 1)
        return out.reshape(hq, b, s, d).permute(1, 0, 2, 3)

    def grads(g):
        dq, dk, dv = g
        return dict(q=dq.reshape(hq, b, s, d).permute(1, 0, 2, 3),
                    k=dk[0, :, p:].view(hkv, b, l, d).permute(1, 0, 2, 3), prefix_k=dk[0, :, :p],
                    v=dv[0, :, p:].view(hkv, b, l, d).permute(1, 0, 2, 3), prefix_v=dv[0, :, :p])
    return Prepared(forward, (qp, kp, vp), grads, note=f"{how}; packed layout and BlockMask built untimed")


# --- the PyTorch split (Hydragen-style) -----------------------------------------------------------------------

def _attention_with_lse(q, k, v, scale, causal):
    """(out, lse natural log, float32) for q [N, H, M, D] against k, v [N, H, n, D] (same H): torch's own kernels."""
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        raise Unavailable("this torch has no CPU flash attention op returning the LSE")
    out, lse = op(q, k, v, 0.0, causal, scale=scale)[:2]
    return out, lse


def _split(case: OpCase, inputs: Inputs) -> Prepared:
    """Hydragen: prefix attention with all B*G*S queries of a KV head packed against ONE prefix copy, each
    sequence's attention over its own keys, merged by log-sum-exp. Forward only (torch's ops give no LSE grad)."""
    if case.op == "fwd+bwd":
        raise Unavailable("forward only: torch's flash op does not differentiate its LSE output")
    if case.causal and case.seq_q > 1 and case.seq_q != case.seq_k:
        raise Unavailable("torch's flash causal mask is top-left aligned; needs S = 1 or S = L")
    if case.window is not None:
        raise Unavailable("torch's flash and efficient ops take no sliding window")
    q, k, v, pk, pv = inputs.tensors
    b, hq, hkv, s, l, p, d = case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_k, case.prefix, case.head_dim
    g = hq // hkv
    own_causal = case.causal and s > 1

    def forward():
        # Prefix part: [1, Hkv, B*G*S, D] queries against the one [1, Hkv, P, D] prefix.
        qp = q.view(b, hkv, g, s, d).permute(1, 0, 2, 3, 4).reshape(1, hkv, b * g * s, d)
        out_p, lse_p = _attention_with_lse(qp, pk[None], pv[None], inputs.scale, False)
        out_p = out_p.reshape(hkv, b, g, s, d).permute(1, 0, 2, 3, 4).reshape(b, hq, s, d)
        lse_p = lse_p.reshape(hkv, b, g, s).permute(1, 0, 2, 3).reshape(b, hq, s)
        # Own part: the G query heads of a KV head packed when S = 1 (no mask); repeat_kv when causal.
        if own_causal:
            out_o, lse_o = _attention_with_lse(q, _repeat_kv(k, g), _repeat_kv(v, g), inputs.scale, True)
        else:
            qo = q.reshape(b, hkv, g * s, d)
            out_o, lse_o = _attention_with_lse(qo, k, v, inputs.scale, False)
            out_o, lse_o = out_o.reshape(b, hq, s, d), lse_o.reshape(b, hq, s)
        # Log-sum-exp merge.
        lse = torch.logaddexp(lse_p, lse_o)
        w_p = torch.exp(lse_p - lse)[..., None]
        w_o = torch.exp(lse_o - lse)[..., None]
        return (w_p * out_p.float() + w_o * out_o.float()).to(q.dtype)
    return Prepared(forward)


PROVIDERS = {
    p.name: p for p in (
        Provider("ours-triton", "prefix_attention(backend='triton')", "ours", ("forward", "fwd+bwd", "decode"),
                 _ours("triton")),
        Provider("ours-cuda", "prefix_attention(backend='cuda')", "ours", ("forward", "fwd+bwd", "decode"),
                 _ours("cuda")),
        Provider("naive", "naive cat + SDPA: prefix expanded to B copies, torch.cat, SDPA (what PEFT/HF do)",
                 "baseline", ("forward", "fwd+bwd", "decode"), _naive),
        Provider("naive-lower-right", "naive cat + SDPA with a causal_lower_right bias (flash on CUDA): the "
                 "fastest form of the naive concat, not what PEFT/HF run (their boolean mask keeps flash out)",
                 "baseline", ("forward", "fwd+bwd"), _naive_lower_right),
        Provider("prebuilt", "SDPA on a pre-built concat (concat outside the timed region)", "baseline",
                 ("forward", "fwd+bwd", "decode"), _prebuilt),
        Provider("flex", "FlexAttention, prefix stored once (packed keys + BlockMask, compiled on CUDA)",
                 "baseline", ("forward", "fwd+bwd", "decode"), _flex),
        Provider("split", "PyTorch split, Hydragen-style: packed queries vs one prefix + own part + LSE merge",
                 "baseline", ("forward", "decode"), _split),
        Provider("noprefix", "SDPA with no prefix at all (a lower bound, not the same op)", "reference",
                 ("forward", "fwd+bwd"), _no_prefix),
    )
}
BASELINES = ("naive", "naive-lower-right", "prebuilt", "flex", "split")
