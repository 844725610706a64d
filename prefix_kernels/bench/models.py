"""Model-level rows on a Llama-architecture config with random weights.

train_step: one prefix-tuning optimizer step (forward, backward, AdamW on the prefix).
    peft  = a PeftModel with a PrefixTuningConfig (the prefix expanded to B copies and concatenated in every layer).
    ours  = the same PeftModel after `prefix_kernels.patch(peft_model)` (issue 5); "n/a" until that exists.
generate: greedy `generate` of new tokens for B rows that share one prompt.
    hf-generate = stock HF generate with the prompt repeated in each row.
    ours-shared-cache = generate on the rows' own tokens with `SharedPrefixCache.from_prompt` (issue 6); "n/a"
    until that exists. Its new tokens are compared with stock's.
Peak memory is what the step allocated beyond what was resident before it (weights, optimizer state, inputs).
"""
from __future__ import annotations

import gc
import statistics
import time
import traceback
import warnings

import torch

from .cases import ModelCase
from .timing import PeakMemory, time_calls_ms

NOT_YET = "not available yet: prefix_kernels.{name} does not exist (issue {issue})"


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
    except _Unavailable as exc:
        row.update(status="n/a", reason=str(exc))
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=6))
        if progress is not None:
            progress.write(f"error: {row['provider']} on {row['op']}: {type(exc).__name__}: {exc}")
    row["wall_s"] = time.perf_counter() - started
    if progress is not None:
        progress.step(f"{row['op']} {row['provider']}")
    return row


class _Unavailable(Exception):
    pass


def train_step_rows(case: ModelCase, device, progress=None) -> list[dict]:
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

    tokens = case.batch * case.seq

    def peft_body():
        result = _timed(step, case, device)
        result["tokens_per_s"] = tokens / (result["time_ms"] * 1e-3)
        return result

    rows = [_guarded(_row(case, "peft", "baseline", "PEFT PrefixTuning (prefix expanded + cat in every layer)"),
                     peft_body, progress)]

    def ours_body():
        patch = getattr(prefix_kernels, "patch", None)
        if patch is None:
            raise _Unavailable(NOT_YET.format(name="patch", issue=5))
        reference_loss = loss_now()
        patched = current["model"] = patch(peft_model)
        try:
            loss = loss_now()
            result = _timed(step, case, device)
        finally:
            unpatch = getattr(prefix_kernels, "unpatch", None)
            if unpatch is not None:
                unpatch(patched)
            current["model"] = peft_model
        result["tokens_per_s"] = tokens / (result["time_ms"] * 1e-3)
        rel = abs(loss - reference_loss) / max(abs(reference_loss), 1e-6)
        tol = 1e-4 if case.dtype == "fp32" else 2e-2
        result.update(loss=loss, reference_loss=reference_loss, loss_rel_err=rel, tolerance=tol, correct=rel <= tol)
        return result

    rows.append(_guarded(_row(case, "ours", "ours", "prefix_kernels.patch(peft_model): attention through the kernels"),
                         ours_body, progress))
    del model, peft_model, optimizer, params
    _free(device)
    return rows


def generate_rows(case: ModelCase, device, progress=None) -> list[dict]:
    import prefix_kernels

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

    def stock():
        with torch.no_grad():
            out = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **options)
        stock_tokens["new"] = out[:, -case.new_tokens:]
        return out

    def stock_body():
        result = _timed(stock, case, device)
        result["tokens_per_s"] = new_tokens / (result["time_ms"] * 1e-3)
        return result

    rows = [_guarded(_row(case, "hf-generate", "baseline", "stock HF generate, prompt repeated in every row"),
                     stock_body, progress)]

    def ours_body():
        cache_cls = getattr(prefix_kernels, "SharedPrefixCache", None)
        if cache_cls is None:
            raise _Unavailable(NOT_YET.format(name="SharedPrefixCache", issue=6))
        produced = {}

        def ours():
            with torch.no_grad():
                cache = cache_cls.from_prompt(model, prompt[None])  # the prompt's KV, once, inside the timing
                out = model.generate(input_ids=suffixes, attention_mask=suffix_mask, past_key_values=cache,
                                     **options)
            produced["new"] = out[:, -case.new_tokens:]
            return out

        result = _timed(ours, case, device)
        result["tokens_per_s"] = new_tokens / (result["time_ms"] * 1e-3)
        if "new" in stock_tokens:
            match = float((produced["new"] == stock_tokens["new"]).float().mean())
            # Greedy ties can flip in low precision; fp32 must match exactly.
            needed = 1.0 if case.dtype == "fp32" else 0.9
            result.update(token_match=match, correct=match >= needed)
        return result

    rows.append(_guarded(_row(case, "ours-shared-cache", "ours",
                              "generate on own tokens with SharedPrefixCache.from_prompt (prompt KV stored once)"),
                         ours_body, progress))
    del model
    _free(device)
    return rows


def run_models(cases, device, progress=None) -> list[dict]:
    rows = []
    with warnings.catch_warnings():
        # transformers/PEFT deprecation notices (past_key_values -> cache, ...) are not ours to act on here
        warnings.simplefilter("ignore", FutureWarning)
        for case in cases:
            rows += _run_model(case, device, progress)
    return rows


def _run_model(case, device, progress) -> list[dict]:
    if case.op == "train_step":
        return train_step_rows(case, device, progress)
    if case.op == "generate":
        return generate_rows(case, device, progress)
    raise ValueError(f"unknown model op {case.op!r}")


def count_model_rows(cases) -> int:
    return 2 * len(cases)
