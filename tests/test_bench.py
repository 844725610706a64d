"""The benchmark suite runs end to end on a CPU (smoke preset) and its correctness guard catches a wrong provider."""
import json
import os

import pytest
import torch

from prefix_kernels.bench import main as bench_main
from prefix_kernels.bench.cases import OpCase, get_preset
from prefix_kernels.bench.main import INCOMPLETE, parse_args, run
from prefix_kernels.bench.providers import Prepared, Provider
from prefix_kernels.bench.report import markdown
from prefix_kernels.bench.roofline import floor_ms, op_bytes, op_flops, visible_pairs
from prefix_kernels.bench.timing import graph_bench_ms


def _drops_the_prefix(case, inputs):
    """A fast, wrong provider: attends to the sequence's own keys only."""
    q, k, v = inputs.q, inputs.k, inputs.v
    groups = case.heads_q // case.heads_kv

    def forward():
        kk, vv = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=case.causal and case.seq_q > 1)
    return Prepared(forward)


WRONG = Provider("wrong", "drops the prefix (test only)", "ours", ("forward", "decode"), _drops_the_prefix)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = parse_args(["--preset", "smoke", "--device", "cpu", "--out", str(out), "--no-progress", "--quiet",
                       "--warmup-ms", "1", "--rep-ms", "1"])
    return out, run(args, extra_providers=[WRONG])


def _sends_sigterm(case, inputs):
    """What `timeout` does to a run past its limit: SIGTERM, here while this provider's row is set up."""
    import signal

    os.kill(os.getpid(), signal.SIGTERM)
    return _drops_the_prefix(case, inputs)


def test_a_run_stopped_by_sigterm_writes_the_rows_it_finished(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    args = parse_args(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--quiet",
                       "--warmup-ms", "1", "--rep-ms", "1", "--ops", "forward", "--providers", "naive"])
    stopper = Provider("stopper", "sends SIGTERM (test only)", "ours", ("forward",), _sends_sigterm)
    result = run(args, extra_providers=[stopper])
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the run's only
    assert "SIGTERM" in result["interrupted"]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["interrupted"] == result["interrupted"]
    finished = [(r["op"], r["provider"], r["status"]) for r in data["rows"]]
    assert finished == [("forward", "naive", "ok")]  # the naive row before the stop, none after it
    assert "Interrupted" in (tmp_path / "smoke.md").read_text()


def _reads_the_checkpoint(case, inputs):
    """Reads the results JSON while this row is set up: what a SIGKILL (no handler runs) would leave now."""
    import pathlib

    _reads_the_checkpoint.seen = json.loads((pathlib.Path(_reads_the_checkpoint.out) / "smoke.json").read_text())
    return _drops_the_prefix(case, inputs)


def test_results_json_is_written_after_every_row(tmp_path):
    """A device call past its limit is killed outright (SIGKILL, rc 137), which no handler sees: the JSON on disk
    holds every finished row, marked incomplete, and the end of the run replaces it with the whole result."""
    _reads_the_checkpoint.out = tmp_path
    args = parse_args(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--quiet",
                       "--warmup-ms", "1", "--rep-ms", "1", "--ops", "forward", "--providers", "naive"])
    spy = Provider("spy", "reads the checkpoint (test only)", "ours", ("forward",), _reads_the_checkpoint)
    result = run(args, extra_providers=[spy])
    seen = _reads_the_checkpoint.seen
    assert seen["interrupted"] == INCOMPLETE
    final = json.loads((tmp_path / "smoke.json").read_text())
    assert final["interrupted"] is None and len(final["rows"]) == len(result["rows"])
    key = lambda row: (row["label"], row["provider"], row["status"])  # noqa: E731
    # the spy's last row (the run's last) saw every row before it, none after
    assert [key(r) for r in seen["rows"]] == [key(r) for r in final["rows"][:-1]]
    assert seen["rows"][0]["provider"] == "naive" and seen["environment"] == final["environment"]


def test_gpu_check_cuts_each_step_to_the_time_left():
    """DEADLINE_S: each step's timeout is its own or what is left, and a step with under 20 s left is skipped
    (exit 125) rather than started (GNU timeout 0 would mean no limit at all)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
    functions = (f'eval "$(sed -n "/^script_start=/p;/^step_timeout() {{/,/^}}/p;/^timed() {{/,/^}}/p" {script})"; ')
    program = functions + ('DEADLINE_S=100 step_timeout 450; DEADLINE_S=100 step_timeout 30; '
                           'DEADLINE_S=25 step_timeout 450; step_timeout 300; '
                           'DEADLINE_S=25 timed 5 echo ran; echo "skipped $?"; DEADLINE_S=100 timed 5 echo ran')
    lines = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["90", "30", "0", "300", "skipped 125", "ran"]


def test_sigterm_inside_a_model_case_keeps_its_finished_rows(tmp_path, monkeypatch):
    import signal

    from prefix_kernels.bench import models

    calls = []
    step_times = models._step_times

    def stop_on_the_second_row(*args, **kwargs):  # hf-generate's, then the first of ours: SIGTERM there
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_times(*args, **kwargs)

    monkeypatch.setattr(models, "_step_times", stop_on_the_second_row)
    args = parse_args(["--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--quiet",
                       "--warmup-ms", "1", "--rep-ms", "1", "--ops", "generate"])
    result = run(args)
    assert "SIGTERM" in result["interrupted"]
    assert [(r["provider"], r["status"]) for r in result["rows"]] == [("hf-generate", "ok")]


def _rows(result, **match):
    return [r for r in result["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_smoke_writes_json_and_markdown(smoke):
    out, result = smoke
    data = json.loads((out / "smoke.json").read_text())
    env = data["environment"]
    assert env["cpu_timings_meaningless"] is True
    assert set(env["versions"]) >= {"torch", "triton", "transformers", "peft"} and env["commit"]
    assert data["ceilings"]["bandwidth_bytes_per_s"] > 0 and data["ceilings"]["matmul_flops_per_s"] > 0
    ops = {(r["op"], r["provider"]) for r in data["rows"]}
    for op in ("forward", "decode"):
        for provider in ("ours-triton", "ours-cuda", "naive", "prebuilt", "flex", "split"):
            assert (op, provider) in ops
    for provider in ("ours-triton", "naive", "prebuilt", "flex"):
        assert ("fwd+bwd", provider) in ops
    assert {("train_step", "peft"), ("train_step", "ours"), ("train_step", "ours-checkpointed"),
            ("train_step", "ours-lean"), ("train_step", "ours-lean-torch"),
            ("generate", "hf-generate"), ("generate", "ours-shared-cache"), ("generate", "ours-static-cache")} <= ops
    md = (out / "smoke.md").read_text()
    assert "mean nothing" in md
    for heading in ("## forward", "## fwd+bwd", "## decode", "## model level", "prefill / step"):
        assert heading in md


def test_baselines_agree_with_the_reference(smoke):
    _, result = smoke
    for name in ("naive", "prebuilt", "split"):
        for row in _rows(result, provider=name, kind="op"):
            if row["case"]["window"] is not None and name == "split":
                continue  # (test_window_rows_mask_every_baseline_as_the_kernels_do)
            assert row["status"] == "ok", row
            assert row["correct"] is True, row
            assert row["time_ms"] > 0 and row["floor_ms"] > 0 and row["pct_of_floor"] > 0
    lower_right = _rows(result, provider="naive-lower-right", kind="op")
    assert {r["op"] for r in lower_right} == {"forward", "fwd+bwd"}  # (decode: nothing to mask, the naive call)
    for row in lower_right:  # the bias's semantics are the contract's: prefix visible, own keys bottom-right causal
        if row["case"]["causal"] and row["case"]["seq_q"] > 1 and row["case"]["window"] is None:
            assert row["status"] == "ok" and row["correct"] is True, row
    assert any(r["status"] == "ok" and r["case"]["heads_q"] > r["case"]["heads_kv"] for r in lower_right)
    assert set([r for r in lower_right if r["op"] == "fwd+bwd" and r["case"]["window"] is None][0]["errors"]) == {
        "out", "q", "k", "v", "prefix_k", "prefix_v"}
    naive_bwd = _rows(result, provider="naive", op="fwd+bwd")[0]
    assert set(naive_bwd["errors"]) == {"out", "q", "k", "v", "prefix_k", "prefix_v"}
    prebuilt_bwd = _rows(result, provider="prebuilt", op="fwd+bwd")[0]
    assert prebuilt_bwd["errors"]["prefix_k"]["rel"] < 1e-3  # gradients mapped back onto the one prefix
    assert _rows(result, provider="prebuilt", op="forward")[0]["speedup_vs"]["naive"] > 0


def test_window_rows_mask_every_baseline_as_the_kernels_do(smoke):
    """A sliding-window row (the window over the prefix too, as transformers places a PEFT prefix): the naive concat
    and the pre-built one under a boolean mask, FlexAttention under its mask_mod, and ours all equal the reference;
    the baselines with no way to express the window say so instead of timing another op."""
    _, result = smoke
    window_rows = [r for r in _rows(result, kind="op") if r["case"]["window"] is not None]
    assert {r["op"] for r in window_rows} == {"forward", "fwd+bwd"} and all("W=" in r["label"] for r in window_rows)
    checked = ["naive", "prebuilt"] + (["ours-triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for row in window_rows:
        if row["provider"] in checked or (row["provider"] == "flex" and row["op"] == "forward"):
            assert row["status"] == "ok" and row["correct"] is True, row
        if row["provider"] in ("naive-lower-right", "split", "noprefix"):
            assert row["status"] == "n/a" and "window" in row["reason"], row
    for row in window_rows:
        if row["op"] == "fwd+bwd" and row["provider"] == "naive":
            assert set(row["errors"]) == {"out", "q", "k", "v", "prefix_k", "prefix_v"}


def test_roofline_counts_the_pairs_and_keys_a_window_leaves_visible():
    """visible_pairs against a count key by key (the prefix at positions -P..-1, always visible but for the window;
    query i at L - S + i), and op_bytes reading only the keys some window reaches."""
    for s, l, p, window, causal in [(16, 16, 8, 6, True), (5, 9, 3, 4, True), (1, 9, 3, 4, True),
                                    (7, 7, 0, 3, True), (5, 9, 3, 4, False), (5, 9, 3, 100, True), (3, 4, 5, 1, True),
                                    (9, 5, 3, 4, True), (9, 5, 3, None, True), (6, 6, 4, None, False)]:
        count, reached = 0, set()
        for i in range(s):
            pos = l - s + i
            for key in range(-p, l):
                if (key < 0 or key <= pos or not causal) and (window is None or pos - key < window):
                    count += 1
                    reached.add(key)
        case = OpCase("forward", 1, 2, 1, s, l, p, head_dim=32, dtype="fp32", window=window, causal=causal)
        assert visible_pairs(case) == count, (s, l, p, window, causal)
        if causal:  # (the bytes count the keys left of every window out; not the ones right of a causal row)
            keys = len(reached | set(range(max(reached, default=-p - 1) + 1, l)))
            q_and_out = 2 * 2 * s * 32
            assert op_bytes(case) == 4 * (q_and_out + 2 * keys * 32), (s, l, p, window)


def test_a_window_too_short_to_check_is_refused(capsys):
    """--window 1 leaves each query its own key alone: dq and dk are exactly zero there, and the guard's errors,
    relative to each reference tensor's size, would flag rounding noise as WRONG. The parser refuses it."""
    for text in ("1", "0", "-3"):
        with pytest.raises(SystemExit) as info:
            parse_args(["--window", text])
        assert info.value.code == 2 and "at least 2" in capsys.readouterr().err
    assert parse_args(["--window", "2"]).window == 2


def test_no_ratio_against_a_wrong_baseline_and_providers_described_per_kind(smoke):
    """A baseline row flagged WRONG gives no speedup; a name that is both an op provider and a model row (ours-cuda)
    keeps both descriptions (the model row's replaced the op row's in the Providers list)."""
    from prefix_kernels.bench.report import ratios

    rows = [dict(kind="op", op="forward", label="x", provider="naive", status="ok", time_ms=2.0, correct=False),
            dict(kind="op", op="forward", label="x", provider="flex", status="ok", time_ms=3.0, correct=True),
            dict(kind="op", op="forward", label="x", provider="ours-triton", status="ok", time_ms=1.0, correct=True)]
    ratios(rows)
    assert rows[2]["speedup_vs"] == {"flex": 3.0}
    _, result = smoke
    model_row = dict(kind="model", op="train_step", label="m", provider="ours-triton", role="ours",
                     description="the model row's own text", status="n/a", reason="test")
    md = markdown(dict(result, rows=result["rows"] + [model_row]))
    assert "- `ours-triton`: prefix_attention(backend='triton')" in md
    assert "- `ours-triton` (model rows): the model row's own text" in md


def test_forward_rows_also_take_q_as_hf_hands_it(smoke):
    """A forward case with q as a transposed [B, S, H, D] view (the patched HF model's layout): ours and the
    baselines run on it, and ours is checked against the reference there too."""
    _, result = smoke
    rows = [r for r in _rows(result, kind="op", op="forward") if r["case"]["q_layout"] == "bshd"]
    assert rows and all("q=bshd" in r["label"] for r in rows)
    # The smoke runs on the CPU: ours-triton serves it only under the interpreter (set by conftest where there
    # is no GPU); on a GPU machine it must say why it cannot.
    triton_on_cpu = os.environ.get("TRITON_INTERPRET") == "1"
    for provider in ("ours-triton", "naive") if triton_on_cpu else ("naive",):
        (row,) = [r for r in rows if r["provider"] == provider]
        assert row["status"] == "ok" and row["correct"] is True, row
    if not triton_on_cpu:
        (row,) = [r for r in rows if r["provider"] == "ours-triton"]
        assert row["status"] == "n/a" and "TRITON_INTERPRET" in row["reason"], row


def test_guard_flags_a_wrong_provider(smoke):
    out, result = smoke
    for row in _rows(result, provider="wrong"):
        assert row["status"] == "ok" and row["correct"] is False, row
    assert "**WRONG**" in (out / "smoke.md").read_text()


def test_missing_pieces_are_reported_not_faked(smoke):
    _, result = smoke
    for row in _rows(result, provider="ours-cuda"):
        assert row["status"] == "n/a" and row["reason"]
    for row in _rows(result, kind="model", role="baseline"):
        assert row["status"] == "ok" and row["time_ms"] > 0 and row["tokens_per_s"] > 0


def test_roofline_matches_the_anchors_floors():
    h200 = dict(bandwidth_bytes_per_s=4.25e12, matmul_flops_per_s=714e12)
    anchors = {c.label: c for c in get_preset("anchors").ops}
    decode = [c for c in anchors.values() if c.op == "decode"]
    expected_ms = [0.079, 0.068, 0.190, 0.097]  # ANCHORS.md, the four decode shapes in order
    for case, expected in zip(decode, expected_ms):
        assert floor_ms(case, h200)["floor_ms"] == pytest.approx(expected, rel=0.03)
    fwd = OpCase("forward", 8, 32, 32, 2048, 2048, 128)
    # ANCHORS: 4*B*H*D*(S^2/2 + S*P); ours counts the diagonal exactly (S*(S+1)/2).
    assert op_flops(fwd) == pytest.approx(4 * 8 * 32 * 128 * (2048 ** 2 / 2 + 2048 * 128), rel=1e-3)
    assert op_bytes(OpCase("decode", 64, 32, 32, 1, 256, 4096, dtype="bf16")) == pytest.approx(
        2 * (2 * 64 * 32 * 128 + 2 * 64 * 32 * 256 * 128 + 2 * 32 * 4096 * 128))


def test_cli_entry_runs_a_filtered_smoke(tmp_path):
    """Through the `prefix-kernels` console script's own entry (prefix_kernels.cli), as the README runs it."""
    from prefix_kernels import cli

    rc = cli.main(["bench", "--preset", "smoke", "--device", "cpu", "--ops", "decode", "--providers", "naive,split",
                   "--out", str(tmp_path), "--no-progress", "--quiet", "--warmup-ms", "1", "--rep-ms", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert {(r["op"], r["provider"]) for r in data["rows"]} == {("decode", "naive"), ("decode", "split")}


def test_cli_names_its_subcommands_and_refuses_others(capsys):
    import prefix_kernels.bench
    import prefix_kernels.bench.main  # noqa: F401  (this import used to rebind the package's main to the module)
    from prefix_kernels import cli

    assert callable(prefix_kernels.bench.main)

    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0 and "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["train"])
    assert info.value.code == 2 and "invalid choice: 'train'" in capsys.readouterr().err


def test_model_rows_of_ours_run_and_are_correct(smoke):
    """The smoke preset's model rows (head dim 32, fp32) run ours and check it: generate tokens all equal."""
    _, result = smoke
    for op in ("train_step", "generate"):
        rows = _rows(result, kind="model", op=op, role="ours")
        assert rows
        for row in rows:  # train_step: ours and ours-checkpointed (the same loss with recomputation)
            assert row["status"] == "ok", row.get("reason")
            assert row["correct"] is True
    for row in _rows(result, kind="model", op="train_step", role="ours"):  # fp32: PEFT's gradient to ~1e-6
        assert 0 <= row["prefix_grad_rel_err"] <= row["grad_tolerance"] == 1e-3, row["provider"]
    for row in _rows(result, kind="model", op="generate", role="ours"):  # the dynamic and the static cache
        assert row["token_match"] == 1.0, row["provider"]
    for row in _rows(result, kind="model", op="generate"):  # where the time goes: prefill, then per step
        assert row["prefill_ms"] > 0 and row["step_ms"] > 0, row["provider"]


def test_train_step_check_flags_a_patch_that_cuts_the_prefix_gradient(monkeypatch):
    """A patched model whose prefix gets no gradient (the PEFT bridge's prefix table detached, as a patch that
    lost the prefix's autograd would do) is flagged by the prefix-gradient check; the loss alone passes."""
    from prefix_kernels.bench import models
    from prefix_kernels.hf import peft as peft_bridge

    table = peft_bridge.PeftPrefixSource._table
    monkeypatch.setattr(peft_bridge.PeftPrefixSource, "_table", lambda self: table(self).detach())
    monkeypatch.setattr(models, "_timed", lambda fn, case, device: dict(time_ms=1.0, times_ms=[1.0], peak_bytes=None))
    case = next(c for c in get_preset("smoke").models if c.op == "train_step")
    rows = models.train_step_rows(case, "cpu")
    ours = [r for r in rows if r["role"] == "ours"]
    assert ours and all(r["status"] == "ok" for r in ours), [r.get("reason") for r in ours]
    for row in ours:
        assert row["loss_rel_err"] <= row["tolerance"], row["provider"]  # the loss alone would pass
        assert row["prefix_grad_rel_err"] == pytest.approx(1.0) and row["correct"] is False, row["provider"]


def test_low_precision_generate_check_flags_wrong_logits_not_ties():
    """bf16 generate rows compare teacher-forced logits: noise of a few eps passes (even where it flips a near-tie
    argmax), an error of a wrong cache does not."""
    from prefix_kernels.bench.cases import ModelCase
    from prefix_kernels.bench.models import _teacher_forced_check

    case = ModelCase("generate", batch=4, seq=4, prefix=8, new_tokens=5, dtype="bf16")
    generator = torch.Generator().manual_seed(0)
    stock = torch.randn(4, 5, 1000, generator=generator)
    stock[0, 0, :2] = 10.0  # an exact tie: either argmax is right
    tokens = stock.argmax(-1)
    noise = stock + 0.01 * torch.randn(stock.shape, generator=generator)
    noise[0, 0, 0], noise[0, 0, 1] = 10.0, 10.01  # the noise picks the other of the tied pair
    ok = _teacher_forced_check(noise, stock, tokens, case)
    assert ok["correct"] and ok["decisive_steps"] > 0 and ok["teacher_forced_match"] < 1.0
    wrong = _teacher_forced_check(stock + 0.2 * torch.randn(stock.shape, generator=generator), stock, tokens, case)
    assert not wrong["correct"] and wrong["logits_rel_err"] > wrong["tolerance"]


def test_generate_check_counts_decisive_agreement_exactly():
    """All of 951 decisive steps agreeing is a pass (a float32 mean once gave 0.99999994 and flagged it WRONG);
    one decisive miss fails however small the mean logit error."""
    from prefix_kernels.bench.cases import ModelCase
    from prefix_kernels.bench.models import _teacher_forced_check

    case = ModelCase("generate", batch=1, seq=4, prefix=8, new_tokens=951, dtype="bf16")
    generator = torch.Generator().manual_seed(1)
    stock = 0.1 * torch.randn(1, 951, 50, generator=generator)
    tokens = torch.randint(0, 50, (1, 951), generator=generator)
    stock.scatter_add_(-1, tokens[..., None], torch.full((1, 951, 1), 5.0))  # every step decisive
    ok = _teacher_forced_check(stock.clone(), stock, tokens, case)
    assert ok["correct"] and ok["decisive_steps"] == 951 and ok["decisive_match"] == 1.0
    ours = stock.clone()
    ours[0, 7, (tokens[0, 7] + 1) % 50] = 10.0  # one step picks another token
    one_miss = _teacher_forced_check(ours, stock, tokens, case)
    assert one_miss["logits_rel_err"] <= one_miss["tolerance"] and not one_miss["correct"]
    assert one_miss["decisive_match"] == pytest.approx(950 / 951)


def test_model_rows_time_the_cuda_backend_only_where_it_serves_the_model(monkeypatch):
    from prefix_kernels import cuda
    from prefix_kernels.bench.cases import ModelCase
    from prefix_kernels.bench.models import _ours_variants, count_model_rows

    bf16 = ModelCase(op="train_step", batch=2, seq=8, prefix=4, hidden=2048, heads_q=32)  # head dim 64
    fp32 = ModelCase(op="train_step", batch=2, seq=8, prefix=4, dtype="fp32", hidden=2048, heads_q=32)
    odd = ModelCase(op="generate", batch=2, seq=8, prefix=4, hidden=960, heads_q=12)      # head dim 80
    monkeypatch.setattr(cuda, "UNAVAILABLE_REASON", None)
    assert _ours_variants(bf16, "cuda") == [("ours", "auto"), ("ours-cuda", "cuda")]
    assert _ours_variants(bf16, "cpu") == _ours_variants(fp32, "cuda") == _ours_variants(odd, "cuda") \
        == [("ours", "auto")]
    # train_steps add ours-checkpointed, ours-lean and ours-lean-torch, generates ours-static-cache
    assert count_model_rows([bf16, fp32, odd], "cuda") == 6 + 5 + 3
    monkeypatch.setattr(cuda, "UNAVAILABLE_REASON", "not built")
    assert _ours_variants(bf16, "cuda") == [("ours", "auto")]


@pytest.mark.parametrize("op", ["decode", "forward", "fwd+bwd"])
def test_profile_case_script_runs(op):
    """bench/profile_case.py (what ncu attaches to) runs its call; on CPU through the reference."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "profile_case.py"
    spec = importlib.util.spec_from_file_location("profile_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--device", "cpu", "--backend", "torch", "--op", op, "-B", "2", "-S", "5", "-L", "4", "-P", "3",
                 "--heads", "6/2", "-D", "32", "--q-layout", "bshd", "--calls", "1"])


def test_profile_train_step_script_runs_and_groups_kernel_names(capsys):
    """bench/profile_train_step.py (where the train step's GPU time goes): the groups of kernel names as the H200
    profile printed them, and the script end to end on the smoke preset's tiny model on CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "profile_train_step.py"
    spec = importlib.util.spec_from_file_location("profile_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, group in [("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
                        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
                        ("_prefix_attention_bwd_dkdv", "attention"), ("_bwd_preprocess", "attention"),
                        ("_swiglu_bwd", "lean kernels"), ("_rms_norm_fwd", "lean kernels"),
                        ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add", "other "
                         "elementwise"), ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel",
                                          "optimizer")]:
        assert module.group_of(name) == group, name
    module.main(["--device", "cpu", "--tiny", "--steps", "1", "--top", "3", "--variants", "peft,ours-lean"])
    text = capsys.readouterr().out
    assert "== peft:" in text and "== ours-lean:" in text


def test_decode_rows_say_how_they_were_timed(smoke):
    """On CUDA, decode rows are CUDA-graph replays with the eager time kept (or eager with the reason capture
    failed); the markdown says which. Rendered here from the CPU smoke's rows with those fields set."""
    _, result = smoke
    rows = [dict(r) for r in _rows(result, kind="op", op="decode") if r["status"] == "ok"][:2]
    assert len(rows) == 2 and all(r["timing"] == "eager" for r in rows)  # CPU: no graphs
    rows[0].update(timing="cuda-graph", eager_ms=rows[0]["time_ms"] * 3, time_ms=rows[0]["time_ms"])
    rows[1].update(graph_failure="RuntimeError: a host sync")
    text = markdown(dict(result, rows=rows))
    assert "CUDA-graph replays" in text and "(eager " in text
    assert "not capturable in a CUDA graph: RuntimeError: a host sync" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_timing_captures_a_clean_call_and_reports_a_host_sync():
    x = torch.randn(1024, 1024, device="cuda")
    ms, why_not = graph_bench_ms(lambda: x @ x, warmup_ms=1, rep_ms=5)
    assert ms > 0 and why_not is None
    ms, why_not = graph_bench_ms(lambda: (x @ x).sum().item(), warmup_ms=1, rep_ms=5)
    assert ms is None and why_not
    assert (x @ x).isfinite().all()  # the failed capture left the device usable
    # ... and the CUDA generator: before release_rng_after_failed_capture, every later torch.randn in the process
    # raised "Offset increment outside graph capture encountered unexpectedly".
    assert torch.randn(8, device="cuda").isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_timing_checks_the_replayed_output_written_over_nan():
    """check= sees the captured call's outputs after one replay into NaN: all written, or NaN where skipped."""
    x = torch.randn(256, 256, device="cuda")
    seen = []
    graph_bench_ms(lambda: (x @ x, None), warmup_ms=1, rep_ms=2, check=lambda out: seen.append(out[0].clone()))
    assert torch.allclose(seen[0], x @ x, rtol=1e-3, atol=1e-3)

    def half_written():  # an output half of which no kernel writes (what a work-skipping loop does)
        out = torch.empty(256, 256, device="cuda")
        out[:128] = x[:128]
        return out
    graph_bench_ms(half_written, warmup_ms=1, rep_ms=2, check=lambda out: seen.append(out.clone()))
    assert torch.equal(seen[1][:128], x[:128]) and seen[1][128:].isnan().all()


def test_decode_tile_sweep_script_runs(tmp_path):
    """bench/tune_decode.py (a GPU sweep) checked end to end on the smoke shapes: every tile and the split timed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # (the GPU image's Triton 3.6 interpreter cannot run these kernels)
    out = tmp_path / "tune_decode.json"
    result = subprocess.run([sys.executable, str(root / "bench" / "tune_decode.py"), "--preset", "smoke", "--device",
                             device, "--json", str(out)], env=env, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert data["environment"]["commit"]  # which code ran (the tuning files carried only card and versions)
    from prefix_kernels.triton.configs import HOPPER_DECODE_PREFIX_CANDIDATES

    taller = set(HOPPER_DECODE_PREFIX_CANDIDATES) if device == "cpu" else set()  # on a GPU: past 128 rows only
    occupancy = {"prefix-1/sm", "own-2/sm", "own-4/sm", "own-8/sm", "prefix-1/sm+own-4/sm", "own-launch",
                 "own-stream", "prefix-1/sm+own-stream"}
    eager = {"default-eager", "own-stream-eager"}  # (the smoke shapes' default is one launch)
    assert set(row["times_ms"]) == {"default", "pointer", "interleaved", "own-only", "split"} | taller | occupancy \
        | eager
    assert all(t > 0 for t in row["times_ms"].values())
    # every choice's output checked against the default's before it is timed
    assert set(row["max_diff"]) == set(row["times_ms"]) - {"own-only", "split"} - eager
    assert all(d < 1e-4 for d in row["max_diff"].values()) and "WRONG" not in result.stdout, result.stdout


def test_decode_tile_sweep_tries_its_knobs_where_the_default_takes_the_side_stream():
    """bench/tune_decode.py's launch choices at B=128 G=1 P=16384 L=256 (bf16, head dim 128: decode_config's
    graphs_only side stream): every knob is tried on the one-launch config (a knob added to the graphs_only
    config raised there, which the smoke shapes, one launch by default, never reach)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "tune_decode.py"
    spec = importlib.util.spec_from_file_location("tune_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    own_kv_bytes = 2 * 128 * 32 * 256 * 128 * 2
    choices = module.launch_choices(128, torch.bfloat16, 128, 1, True, own_kv_bytes)
    default = module.decode_config(128, torch.bfloat16, 128, 1, True, own_kv_bytes)
    assert default.graphs_only and choices["one-launch"] == default.one_launch()
    assert choices["interleaved"].interleave and not choices["interleaved"].own_launch
    assert choices["own-stream"].own_stream and not choices["own-stream"].graphs_only


def test_sanitize_sweep_selects_each_loop(monkeypatch):
    """bench/sanitize_cuda.py (the smoke runs and compute-sanitizer): a loop name sets the variables the extension
    reads (decode-X: the decode's prefix loop, the forward on mma.sync; else the forward's loop), and a decode-*
    loop runs decode shapes only, one of them filling both 64-row warpgroups of a wgmma block."""
    import importlib.util
    from pathlib import Path

    from prefix_kernels.triton.configs import DECODE_MAX_SEQ_Q

    path = Path(__file__).resolve().parent.parent / "bench" / "sanitize_cuda.py"
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("PK_CUDA_FORWARD", "PK_CUDA_DECODE", "PK_CUDA_SMS"):  # (what sweep() sets; conftest.py undoes it)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PK_CUDA_DECODE_OWN", "rows")  # inherited: the sweep must put the default layout back
    seen = {}
    for loop, *_, batch, seq_q, seq_k, prefix_len, prefixes in module.sweep(["wgmma-tma", "decode-wgmma"]):
        seen.setdefault(loop, []).append((batch, seq_q))
        assert os.environ["PK_CUDA_DECODE_OWN"] == "auto"
        assert (os.environ["PK_CUDA_FORWARD"], os.environ["PK_CUDA_DECODE"]) == \
            (("mma", "wgmma") if loop == "decode-wgmma" else ("wgmma-tma", "mma"))
    assert any(seq_q > DECODE_MAX_SEQ_Q for _, seq_q in seen["wgmma-tma"])
    assert all(seq_q <= DECODE_MAX_SEQ_Q for _, seq_q in seen["decode-wgmma"])
    assert any(batch * 3 * seq_q > 64 for batch, seq_q in seen["decode-wgmma"])  # G = 3 in the sweep
    # both layouts of the decode's own programs: the keys split across the warps (G * S <= 16), 64-row blocks
    assert {3 * seq_q <= 16 for _, seq_q in seen["decode-wgmma"]} == {True, False}
    # the persistent forward on 2 SMs (several works per block), with a shape of 3 query blocks (a unit of two
    # different ones, one alone); every other loop on the card's SMs
    persistent_seq_q = set()
    for loop, *_, batch, seq_q, seq_k, prefix_len, prefixes in module.sweep(["wgmma-tma-persistent", "wgmma"]):
        assert os.environ.get("PK_CUDA_SMS") == ("2" if loop == "wgmma-tma-persistent" else None)
        if loop == "wgmma-tma-persistent":
            persistent_seq_q.add(seq_q)
    assert any(256 < seq_q <= 384 for seq_q in persistent_seq_q)
    monkeypatch.setenv("PK_BROKEN_CUDA_LOOPS", "wgmma decode-wgmma")
    assert module.broken_loops() == {"wgmma", "decode-wgmma"}


def test_gpu_check_parses_tune_variants():
    """bench/gpu_check.sh's --tune-cuda variants: each field reaches its define's variable, the label names every
    field, and an older, shorter variant takes the shipped values for the fields it lacks (a slip here costs a
    device call, so it is checked on CPU)."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    program = (f'eval "$(sed -n "/^parse_variant() {{/,/^}}/p" {script})"; '
               'for v in 2,32,1,1,3,3,1,0,64,1 2,32,1,1,1,2,0,0; do parse_variant "$v"; '
               'echo "$hkeys $hwarpgroups $hstages $hoverlap $hpingpong|$label|$copy"; done')
    lines = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["64 1 3 1 0|r2-k32-b1-fs1-ds3-hs3-ho1-hp0-hk64-hw1|/tmp/pk_tune_2_32_1_1_3_3_1_0_64_1",
                     "128 2 2 0 0|r2-k32-b1-fs1-ds1-hs2-ho0-hp0-hk128-hw2|/tmp/pk_tune_2_32_1_1_1_2_0_0_128_2"]
    text = script.read_text()
    for define, variable in (("PK_HOPPER_KEYS", "hkeys"), ("PK_HOPPER_WARPGROUPS", "hwarpgroups"),
                             ("PK_HOPPER_PINGPONG", "hpingpong"), ("PK_HOPPER_STAGES", "hstages")):
        assert f"-D{define}=${variable}" in text, define


def test_ncu_source_summary_ranks_instructions_by_stall_samples(capsys):
    """bench/ncu_source_summary.py (gpu_check.sh --profile-cuda): ncu's source-page CSV, its notes before the header
    skipped, ranked by warp-stall samples with each instruction's nonzero stall columns and the share per opcode;
    a CSV without the columns it needs is said so, not guessed at."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "ncu_source_summary.py"
    spec = importlib.util.spec_from_file_location("ncu_source_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stalled = "smsp__pcsamp_warps_issue_stalled_"
    lines = ['==PROF== Connected to process 1', '"Kernel Name","forward_kernel"',
             '"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
             f'"Instructions Executed","{stalled}barrier","{stalled}barrier_not_issued","{stalled}wait",'
             f'"{stalled}long_scoreboard"',
             '"0x10","HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24","1,200","1,100","64","0","0","1000","200"',
             '"0x20","@P0 BAR.SYNC.DEFER_BLOCKING 0x0","3,000","3,000","64","2900","2900","0","100"',
             '"0x30","MUFU.EX2 R3, R3","300","0","4,096","0","0","0","0"',
             '"0x40","MUFU.EX2 R4, R4","500","0","4,096","0","0","0","0"']
    module.summarize(module.read_rows(lines), top=2)
    text = capsys.readouterr().out
    assert "4 instructions, 5000 warp-stall samples" in text
    assert "BAR 60.0%, HGMMA 24.0%, MUFU 16.0%" in text
    top = text.split("top 2 instructions")[1].splitlines()[1:]
    assert len(top) == 2 and "BAR.SYNC" in top[0] and top[0].rstrip().endswith("barrier=2900 long_scoreboard=100")
    assert "HGMMA" in top[1] and top[1].rstrip().endswith("wait=1000 long_scoreboard=200")  # largest first
    module.summarize(module.read_rows(['"Address","Opcode only"', '"0x10","FADD"']), top=2)
    assert "no source or stall-sampling column found" in capsys.readouterr().out
