"""StaticSharedPrefixCache: the own tokens preallocated, so that generate() can compile its decode step.

What a GPU run compiles (torch.compile, mode "reduce-overhead": CUDA graphs) is checked here on CPU through the same
door: transformers' automatic compilation of compileable caches (on CPU only when the compile config asks), with
fullgraph=True, so that a graph break, a host sync or a recompilation per step fails the test.
"""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prefix_kernels  # noqa: E402
from prefix_kernels.hf.attention import padding_mask_function  # noqa: E402
from test_cache import (NEW, PROMPT, SUFFIXES, VOCAB, generate, left_padded, random_inputs, rows_of,  # noqa: E402
                        stock_rows, tiny_model)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


def static_cache(model, prompt, width, new=NEW, backend="auto"):
    return prefix_kernels.StaticSharedPrefixCache.from_prompt(model, prompt, max_cache_len=width + new,
                                                              backend=backend)


def compiled_decode(device):
    """generate()'s compile config with fullgraph: one graph for the decode step or an error. On a GPU what
    generate() uses by default (inductor, "reduce-overhead": CUDA graphs); on CPU inductor without graphs (its C++
    code around the kernels' custom op, which runs under the interpreter), forced there by the config's flag."""
    if device.type == "cuda":
        return dict(compile_config=transformers.CompileConfig(fullgraph=True))
    config = transformers.CompileConfig(fullgraph=True, backend="inductor", mode=None)
    config._compile_all_devices = True
    return dict(compile_config=config)


def scores(model, ids, mask, cache, **options):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, past_key_values=cache, output_logits=True,
                             return_dict_in_generate=True, **options)
    return out.sequences, torch.stack(out.logits, dim=1)


def test_mask_of_a_static_decode_step():
    """One query over a static layer's whole buffer: the written slots (q_offset of them, plus the one being
    written) that the padding mask keeps; nothing past them."""
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    got = padding_mask_function(2, 1, 7, q_offset=torch.tensor(3), attention_mask=mask)
    assert torch.equal(got, torch.tensor([[0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool))
    got = padding_mask_function(2, 1, 7, q_offset=torch.tensor(3), attention_mask=None)
    assert torch.equal(got, torch.tensor([[1, 1, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool))
    # a dynamic cache (q_offset an int): the keys are exactly the mask's, as before
    assert padding_mask_function(2, 1, 4, q_offset=3, attention_mask=None) is None
    assert torch.equal(padding_mask_function(2, 1, 4, q_offset=3, attention_mask=mask), mask.bool())


def test_left_padding_of_a_static_decode_step():
    """The keys before a row's first real one plus the slots not written yet (its prompt moves right by them), at
    most the buffer's length: a row with no real key would count its slots twice."""
    from prefix_kernels.hf.attention import _left_padding

    mask = torch.tensor([[False, True, True, False, False], [True, True, True, True, False], [False] * 5])
    assert _left_padding(mask, mask, unwritten=True).tolist() == [3, 1, 5]
    assert _left_padding(mask.clone(), mask, unwritten=False).tolist() == [1, 0, 5]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_stock_and_the_dynamic_cache(family):
    model = tiny_model(family)
    prompt, suffixes = random_inputs()
    want = stock_rows(model, prompt, suffixes)
    ids, mask = left_padded(suffixes)
    dynamic = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    want_ids, want_logits = scores(model, ids, mask, dynamic)

    cache = static_cache(model, prompt, ids.shape[1])
    assert cache.is_compileable and cache.prefix_length == PROMPT
    got_ids, got_logits = scores(model, ids, mask, cache)
    for i, (got, expected) in enumerate(zip(rows_of(got_ids, suffixes, ids.shape[1]), want)):
        assert torch.equal(got, expected), f"row {i}: {got.tolist()} != {expected.tolist()}"
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    # the own part is one preallocated buffer per layer; the last generated token is not fed back
    assert cache.layers[0].keys.shape[:3] == (len(SUFFIXES), 2, ids.shape[1] + NEW)
    assert int(cache.get_seq_length()) == ids.shape[1] + NEW - 1

    # reset() keeps the prompt and the buffers (their addresses: the compiled step's inputs)
    address = cache.layers[0].keys.data_ptr()
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    again, again_logits = scores(model, ids, mask, cache)
    assert torch.equal(again, got_ids) and cache.layers[0].keys.data_ptr() == address
    torch.testing.assert_close(again_logits, want_logits, rtol=1e-4, atol=1e-4)


def test_one_token_suffixes_on_a_fresh_cache():
    """The first forward of a new cache with one token per row: a prefill (the layer is not initialized, its count
    still the int 0), so it must get the written key only, not the whole buffer."""
    model = tiny_model("llama")
    prompt, _ = random_inputs()
    suffixes = [torch.randint(2, VOCAB, (1,)) for _ in range(2)]
    want = stock_rows(model, prompt, suffixes)
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, past_key_values=static_cache(model, prompt, 1))
    for got, expected in zip(rows_of(out, suffixes, 1), want):
        assert torch.equal(got, expected)
    with torch.no_grad():  # and a plain forward, without a mask
        got = model(input_ids=ids[:1], past_key_values=static_cache(model, prompt, 1)).logits[0, -1]
        dynamic = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
        expected = model(input_ids=ids[:1], past_key_values=dynamic).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox", "gemma"])
def test_other_families_equal_stock(family):
    """Learned positions (GPT-2), OPT's positions from the mask, GPT-NeoX's partial rotary, Gemma: per row equal."""
    from test_hf import CONFIGS

    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager").eval()
    prompt, suffixes = random_inputs()
    want = stock_rows(model, prompt, suffixes)
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, past_key_values=static_cache(model, prompt, ids.shape[1]))
    for i, (got, expected) in enumerate(zip(rows_of(out, suffixes, ids.shape[1]), want)):
        assert torch.equal(got, expected), f"row {i}: {got.tolist()} != {expected.tolist()}"


@pytest.mark.parametrize("prompts,family", [(1, "llama"), (3, "llama"), (1, "mistral")],
                         ids=["one-prompt", "three-prompts", "window-over-the-prompt"])
def test_compiled_decode_step_is_one_graph_and_equals_stock(device, prompts, family):
    """The decode step through the Triton kernels (the custom op), compiled whole: tokens equal the stock model's,
    one graph for every step and both batches (a recompilation per step would be a new graph). With several
    prompts (from_prompts) the second batch continues other prompts: reset(prefix_index=...) writes the index in
    place, where the compiled step reads it. Mistral's window (13) slides over the 11-token prompt."""
    from torch._dynamo.utils import counters
    from test_hf import tiny_model as hf_tiny_model

    model = (tiny_model(family) if family == "llama" else hf_tiny_model(family, sliding_window=PROMPT + 2)).to(device)
    prompt, suffixes = random_inputs()
    prompt, suffixes = prompt.to(device), [s.to(device) for s in suffixes]
    others = [torch.randint(2, VOCAB, (n,), device=device) for n in (5, 8)][:prompts - 1]
    batches = [[0, 0, 0], [0, 0, 0]] if prompts == 1 else [[2, 1, 0], [1, 1, 2]]
    choices = [prompt] + others
    ids, mask = (t.to(device) for t in left_padded(suffixes))
    width = ids.shape[1] + NEW
    if prompts == 1:
        cache = prefix_kernels.StaticSharedPrefixCache.from_prompt(model, prompt, max_cache_len=width,
                                                                   backend="triton")
    else:
        cache = prefix_kernels.StaticSharedPrefixCache.from_prompts(model, choices, prefix_index=batches[0],
                                                                    max_cache_len=width, backend="triton")
    torch._dynamo.reset()
    counters.clear()
    for n, index in enumerate(batches):
        if n:
            cache.reset(**({} if prompts == 1 else dict(prefix_index=index)))
        out = generate(model, ids, mask, past_key_values=cache, **compiled_decode(device))
        for i, got in enumerate(rows_of(out, suffixes, ids.shape[1])):
            expected = stock_rows(model, choices[index[i]], suffixes[i:i + 1])[0]
            assert torch.equal(got, expected), f"row {i}: {got.tolist()} != {expected.tolist()}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_load_prompt_replaces_the_prefix_in_place():
    model = tiny_model("llama")
    prompt, suffixes = random_inputs()
    other = torch.randint(2, VOCAB, (PROMPT,))
    ids, mask = left_padded(suffixes)
    cache = static_cache(model, prompt, ids.shape[1])
    generate(model, ids, mask, past_key_values=cache)
    address = cache.prefix_k[0].data_ptr()
    cache.load_prompt(model, other)
    assert cache.prefix_k[0].data_ptr() == address and int(cache.get_seq_length()) == 0
    out = generate(model, ids, mask, past_key_values=cache)
    for got, expected in zip(rows_of(out, suffixes, ids.shape[1]), stock_rows(model, other, suffixes)):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="another length"):
        cache.load_prompt(model, other[:-1])


def test_refusals():
    model = tiny_model("llama")
    prompt, suffixes = random_inputs()
    ids, mask = left_padded(suffixes)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        prefix_kernels.StaticSharedPrefixCache.from_prompt(model, prompt, max_cache_len=0)
    cache = static_cache(model, prompt, ids.shape[1] - 1, new=0)  # no room for the suffixes
    with pytest.raises(ValueError, match="exceed the StaticSharedPrefixCache's max_cache_len"):
        generate(model, ids, mask, past_key_values=cache)
    cache = static_cache(model, prompt, ids.shape[1], new=2)  # room for 2 of the NEW tokens: refused at the third
    room = ids.shape[1] + 2
    with pytest.raises(ValueError, match=rf"\({room} \+ 1\) exceed the StaticSharedPrefixCache's max_cache_len "
                                         rf"\({room}\)"):
        generate(model, ids, mask, past_key_values=cache)
    cache = static_cache(model, prompt, ids.shape[1])
    generate(model, ids, mask, past_key_values=cache)
    # a new batch without reset() would continue after the old rows' tokens
    with pytest.raises(ValueError, match="reset"):
        generate(model, ids, mask, past_key_values=cache)
    cache.reset()
    with pytest.raises(ValueError, match="holds batches of 3 rows"):
        generate(model, ids[:2], mask[:2], past_key_values=cache)
    # transformers' own StaticCache hands every step its whole buffer: refused on a patched model, not misread
    with pytest.raises(ValueError, match="StaticCache .* is not supported"):
        generate(model, ids, mask, cache_implementation="static")
    config = transformers.MistralConfig(**{**model.config.to_dict(), "model_type": "mistral"},
                                        sliding_window=ids.shape[1] + NEW - 1)
    mistral = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match=r"max_cache_len \(13\) exceeds the model's sliding window \(12\)"):
        static_cache(mistral, prompt, ids.shape[1])


# (test_hf.SLIDING_FAMILIES; not imported here: test_hf skips itself without peft)
SLIDING_FAMILIES = ["mistral", "gemma2", "gemma3_text", "dots1", "exaone_moe", "ministral3", "vaultgemma", "gpt_oss"]


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_own_tokens_past_a_sliding_familys_window_are_refused(family):
    """The window reaches the attention as the model's own argument; the serving cache reads it from the families
    table (Family.window), and a static cache whose own tokens pass it is refused (its decode step would lose keys
    the stock model sees). A sliding family whose table entry names no window would serve those silently."""
    from test_hf import tiny_model as hf_tiny_model

    model = hf_tiny_model(family, sliding_window=6)
    with pytest.raises(ValueError, match=r"max_cache_len \(7\) exceeds the model's sliding window \(6\)"):
        static_cache(model, torch.randint(2, VOCAB, (PROMPT,)), 7, new=0)


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_sliding_window_over_the_prompt_equals_stock_and_the_dynamic_cache(family):
    """A window of 13 over an 11-token prompt and 13 own slots per row: its decode steps see the whole buffer, the
    query at its end, so the attention moves the prompt right by the slots not written yet; the rows are
    left-padded by 4, 0 and 6. Tokens per row against the stock model, logits against the dynamic cache's."""
    from test_hf import tiny_model as hf_tiny_model

    model = hf_tiny_model(family, sliding_window=PROMPT + 2)
    prompt, suffixes = random_inputs()
    want = stock_rows(model, prompt, suffixes)
    ids, mask = left_padded(suffixes)
    want_ids, want_logits = scores(model, ids, mask, prefix_kernels.SharedPrefixCache.from_prompt(model, prompt))
    cache = static_cache(model, prompt, ids.shape[1])
    assert cache.prefix_length + ids.shape[1] + NEW > PROMPT + 2   # the window leaves the prompt's first keys
    got_ids, got_logits = scores(model, ids, mask, cache)
    for i, (got, expected) in enumerate(zip(rows_of(got_ids, suffixes, ids.shape[1]), want)):
        assert torch.equal(got, expected), f"row {i}: {got.tolist()} != {expected.tolist()}"
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    # a prefill of right-padded rows: its keys end in padding, not in unwritten slots (only a decode step's are)
    right = torch.stack([torch.cat([s, s.new_zeros(ids.shape[1] - len(s))]) for s in suffixes])
    right_mask = torch.flip(mask, dims=[1])
    with torch.no_grad():
        dynamic = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
        want = model(input_ids=right, attention_mask=right_mask, past_key_values=dynamic).logits
        got = model(input_ids=right, attention_mask=right_mask, past_key_values=static_cache(model, prompt,
                                                                                              ids.shape[1])).logits
    real = right_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
