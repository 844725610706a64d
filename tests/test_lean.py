"""lean_training: the same losses and prefix gradients as the stock modules, with less kept for backward.

"Kept for backward" is measured exactly, on CPU: the bytes of every distinct storage autograd saves during a forward
(torch.autograd.graph.saved_tensors_hooks), which is the activation memory a GPU step holds at its peak.
"""
import gc

import pytest
import torch

transformers = pytest.importorskip("transformers")

import prefix_kernels  # noqa: E402
from prefix_kernels.hf.compat import enable_activation_checkpointing  # noqa: E402
from prefix_kernels.hf.lean import causal_lm_loss, lean_training  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, B, S, P = 96, 64, 160, 2, 3, 13, 5
# On a GPU the models run there (the kernels run on CUDA tensors); on CPU the kernels run under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(family="llama", dtype=torch.float32):
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig}[family]
    config = config_class(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(DEVICE, dtype)
    model.requires_grad_(False)
    prefix = prefix_kernels.PrefixTuning(model, num_virtual_tokens=P)
    with torch.no_grad():
        for p in prefix.parameters():
            p.normal_(0, 1)
    prefix_kernels.patch(model, prefix, backend="torch")  # the naive attention: bf16 runs on CPU too
    return model, prefix


def step(model, prefix, ids, labels):
    prefix.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in prefix.named_parameters()}


def saved_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


# "triton" runs the fused kernels (under the interpreter on CPU: fp32 and fp16 only, so the bf16 model tests run
# the PyTorch formulas here and both on a GPU); the kernels' own sweep is tests/test_lean_ops.py.
BF16_BACKEND = "auto" if torch.cuda.is_available() else "torch"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fp32_loss_and_prefix_gradients_equal_stock(family, backend):
    model, prefix = tiny(family)
    ids = torch.randint(0, VOCAB, (B, S), device=DEVICE)
    labels = ids.clone()
    labels[0, :4] = -100  # ignored positions
    want_loss, want_grads = step(model, prefix, ids, labels)
    assert lean_training(model, backend=backend) == {"mlp": LAYERS, "norm": 2 * LAYERS + 1, "rope": 1, "loss": 1}
    got_loss, got_grads = step(model, prefix, ids, labels)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    # restored: the class's own forward and loss again
    assert lean_training(model, enable=False) == {"mlp": LAYERS, "norm": 2 * LAYERS + 1, "rope": 1, "loss": 1}
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "_loss_function" not in model.__dict__
    again_loss, _ = step(model, prefix, ids, labels)
    assert torch.equal(again_loss, want_loss)


def test_with_gradient_checkpointing():
    """Recomputed layers run the lean modules twice (forward, then again in backward): the same prefix gradients."""
    model, prefix = tiny()
    ids = torch.randint(0, VOCAB, (B, S), device=DEVICE)
    want_loss, want_grads = step(model, prefix, ids, ids)
    enable_activation_checkpointing(model)
    model.train()
    lean_training(model)
    got_loss, got_grads = step(model, prefix, ids, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)


def test_modules_with_an_instance_forward_are_left_alone():
    """accelerate's hooks (device maps, offload) set forward on the instance: such a module keeps it."""
    model, _ = tiny()
    hooked = model.model.layers[0].mlp
    hooked.forward = hooked.forward  # what add_hook_to_module does, in essence
    assert lean_training(model)["mlp"] == LAYERS - 1
    assert hooked.__dict__["forward"].__func__ is type(hooked).forward
    lean_training(model, enable=False)
    assert "forward" in hooked.__dict__  # still its own


def test_a_lean_forward_wrapped_afterwards_is_not_restored_from_under_the_wrapper():
    """A hook added after lean_training wraps the lean forward (accelerate keeps it as _old_forward): restoring then
    dropped the hook, and removing the hook later put the lean forward back without its state, a KeyError at the
    next forward (found by fuzzing). The restore refuses, naming the module, and works once the hook is gone."""
    model, _ = tiny()
    ids = torch.randint(0, VOCAB, (B, S), device=DEVICE)
    lean_training(model, backend="torch")
    norm = model.model.norm
    lean_forward = norm.forward
    norm.forward = lambda *args, **kwargs: lean_forward(*args, **kwargs)  # what add_hook_to_module does
    with pytest.raises(ValueError, match=r"the forward of model\.norm was replaced after lean_training"):
        lean_training(model, enable=False)
    assert "_prefix_kernels_lean" in model.model.layers[0].mlp.__dict__  # nothing was restored
    norm.forward = lean_forward  # accelerate's remove_hook_from_module
    assert lean_training(model, enable=False)["norm"] == 2 * LAYERS + 1
    assert "forward" not in norm.__dict__
    model(input_ids=ids)


def test_bf16_logits_equal_and_gradients_within_rounding():
    model, prefix = tiny(dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (B, S), device=DEVICE)
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
    want_loss, want_grads = step(model, prefix, ids, ids)
    lean_training(model, backend=BF16_BACKEND)
    with torch.no_grad():
        got_logits = model(input_ids=ids).logits
    if BF16_BACKEND == "torch":
        assert torch.equal(got_logits, want_logits)  # the forward's own operations
    else:  # the kernels: the same rounding points, a float32 sum in another order may flip a rare bf16 ulp
        torch.testing.assert_close(got_logits, want_logits, rtol=2e-2, atol=2e-2)
    got_loss, got_grads = step(model, prefix, ids, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=0)  # float32 reductions in both
    for name, want in want_grads.items():
        error = (got_grads[name].float() - want.float()).norm() / want.float().norm()
        assert error < 2e-2, f"{name}: relative error {error:.3g}"  # bf16 rounding of reordered float32 sums


def test_keeps_less_for_backward():
    """One [tokens, intermediate] tensor fewer per MLP, the norms' inputs at half the bytes (all but the first
    layer's input norm, whose input needs no gradient in either), bf16 logits instead of a float32 log-softmax:
    the bytes autograd saves drop by that much, less the loss's per-token stats (max and log-sum, 8 bytes), labels
    (8) and keep flag (1)."""
    model, prefix = tiny(dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (B, S), device=DEVICE)

    def forward():
        model(input_ids=ids, labels=ids)

    stock = saved_bytes(forward)
    lean_training(model, backend=BF16_BACKEND)
    lean = saved_bytes(forward)
    tokens = B * S
    expected = (LAYERS * tokens * INTER * 2         # the MLP activation (bf16)
                + 2 * LAYERS * tokens * HIDDEN * 2  # the norms: a bf16 input instead of a float32 copy
                + tokens * VOCAB * (4 - 2))         # bf16 logits instead of a float32 log-softmax
    assert expected - tokens * 17 <= stock - lean <= expected, (stock, lean, expected)


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "torch"), (torch.float32, "triton"),
                                           (torch.float16, "triton"), (torch.bfloat16, "torch")])
@pytest.mark.parametrize("items", [None, 17])
def test_loss_equals_transformers_loss(dtype, backend, items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 9, VOCAB, dtype=dtype, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9), device=DEVICE)
    labels[1, 3:6] = -100
    want = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=items)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=items, backend=backend)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # relative to each element (the gradients are ~1/(N V), far below an absolute tolerance of one ulp of 1, which
    # let a gradient without its softmax term pass in bf16): at 16 bits one rounding of the same float32 value, or
    # one ulp off; in float32 the two formulas' own roundings (measured up to 1.04e-6 over 300 draws); absolute only
    # at fp16's subnormal spacing (2^-24), where its tiny probabilities land
    rtol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    atol = {torch.float16: 2.0 ** -23}.get(dtype, 0.0)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=rtol, atol=atol)


def test_chunked_loss_equals_one_chunk(monkeypatch):
    from prefix_kernels import lean_reference

    logits = torch.randn(1, 11, VOCAB, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, 11), device=DEVICE)
    whole = causal_lm_loss(logits, labels, VOCAB, backend="torch")
    (whole_grad,) = torch.autograd.grad(whole, logits)
    monkeypatch.setattr(lean_reference, "LOSS_CHUNK_BYTES", 4 * VOCAB * 3)  # three rows a chunk
    chunked = causal_lm_loss(logits, labels, VOCAB, backend="torch")
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert torch.equal(chunked, whole) and torch.equal(chunked_grad, whole_grad)


def stock_rotary(modeling):
    """The module's function once the lean models of earlier tests (never restored) are collected and swept."""
    gc.collect()
    lean_training(torch.nn.Module())  # every call sweeps dispatchers no live lean model uses
    assert not hasattr(modeling.apply_rotary_pos_emb, "__wrapped__")
    return modeling.apply_rotary_pos_emb


def test_rotary_embedding_through_the_kernel_only_for_lean_models(monkeypatch):
    """apply_rotary_pos_emb is a module-level function: lean_training replaces it in the modeling file by a
    dispatcher that runs the kernel on a lean model's cos/sin only; another model of the family, not lean, gets
    the stock function's results; the last lean model's restore puts the original back."""
    from transformers.models.llama import modeling_llama

    from prefix_kernels.triton import lean_ops

    original = stock_rotary(modeling_llama)
    calls = []
    real = lean_ops.rope_forward
    monkeypatch.setattr(lean_ops, "rope_forward", lambda *a: calls.append(1) or real(*a))
    lean_model, lean_prefix = tiny()
    other, other_prefix = tiny()
    ids = torch.randint(0, VOCAB, (B, S), device=DEVICE)
    want_loss, want_grads = step(lean_model, lean_prefix, ids, ids)
    other_loss, _ = step(other, other_prefix, ids, ids)
    assert lean_training(lean_model, backend="triton")["rope"] == 1
    second, _ = tiny()
    lean_training(second, backend="torch")  # "torch": the dispatcher hands its calls to the original
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is original
    got_loss, got_grads = step(lean_model, lean_prefix, ids, ids)
    assert len(calls) == LAYERS
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(step(other, other_prefix, ids, ids)[0], other_loss) and len(calls) == LAYERS
    lean_training(lean_model, enable=False)
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is original  # `second` still uses it
    lean_training(second, enable=False)
    assert modeling_llama.apply_rotary_pos_emb is original


def test_rotary_dispatcher_passes_other_calls_through_and_follows_copies():
    """Calls the kernel does not cover (an older signature with position_ids, another unsqueeze_dim, untagged cos)
    reach the function it replaced with their arguments; a deep copy of a lean model (TRL's reference model) uses
    the kernel too once lean_training is called on it, after the original is restored."""
    import copy

    from transformers.models.llama import modeling_llama

    from prefix_kernels.hf.lean import _RopeInstall
    from prefix_kernels.triton import lean_ops

    original = stock_rotary(modeling_llama)
    seen = []
    dispatcher = _RopeInstall(lambda *args, **kwargs: seen.append((args[4:], kwargs)) or "replaced").dispatcher
    q = k = torch.randn(2, 3, 5, 8, device=DEVICE)
    cos, sin = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE)
    assert dispatcher(q, k, cos, sin) == "replaced"  # untagged: another model's call
    setattr(cos, "_prefix_kernels_lean_rope", "triton")
    for args, kwargs in [((None, 1), {}), ((2,), {}), ((), {"position_ids": None}), ((), {"unsqueeze_dim": 2})]:
        assert dispatcher(q, k, cos, sin, *args, **kwargs) == "replaced"
    assert seen == [((), {}), ((None, 1), {}), ((2,), {}), ((), {"position_ids": None}), ((), {"unsqueeze_dim": 2})]
    for args, kwargs in [((), {}), ((1,), {}), ((), {"unsqueeze_dim": 1})]:  # the kernel's calls
        got_q, _ = dispatcher(q, k, cos, sin, *args, **kwargs)
        want_q = modeling_llama.rotate_half(q) * sin.unsqueeze(1) + q * cos.unsqueeze(1)
        torch.testing.assert_close(got_q, want_q)
    assert len(seen) == 5

    model, _ = tiny()
    lean_training(model, backend="triton")
    twin = copy.deepcopy(model)
    lean_training(model, enable=False)  # the original's restore must not take the kernel away from the copy
    lean_training(twin, backend="triton")
    calls = []
    real = lean_ops.rope_forward
    try:
        lean_ops.rope_forward = lambda *a: calls.append(1) or real(*a)
        twin(input_ids=torch.randint(0, VOCAB, (B, S), device=DEVICE))
    finally:
        lean_ops.rope_forward = real
    assert len(calls) == LAYERS
    lean_training(twin, enable=False)
    assert modeling_llama.apply_rotary_pos_emb is original
