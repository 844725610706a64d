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
  the causal-LM loss (model.loss_function)           keeps the logits in their dtype and a per-token log-sum-exp,
                                                     not a float32 log-softmax (-half)

together ~7.5 GB less on that config (tests/test_lean.py counts the saved bytes exactly on a tiny one).

The forward numbers are the stock modules' exactly (the same operations); the gradients are the same formulas
(MLP: the same operations, so equal; norm and loss: float32 rounding order may differ by an ulp), weights' included
where they train, so a model that is not frozen stays correct (it only saves less there). Other modules are left
as they are, and so are modules whose forward is already set on the instance (accelerate's hooks for device maps
and offload). lean_training(model, enable=False) restores the stock ones.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .compat import base_model

# RMSNorm classes whose forward is Llama's: w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
# (Gemma's (1 + w) in float32 is another formula: not replaced).
LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")
_REPLACED = "_prefix_kernels_lean"
_LOSS_ROWS_PER_CHUNK_BYTES = 1 << 28   # float32 bytes of logits the loss upcasts at a time


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only: backward recomputes silu(gate) with the forward's own ops."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm, saving the input in its dtype and rstd (float32, one per row) instead of a float32 copy."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        normed32 = x32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            product = grad * normed32.to(x.dtype)
            grad_weight = product.sum(tuple(range(product.dim() - weight.dim()))).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # The stock chain rule: out = w * n, n = (x32 * r).to(dtype), r = rsqrt(mean(x32^2) + eps)
            grad_n = (grad * weight).to(x.dtype).float()  # the stock grad of n, in n's dtype (x's)
            grad_r = (grad_n * x32).sum(-1, keepdim=True)
            grad_mean = -0.5 * grad_r * rstd.pow(3)
            grad_x32 = grad_n * rstd + (grad_mean / x.shape[-1]).expand_as(x32) * (2.0 * x32)
            grad_x = grad_x32.to(x.dtype)
        return grad_x, grad_weight, None


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of [N, V] logits against [N] labels (0 where ignored), saving the logits (as given)
    and each row's log-sum-exp; float32 upcasts happen a chunk of rows at a time, in forward and in backward."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        rows = max(1, _LOSS_ROWS_PER_CHUNK_BYTES // (4 * logits.shape[1]))
        keep = labels != ignore_index
        safe = torch.where(keep, labels, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()
            lse[start:start + rows] = torch.logsumexp(chunk, dim=-1)
            picked[start:start + rows] = chunk.gather(1, safe[start:start + rows, None])[:, 0]
        ctx.save_for_backward(logits, safe, keep, lse)
        ctx.rows = rows
        return torch.where(keep, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, safe, keep, lse = ctx.saved_tensors
        grad = torch.where(keep, grad, 0.0)
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            stop = start + ctx.rows
            probs = torch.exp(logits[start:stop].float() - lse[start:stop, None])
            probs.scatter_add_(1, safe[start:stop, None], -keep[start:stop, None].float())
            grad_logits[start:stop] = probs * grad[start:stop, None]
        return grad_logits, None, None


def causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                   **kwargs):
    """transformers' ForCausalLMLoss (same shift, same reductions), through _TokenCrossEntropy."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    flat = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat.device)
    per_token = _TokenCrossEntropy.apply(flat, targets, ignore_index)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(per_token.device)
        return per_token.sum() / num_items_in_batch
    return per_token.sum() / (targets != ignore_index).sum()


def _swiglu_forward(self, x):
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _norm_forward(self, hidden_states):
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _is_swiglu(module) -> bool:
    from transformers.activations import SiLUActivation

    act = getattr(module, "act_fn", None)
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and \
        isinstance(act, (torch.nn.SiLU, SiLUActivation))


def lean_training(model, enable: bool = True) -> dict:
    """Replace (enable=True) or restore (False) the modules and loss described above; returns how many of each
    were changed: {"mlp": n, "norm": n, "loss": 0 or 1}. `model`: a transformers causal LM or a PeftModel."""
    target = base_model(model)  # a PeftModel: the modules and the loss are its base model's
    counts = {"mlp": 0, "norm": 0, "loss": 0}
    for module in target.modules():
        kind = ("mlp" if _is_swiglu(module) else
                "norm" if type(module).__name__ in LLAMA_STYLE_NORMS and hasattr(module, "variance_epsilon") else None)
        if kind is None:
            continue
        replaced = _REPLACED in module.__dict__
        # A forward already set on the instance (an accelerate hook: device maps, offload) is left alone.
        if enable and not replaced and "forward" not in module.__dict__:
            module.__dict__[_REPLACED] = True
            module.forward = types.MethodType(_swiglu_forward if kind == "mlp" else _norm_forward, module)
            counts[kind] += 1
        elif not enable and replaced:
            del module.__dict__[_REPLACED], module.__dict__["forward"]
            counts[kind] += 1
    causal_lm = type(target).__name__.endswith("ForCausalLM")  # the loss replaced is the causal-LM one
    if enable and causal_lm and "_loss_function" not in target.__dict__:
        target.loss_function = causal_lm_loss
        counts["loss"] = 1
    elif not enable and target.__dict__.get("_loss_function") is causal_lm_loss:
        del target.__dict__["_loss_function"]
        counts["loss"] = 1
    return counts
