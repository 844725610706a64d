"""Model-level rows on a Llama-architecture config with random weights.

train_step: one prefix-tuning optimizer step (forward, backward, AdamW on the prefix).
    peft  = a PeftModel with a PrefixTuningConfig (the prefix expanded to B copies and concatenated in every layer).
    ours  = the same PeftModel after `prefix_kernels.patch(peft_model)`.
    ours-checkpointed = ours with the base model's gradient checkpointing on (PEFT's prefix tuning refuses it):
            the memory a user of the patch can trade for recomputation.
    ours-lean = ours with prefix_kernels.lean_training (fused Triton MLP, norm, rotary and loss kernels that keep
            less for backward); ours-lean-torch = the same with lean_training's PyTorch formulas (what the fusion gives).
generate: greedy `generate` of new tokens for B rows that share one prompt.
    hf-generate = stock HF generate with the prompt repeated in each row.
    ours-shared-cache = generate on the rows' own tokens with `SharedPrefixCache.from_prompt`.
    ours-static-cache = the same with `StaticSharedPrefixCache` (kept across calls, the prompt reloaded in place),
            whose decode step transformers compiles on a GPU (CUDA graphs).
    fp32: its new tokens must equal stock's; bf16/fp16: its logits, teacher-forced on stock's
    tokens, must match stock's within the dtype's noise (_teacher_forced_check says why tokens cannot be the check).
Peak memory is what the step allocated beyond what was resident before it (weights, optimizer state, inputs).
"""
from __future__ import annotations

import functools
import gc
import statistics
import time
import traceback
import warnings

import torch

from .cases import ModelCase
from ..hf.compat import enable_activation_checkpointing
from .timing import PeakMemory, time_calls_ms



def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def build_llama(case: ModelCase, device, *, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                         num_hidden_layers=case.layers, num_attention_heads=case.heads_q,
                         num_key_value_heads=case.heads_kv,
                         max_position_embeddings=max(4096, case.prefix + case.seq + case.new_tokens + 64))
    config._attn_implementation = "sdpa"  # what PEFT users get by default on a GPU
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(case.torch_dtype)  # build in the target dtype: no float32 copy of the weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device)  # no dtype cast: RoPE's float32 inv_freq buffer stays float32, as from_pretrained keeps it


def _timed(fn, case: ModelCase, device) -> dict:
    fn()  # warmup (allocator, cuBLAS handles, first-call overheads)
    with PeakMemory(device) as mem:
        times = time_calls_ms(fn, device, repeats=case.repeats, warmup=0)
    return dict(time_ms=statistics.median(times), times_ms=times, peak_bytes=mem.peak_bytes)


def _row(case: ModelCase, provider: str, role: str, description: str) -> dict:
    return dict(kind="model", op=case.op, case=case.as_dict(), label=case.label, provider=provider, role=role,
                description=description)


def _guarded(row: dict, body, progress) -> dict:
    started = time.perf_counter()
    try:
        row.update(status="ok", **body())
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=6))
        if progress is not None:
            progress.write(f"error: {row['provider']} on {row['op']}: {type(exc).__name__}: {exc}")
    row["wall_s"] = time.perf_counter() - started
    if progress is not None:
        progress.step(f"{row['op']} {row['provider']}")
    return row


def train_step_rows(case: ModelCase, device, progress=None, rows=None) -> list[dict]:
    import prefix_kernels
    from peft import PrefixTuningConfig, get_peft_model

    model = build_llama(case, device)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.prefix))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(case.vocab, (case.batch, case.seq), generator=gen).to(device)

    current = {"model": peft_model}  # patch() may hand back the same model or a wrapper

    def step():
        loss = current["model"](input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def loss_now():
        with torch.no_grad():
            return float(current["model"](input_ids=ids, labels=ids).loss)

    def prefix_grad_now():  # the trained parameters' gradient of one step, flat in float32 (left cleared)
        loss = current["model"](input_ids=ids, labels=ids).loss
        if loss.requires_grad:  # (a path that lost the prefix's autograd: zeros, which the check then flags)
            loss.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])
        for p in params:
            p.grad = None
        return flat

    tokens = case.batch * case.seq

    def peft_body():
        result = _timed(step, case, device)
        result["tokens_per_s"] = tokens / (result["time_ms"] * 1e-3)
        return result

    rows = rows if rows is not None else []  # appended row by row (an interrupted run keeps them)
    rows.append(_guarded(_row(case, "peft", "baseline", "PEFT PrefixTuning (prefix expanded + cat in every layer)"),
                         peft_body, progress))

    def ours_body(backend, checkpointing=False, lean=None):
        reference_loss, reference_grad = loss_now(), prefix_grad_now()
        patched = current["model"] = prefix_kernels.patch(peft_model, backend=backend)
        if checkpointing:
            enable_activation_checkpointing(model)
        if lean:
            prefix_kernels.lean_training(peft_model, backend=lean)
        try:
            loss, grad = loss_now(), prefix_grad_now()
            result = _timed(step, case, device)
        finally:
            if checkpointing:
                model.gradient_checkpointing_disable()
            if lean:
                prefix_kernels.lean_training(peft_model, enable=False)
            prefix_kernels.unpatch(patched)
            current["model"] = peft_model
        result["tokens_per_s"] = tokens / (result["time_ms"] * 1e-3)
        # The loss alone barely sees the prefix on random weights (dropping it moves a bf16 loss by 0.4%): the
        # prefix's gradient is checked too, as the norm of its difference from PEFT's relative to PEFT's. Correct
        # bf16 rows had loss errors of 1e-7..4e-5 on the H100/H200; the gradient tolerance is a first guess that
        # still flags a dropped prefix (1.0) or a wrong scale (the rows record what it measured).
        rel = abs(loss - reference_loss) / max(abs(reference_loss), 1e-6)
        grad_rel = float((grad - reference_grad).norm() / reference_grad.norm().clamp_min(1e-30))
        tol, grad_tol = (1e-4, 1e-3) if case.dtype == "fp32" else (1e-3, 5e-2)
        result.update(loss=loss, reference_loss=reference_loss, loss_rel_err=rel, tolerance=tol,
                      prefix_grad_rel_err=grad_rel, grad_tolerance=grad_tol,
                      correct=rel <= tol and grad_rel <= grad_tol)
        return result

    for provider, backend in _ours_variants(case, device):
        rows.append(_guarded(_row(case, provider, "ours", "prefix_kernels.patch(peft_model): attention through the "
                                  f"kernels (backend={backend!r})"), functools.partial(ours_body, backend), progress))
    rows.append(_guarded(_row(case, "ours-checkpointed", "ours", "ours with the model's gradient checkpointing "
                              "(backend='auto'; PEFT prefix tuning refuses checkpointing)"),
                         functools.partial(ours_body, "auto", checkpointing=True), progress))
    rows.append(_guarded(_row(case, "ours-lean", "ours", "ours with prefix_kernels.lean_training (backend='auto': "
                              "fused Triton RMSNorm, SwiGLU, rotary and loss kernels that keep less for backward)"),
                         functools.partial(ours_body, "auto", lean="auto"), progress))
    rows.append(_guarded(_row(case, "ours-lean-torch", "ours", "ours-lean with lean_training's PyTorch formulas "
                              "(backend='torch': the same memory, the stock ops' passes)"),
                         functools.partial(ours_body, "auto", lean="torch"), progress))
    del model, peft_model, optimizer, params
    _free(device)
    return rows


def generate_rows(case: ModelCase, device, progress=None, rows=None) -> list[dict]:
    import prefix_kernels
    from prefix_kernels.hf.compat import cache_kwargs
    from prefix_kernels.hf.patch import _STATE_ATTR

    model = build_llama(case, device)
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(3)
    prompt = torch.randint(case.vocab, (case.prefix,), generator=gen).to(device)
    suffixes = torch.randint(case.vocab, (case.batch, case.seq), generator=gen).to(device)
    suffix_mask = torch.ones_like(suffixes)
    full = torch.cat([prompt[None].expand(case.batch, -1), suffixes], dim=1)
    options = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False,
                   pad_token_id=0)
    new_tokens = case.batch * case.new_tokens
    stock_tokens = {}
    exact = case.dtype == "fp32"

    def stock():
        with torch.no_grad():
            out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **options)
        stock_tokens["new"] = out[:, -case.new_tokens:]
        return out

    def stock_body():
        result = _timed(stock, case, device)
        result["tokens_per_s"] = new_tokens / (result["time_ms"] * 1e-3)
        result.update(_step_times(lambda processors: model.generate(
            input_ids=full, attention_mask=torch.ones_like(full), logits_processor=processors, **options), device))
        if not exact:  # the reference for ours' teacher-forced check, untimed, on the stock (unpatched) model
            stock_tokens["tokens"], stock_tokens["logits"] = _recorded_generate(
                model, full, torch.ones_like(full), options)
        return result

    rows = rows if rows is not None else []  # appended row by row (an interrupted run keeps them)
    rows.append(_guarded(_row(case, "hf-generate", "baseline", "stock HF generate, prompt repeated in every row"),
                         stock_body, progress))

    def ours_body(backend, static=False):
        produced, held = {}, {}
        if getattr(model, _STATE_ATTR, None) is not None:
            prefix_kernels.unpatch(model)  # from_prompt patches the model for `backend` on first use

        def prompt_cache():
            """The prompt's KV, once per generate (inside the timing): a new SharedPrefixCache, or the one
            StaticSharedPrefixCache refilled in place (its compiled step and CUDA graphs stay valid), as a server
            would keep it."""
            if not static:
                return prefix_kernels.SharedPrefixCache.from_prompt(model, prompt[None], backend=backend)
            if "cache" in held:
                held["cache"].load_prompt(model, prompt[None])
            else:
                held["cache"] = prefix_kernels.StaticSharedPrefixCache.from_prompt(
                    model, prompt[None], backend=backend, max_cache_len=case.seq + case.new_tokens)
            return held["cache"]

        def ours():
            with torch.no_grad():
                cache = prompt_cache()
                out = model.generate(input_ids=suffixes, attention_mask=suffix_mask, **cache_kwargs(model, cache),
                                     **options)
            produced["new"] = out[:, -case.new_tokens:]
            return out

        result = _timed(ours, case, device)
        result["tokens_per_s"] = new_tokens / (result["time_ms"] * 1e-3)
        with torch.no_grad():  # the prompt's KV is part of ours' prefill here
            result.update(_step_times(lambda processors: model.generate(
                input_ids=suffixes, attention_mask=suffix_mask, logits_processor=processors,
                **cache_kwargs(model, prompt_cache()), **options), device))
        if "new" in stock_tokens:
            # Free-running greedy tokens: in fp32 they must be equal, every one.
            match = float((produced["new"] == stock_tokens["new"]).float().mean())
            result.update(token_match=match)
            if exact:
                result.update(correct=match == 1.0)
        if "logits" in stock_tokens:
            with torch.no_grad():
                cache = prompt_cache()
                _, logits = _recorded_generate(model, suffixes, suffix_mask, options, force=stock_tokens["tokens"],
                                               **cache_kwargs(model, cache))
            result.update(_teacher_forced_check(logits, stock_tokens["logits"], stock_tokens["tokens"], case))
            del logits, cache
        return result

    for provider, backend in _ours_variants(case, device):
        rows.append(_guarded(_row(case, provider.replace("ours", "ours-shared-cache"), "ours",
                                  "generate on own tokens with SharedPrefixCache.from_prompt (prompt KV stored once, "
                                  f"backend={backend!r})"), functools.partial(ours_body, backend), progress))
    # transformers compiles the decode step of a compileable cache on a GPU (torch.compile, "reduce-overhead":
    # CUDA graphs); the first, untimed call pays the compilation. "auto" takes the Triton decode in compiled steps.
    rows.append(_guarded(_row(case, "ours-static-cache", "ours",
                              "generate with StaticSharedPrefixCache (own tokens preallocated, the decode step "
                              "compiled by transformers on a GPU: CUDA graphs), backend='auto'"),
                         functools.partial(ours_body, "auto", static=True), progress))
    del model
    _free(device)
    return rows


def _step_times(run_generate, device) -> dict:
    """Where a generate's time goes, from one more (untimed) call: prefill_ms, from the call to the first
    next-token logits, and step_ms, the median time between consecutive logits (one decode step). On a GPU the
    marks are CUDA events, i.e. the device's timeline with the gaps where it waited for the host; elsewhere host
    clocks. `run_generate(logits_processor)` runs the generate with the marking processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    on_gpu = torch.device(device).type == "cuda"
    marks = []

    def mark():
        if on_gpu:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mark()
            return scores

    mark()
    try:
        with torch.no_grad():
            run_generate(LogitsProcessorList([Clock()]))
    except Exception as exc:  # an aside of the row: its failure must not discard the row's timing
        return dict(step_split_error=f"{type(exc).__name__}: {exc}")
    if on_gpu:
        torch.cuda.synchronize(device)
        gaps = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    else:
        gaps = [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]
    return dict(prefill_ms=gaps[0], step_ms=statistics.median(gaps[1:]) if len(gaps) > 1 else None)


def _recorded_generate(model, ids, mask, options, force=None, **extra):
    """Greedy generate that records each step's scores ([B, T, V] float32, the next-token logits after
    generate's own processors); with force ([B, T] tokens) it emits those tokens instead of its own argmax, so
    every step is scored on the same context (teacher forcing through the same generate and cache path)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Record(LogitsProcessor):
        def __init__(self):
            self.scores = []

        def __call__(self, input_ids, scores):
            self.scores.append(scores.float().clone())
            if force is None:
                return scores
            step = len(self.scores) - 1
            forced = torch.full_like(scores, float("-inf"))
            return forced.scatter_(1, force[:, step:step + 1], 0.0)

    record = Record()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([record]),
                             **options, **extra)
    return out[:, ids.shape[1]:], torch.stack(record.scores, dim=1)


# The low-precision check of the generate row. Free-running greedy tokens are no check in bf16 on random weights:
# the logits are flat (std ~0.64 over 32000 tokens at init scale) and the stock model's own top-2 margin is often
# one bf16 ulp of the logit (0.0156 near 2..4) or an exact tie, so any other summation order flips the argmax, and
# from that step on the row continues another text. Measured on CPU (bf16, hidden 1024, 8 and 16 layers, P=256,
# 8 rows x 16 tokens): stock SDPA vs stock eager attention agree on 66-70% of the tokens, stock SDPA on the same
# rows one at a time on 67-91%, ours on 55-95%; a WRONG cache (one prompt token changed) scores the same 55-57%.
# Every first divergence of a correct path sat at a stock margin of 0 or 0.0156. So the 45% of the GPU run says
# nothing either way. What does: score ours on the stock model's own tokens (teacher forced: every step on the same
# context, through the same generate and cache path) and compare the logits. Mean |dlogit| / std(stock logits):
# stock vs stock 0.9-1.1% (1.2-1.4 eps of bf16, torch.finfo eps = 2^-7), ours 1.1%; one wrong prompt token 4.4%,
# positions off by one 56%, another prompt 111%. Hence: mean error within 4 eps, and the same argmax wherever the
# stock margin is far above the noise (24 eps * std, ~0.12 there; the largest stock-vs-stock |dlogit| was 0.045).
_REL_TOLERANCE_EPS = 4
_DECISIVE_MARGIN_EPS = 24


def _teacher_forced_check(ours, stock, tokens, case) -> dict:
    finite = stock.isfinite()  # generate's min_new_tokens sets EOS to -inf in both
    scale = stock[finite].std()
    rel_err = float((ours - stock).abs()[finite].mean() / scale)
    eps = torch.finfo(case.torch_dtype).eps
    top2 = stock.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > _DECISIVE_MARGIN_EPS * eps * scale
    agree = ours.argmax(-1) == tokens
    # Counted in integers: a float32 mean of 951 agreements out of 951 came out 0.99999994 on the H100 and
    # flagged a correct row WRONG.
    decisive_steps, decisive_misses = int(decisive.sum()), int((decisive & ~agree).sum())
    decisive_match = 1.0 - decisive_misses / decisive_steps if decisive_steps else 1.0
    tolerance = _REL_TOLERANCE_EPS * eps
    return dict(logits_rel_err=rel_err, tolerance=tolerance, teacher_forced_match=float(agree.double().mean()),
                decisive_steps=decisive_steps, decisive_match=decisive_match,
                correct=rel_err <= tolerance and decisive_misses == 0)


def run_models(cases, device, progress=None, sink: list | None = None) -> list[dict]:
    """The model rows of `cases`, appended to `sink` (when given) row by row."""
    rows = sink if sink is not None else []
    with warnings.catch_warnings():
        # transformers/PEFT deprecation notices (past_key_values -> cache, ...) are not ours to act on here
        warnings.simplefilter("ignore", FutureWarning)
        for case in cases:
            _run_model(case, device, progress, rows)
    return rows


def _run_model(case, device, progress, rows) -> list[dict]:
    if case.op == "train_step":
        return train_step_rows(case, device, progress, rows)
    if case.op == "generate":
        return generate_rows(case, device, progress, rows)
    raise ValueError(f"unknown model op {case.op!r}")


def _ours_variants(case: ModelCase, device) -> list[tuple[str, str]]:
    """(provider, backend) of our rows: the default backend, and the CUDA kernels where the extension is built
    and covers the model (CUDA tensors, fp16/bf16, head dim 64 or 128), timed side by side so that "auto" can be
    told to prefer them once they win."""
    from .. import cuda

    serves = (cuda.UNAVAILABLE_REASON is None and torch.device(device).type == "cuda"
              and case.torch_dtype in cuda.DTYPES and case.hidden // case.heads_q in cuda.HEAD_DIMS)
    return [("ours", "auto")] + ([("ours-cuda", "cuda")] if serves else [])


def count_model_rows(cases, device) -> int:
    """Rows per case: the baseline, ours per backend, and ours-checkpointed, ours-lean and ours-lean-torch
    (train_step) or ours-static-cache (generate)."""
    return sum(2 + 2 * (case.op == "train_step") + len(_ours_variants(case, device)) for case in cases)
