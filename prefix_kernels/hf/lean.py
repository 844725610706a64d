"""lean_training(model): a frozen model's training step without the activations it has no need to keep.

Prefix tuning trains the prefix only; the model is frozen. Its linear layers then keep nothing for backward
(autograd saves a linear's input only for its weight's gradient), and what a step keeps is the elementwise work
between them: per decoder layer the SwiGLU MLP's gate, activation and up projection (3 x [tokens, intermediate]) and
each RMSNorm's float32 copy of its input, and at the end the float32 log-softmax of the logits ([tokens, vocab]).
On the benchmark's ~1B Llama config at B=16, S=1024 (bf16) that is ~12.9 GB, ~4.3 GB and ~2.1 GB of a ~25 GB step.
lean_training replaces, on the modules it recognizes (counted in its answer):

  SwiGLU MLPs (gate_proj, up_proj, down_proj, SiLU)  keep gate and up; the activation is recomputed in backward
                                                     (-1/3 of the MLPs' share: ~4.3 GB there)
  Llama-style RMSNorms (LLAMA_STYLE_NORMS)           keep the input in its own dtype and the per-row rstd (-half)
  the causal-LM loss (model.loss_function)           keeps the logits in their dtype and per token their max and
                                                     log-sum, not a float32 log-softmax (-half)

together ~7.5 GB less on that config (tests/test_lean.py counts the saved bytes exactly on a tiny one), and

  the rotary embedding (ROPE_MODULES' apply_rotary_pos_emb, see _RopeInstall): q and k in one pass each,
  in the layout HF hands them (it keeps nothing more or less: cos and sin, as stock)

With backend "auto" (the default) each of these is one fused Triton kernel per direction where Triton runs
(prefix_kernels/triton/lean_ops.py): the stock chains make several passes over float32 copies of every activation,
which on a frozen model is most of the step's time outside the matmuls (~5 GB of traffic per layer on that config,
by counting the stock ops' reads and writes). Elsewhere, and with backend "torch", the same formulas run as PyTorch
ops (prefix_kernels/lean_reference.py; the rotary embedding then is the stock function itself).

The numbers are the stock modules' (the same operations with the same rounding points, so fp16/bf16 results
agree with stock's to the last bit but for rare one-ulp flips; on a GPU the kernels' exp is the fast exp2, whose
relative error, ~1e-6 for large arguments, shows in float32 models only), weights' gradients included where they
train, so a model that is not frozen stays correct (it only saves less there). First-order gradients only (a
second backward through these modules raises). Other modules are left
as they are, and so are modules whose forward is already set on the instance (accelerate's hooks for device maps
and offload). lean_training(model, enable=False) restores the stock ones.
"""
from __future__ import annotations

import functools
import sys
import threading
import types
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import lean_reference
from ..backends import triton_device_reason
from .compat import base_model

BACKENDS = ("auto", "triton", "torch")

# RMSNorm classes whose forward is Llama's: w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
# (Gemma's (1 + w) in float32 is another formula: not replaced).
LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")
_REPLACED = "_prefix_kernels_lean"


def _lean_ops(backend: str, x: torch.Tensor, op: str, width: int = 0):
    """The module of formulas that runs `op` on `x`: the Triton kernels or the PyTorch reference (see lean_training's
    `backend`); "triton" that cannot serve the call raises ValueError saying why."""
    if backend == "torch":
        return lean_reference
    reason = triton_device_reason(x.device)
    if reason is None:
        from ..triton import lean_ops

        reason = lean_ops.lean_ops_reason(op, x.dtype, width)
        if reason is None:
            return lean_ops
    if backend == "triton":
        raise ValueError(f"lean_training(backend='triton') cannot run {op}: {reason}")
    return lean_reference


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only: backward recomputes silu(gate)."""

    @staticmethod
    def forward(ctx, gate, up, backend):
        ctx.save_for_backward(gate, up)
        ctx.ops = _lean_ops(backend, gate, "swiglu")
        return ctx.ops.swiglu_forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.ops.swiglu_backward(grad, gate, up, *ctx.needs_input_grad[:2])
        return grad_gate, grad_up, None


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, saving the input in its dtype and rstd (float32, one per row) instead of a float32 copy."""

    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        ctx.ops = _lean_ops(backend, x, "rms_norm", x.shape[-1])
        out, rstd = ctx.ops.rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = ctx.ops.rms_norm_backward(grad, x, weight, rstd, *ctx.needs_input_grad[:2])
        return grad_x, grad_weight, None, None


class _Rope(torch.autograd.Function):
    """Llama's apply_rotary_pos_emb on q and k [B, H, S, D] with cos, sin [B or 1, S, D] (no gradient for them)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backend):
        ctx.ops = _lean_ops(backend, q, "rope")
        ctx.save_for_backward(cos, sin)
        return ctx.ops.rope_forward(q, k, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = ctx.ops.rope_backward(grad_q, grad_k, cos, sin, *ctx.needs_input_grad[:2])
        return grad_q, grad_k, None, None, None


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of [N, V] logits against [N] labels (0 where ignored), saving the logits (as given)
    and each row's max and log-sum (two float32), never a float32 copy of all of them."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, backend):
        keep = labels != ignore_index
        safe = torch.where(keep, labels, 0)
        ctx.ops = _lean_ops(backend, logits, "cross_entropy", logits.shape[-1])
        loss, stats = ctx.ops.cross_entropy_forward(logits, safe, keep)
        ctx.save_for_backward(logits, safe, keep, stats)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, safe, keep, stats = ctx.saved_tensors
        return ctx.ops.cross_entropy_backward(grad, logits, safe, keep, stats), None, None, None


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   backend="auto", **kwargs):
    """transformers' ForCausalLMLoss (same shift, same reductions), through _TokenCrossEntropy."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    flat = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat.device)
    per_token = _TokenCrossEntropy.apply(flat, targets, ignore_index, backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(per_token.device)
        return per_token.sum() / num_items_in_batch
    return per_token.sum() / (targets != ignore_index).sum()


# The rotary embedding is applied by a module-level function of each modeling file, not by a module, so it is
# replaced there (ROPE_MODULES: transformers' own files whose apply_rotary_pos_emb is Llama's formula) by a
# dispatcher that runs the kernel only on cos/sin a lean model's rotary-embedding module made (they carry its
# backend in _ROPE_TAG) and hands every other call, from any other model or with other arguments, to the function
# it replaced, unchanged.
ROPE_MODULES = tuple(f"transformers.models.{family}.modeling_{family}" for family in ("llama", "mistral", "qwen2",
                                                                                      "qwen3"))
_ROPE_TAG = "_prefix_kernels_lean_rope"
# modeling module name -> _RopeInstall; its users are weak, so that a lean model dropped without
# lean_training(enable=False) does not keep the dispatcher forever (the next lean_training call sweeps it).
_rope_installs: dict = {}
_rope_lock = threading.Lock()


class _RopeInstall:
    def __init__(self, replaced):
        self.replaced = replaced  # the function found in the module (transformers' own, or another library's)
        self.users = weakref.WeakSet()

        def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
            backend = getattr(cos, _ROPE_TAG, None)
            if backend in (None, "torch") or not _rope_covered(q, k, cos, sin, args, kwargs):
                return replaced(q, k, cos, sin, *args, **kwargs)
            return _Rope.apply(q, k, cos, sin, backend)

        apply_rotary_pos_emb.__wrapped__ = replaced
        self.dispatcher = apply_rotary_pos_emb


def _rope_covered(q, k, cos, sin, args, kwargs) -> bool:
    """The calls the kernel computes exactly as the stock function: no argument but unsqueeze_dim=1, same dtype and
    device throughout (no type promotion), [B, H, S, D] q and k, [B or 1, S, D] cos and sin that need no gradient."""
    unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
    if len(args) + len(kwargs) > 1 or (kwargs and "unsqueeze_dim" not in kwargs) or not isinstance(unsqueeze_dim, int):
        return False
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    batch, _, seq, dim = q.shape
    return (dim % 2 == 0 and k.shape[0] == batch and k.shape[2:] == (seq, dim) and cos.shape[1:] == (seq, dim)
            and cos.shape[0] in (1, batch) and q.dtype == k.dtype == cos.dtype == sin.dtype
            and q.device == k.device == cos.device == sin.device
            and not (cos.requires_grad or sin.requires_grad))


def _rope_module(module):
    """The modeling module whose apply_rotary_pos_emb this rotary-embedding module's outputs feed, or None."""
    if not type(module).__name__.endswith("RotaryEmbedding") or type(module).__module__ not in ROPE_MODULES:
        return None
    modeling = sys.modules.get(type(module).__module__)
    return modeling if hasattr(modeling, "apply_rotary_pos_emb") else None


def _rope_install(modeling, module):
    """Make `module`'s outputs go through the dispatcher (again, if it was swept or replaced since: a deep copy of
    a lean model, or another library's patch on top of ours)."""
    with _rope_lock:
        entry = _rope_installs.get(modeling.__name__)
        if entry is None or modeling.apply_rotary_pos_emb is not entry.dispatcher:
            previous = entry.users if entry is not None else ()
            entry = _rope_installs[modeling.__name__] = _RopeInstall(modeling.apply_rotary_pos_emb)
            entry.users.update(previous)
            modeling.apply_rotary_pos_emb = entry.dispatcher
        entry.users.add(module)


def _rope_uninstall(modeling, module):
    """Stop `module` using the dispatcher; the last live one's restore puts the replaced function back."""
    with _rope_lock:
        entry = _rope_installs.get(modeling.__name__)
        if entry is not None:
            entry.users.discard(module)
    _rope_sweep()


def _rope_sweep():
    """Put the replaced function back where no live lean rotary module uses the dispatcher any more (only where the
    dispatcher is still what the module holds: a patch made on top of it is left to its owner)."""
    with _rope_lock:
        for name, entry in list(_rope_installs.items()):
            if not entry.users:
                del _rope_installs[name]
                modeling = sys.modules.get(name)
                if modeling is not None and modeling.apply_rotary_pos_emb is entry.dispatcher:
                    modeling.apply_rotary_pos_emb = entry.replaced


def _rotary_forward(self, *args, **kwargs):
    cos, sin = type(self).forward(self, *args, **kwargs)
    setattr(cos, _ROPE_TAG, self.__dict__[_REPLACED])
    setattr(sin, _ROPE_TAG, self.__dict__[_REPLACED])
    return cos, sin


def _swiglu_forward(self, x):
    backend = self.__dict__[_REPLACED]
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x), backend))


def _norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, self.__dict__[_REPLACED])


def _is_swiglu(module) -> bool:
    from transformers.activations import SiLUActivation

    act = getattr(module, "act_fn", None)
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and \
        isinstance(act, (torch.nn.SiLU, SiLUActivation))


_LEAN_FORWARDS = {"mlp": _swiglu_forward, "norm": _norm_forward, "rope": _rotary_forward}


def _is_lean_loss(loss_function) -> bool:
    return isinstance(loss_function, functools.partial) and loss_function.func is causal_lm_loss


def lean_training(model, enable: bool = True, backend: str = "auto") -> dict:
    """Replace (enable=True) or restore (False) the modules and loss described above; returns how many of each
    were changed: {"mlp": n, "norm": n, "rope": n, "loss": 0 or 1}. `model`: a transformers causal LM or a PeftModel.

    backend: "auto" = the fused Triton kernels where they can run (CUDA tensors; CPU under TRITON_INTERPRET=1),
    else the PyTorch formulas; "triton" = the kernels or a ValueError at the first call they cannot serve;
    "torch" = the PyTorch formulas. Calling it again on a lean model switches the backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"lean_training: backend must be one of {BACKENDS}, got {backend!r}")
    target = base_model(model)  # a PeftModel: the modules and the loss are its base model's
    _rope_sweep()  # lean models dropped without a restore since the last call
    counts = {"mlp": 0, "norm": 0, "rope": 0, "loss": 0}
    recognized = []  # (name, module, kind, its modeling module for a rope)
    for name, module in target.named_modules():
        modeling = _rope_module(module)
        kind = ("mlp" if _is_swiglu(module) else
                "norm" if type(module).__name__ in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon") else
                "rope" if modeling is not None else None)
        if kind is not None:
            recognized.append((name, module, kind, modeling))
    # A lean forward wrapped since (an accelerate hook added after lean_training) cannot be taken out from under the
    # wrapper: deleting the instance's forward dropped the hook, and removing the hook later put the lean forward
    # back without its state (a KeyError at the next forward). Refused before anything changes.
    wrapped = [name for name, module, kind, _ in recognized if not enable and _REPLACED in module.__dict__
               and getattr(module.__dict__.get("forward"), "__func__", None) is not _LEAN_FORWARDS[kind]]
    if wrapped:
        raise ValueError(f"lean_training(enable=False): the forward of {', '.join(wrapped)} was replaced after "
                         "lean_training (by a hook: accelerate's add_hook_to_module?); remove that hook first, then "
                         "restore")
    for _, module, kind, modeling in recognized:
        replaced = _REPLACED in module.__dict__
        if enable and replaced:
            module.__dict__[_REPLACED] = backend
            if kind == "rope":  # a deep copy of a lean model is not among the dispatcher's users yet
                _rope_install(modeling, module)
        # A forward already set on the instance (an accelerate hook: device maps, offload) is left alone.
        elif enable and "forward" not in module.__dict__:
            module.__dict__[_REPLACED] = backend
            module.forward = types.MethodType(_LEAN_FORWARDS[kind], module)
            if kind == "rope":
                _rope_install(modeling, module)
            counts[kind] += 1
        elif not enable and replaced:
            del module.__dict__[_REPLACED], module.__dict__["forward"]
            if kind == "rope":
                _rope_uninstall(modeling, module)
            counts[kind] += 1
    causal_lm = type(target).__name__.endswith("ForCausalLM")  # the loss replaced is the causal-LM one
    lean_loss = _is_lean_loss(target.__dict__.get("_loss_function"))
    if enable and causal_lm and (lean_loss or "_loss_function" not in target.__dict__):
        target.loss_function = functools.partial(causal_lm_loss, backend=backend)
        counts["loss"] = int(not lean_loss)
    elif not enable and lean_loss:
        del target.__dict__["_loss_function"]
        counts["loss"] = 1
    return counts
