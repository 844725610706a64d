"""What gets measured: op cases (one attention call shape) and model cases, grouped into presets.

Shapes follow ../shared/API.md: q [B, Hq, S, D]; own k, v [B, Hkv, L, D]; one prefix [Hkv, P, D].
Op names: "forward", "fwd+bwd" (forward then backward w.r.t. q, k, v and the prefix), "decode" (S = 1).
A `window` row is a sliding-window layer (Mistral, Gemma 2/3's local layers) whose window slides over the prefix
too, as transformers places a PEFT prefix: prefix key p at position p - P, just before own key 0
(`window_includes_prefix=True`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

OPS = ("forward", "fwd+bwd", "decode")
MODEL_OPS = ("train_step", "generate")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class OpCase:
    """One attention call: the op plus every size. `sweep` names the axis a sweep preset varies (for plots)."""
    op: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int       # S: queries per sequence (1 for decode)
    seq_k: int       # L: each sequence's own keys (the queries are its last S)
    prefix: int      # P: shared prefix length, stored once
    head_dim: int = 128
    dtype: str = "bf16"
    causal: bool = True
    sweep: str = ""
    q_layout: str = "bhsd"  # "bshd": q (and the output gradient) as HF hands them, a [B, S, H, D] buffer's view
    window: int | None = None  # a causal sliding window over the own keys and the prefix (see the module's text)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        layout = "" if self.q_layout == "bhsd" else f" q={self.q_layout}"
        window = "" if self.window is None else f" W={self.window}"
        return (f"B={self.batch} S={self.seq_q} L={self.seq_k} P={self.prefix}{window} "
                f"H={self.heads_q}/{self.heads_kv} D={self.head_dim} {self.dtype}{layout}")

    def attention_options(self) -> dict:
        """The masking keywords of prefix_attention (and its reference) for this row."""
        if self.window is None:
            return dict(causal=self.causal)
        return dict(causal=self.causal, window=self.window, window_includes_prefix=True)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelCase:
    """A model-level row on a Llama-architecture config with random weights."""
    op: str                      # "train_step" or "generate"
    batch: int
    seq: int                     # train_step: tokens per row; generate: each row's own tokens after the prompt
    prefix: int                  # train_step: virtual tokens; generate: shared prompt length
    new_tokens: int = 0          # generate only
    dtype: str = "bf16"
    hidden: int = 2048
    layers: int = 16
    heads_q: int = 32
    heads_kv: int = 8
    intermediate: int = 8192
    vocab: int = 32000
    repeats: int = 3             # timed repetitions (median), after one warmup

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        extra = f" new={self.new_tokens}" if self.op == "generate" else ""
        return (f"B={self.batch} seq={self.seq} P={self.prefix}{extra} hidden={self.hidden} "
                f"layers={self.layers} H={self.heads_q}/{self.heads_kv} {self.dtype}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Preset:
    name: str
    description: str
    ops: list[OpCase] = field(default_factory=list)
    models: list[ModelCase] = field(default_factory=list)


def _anchors() -> Preset:
    """Exactly the shapes of ../shared/ANCHORS.md (bf16, head dim 128)."""
    decode = [OpCase("decode", b, 32, hkv, 1, l, p) for b, p, l, hkv in
              ((64, 4096, 256, 32), (256, 4096, 256, 8), (128, 16384, 256, 32), (256, 16384, 128, 8))]
    training = [(8, 2048, 128), (16, 1024, 512)]
    # Each training shape twice: q contiguous, and q as a patched HF model passes it (transposed view, read in place).
    ops = [OpCase(op, b, 32, 32, s, s, p, q_layout=layout) for op in ("forward", "fwd+bwd") for b, s, p in training
           for layout in ("bhsd", "bshd")]
    models = [ModelCase("train_step", batch=16, seq=1024, prefix=128),
              ModelCase("generate", batch=64, seq=16, prefix=4096, new_tokens=32, repeats=2)]
    return Preset("anchors", "the ANCHORS.md decode and training shapes, bf16, head dim 128", ops + decode, models)


def _sweep() -> Preset:
    """Time against prefix length P and against batch, around the ANCHORS shapes."""
    ops = []
    for op in ("forward", "fwd+bwd"):
        ops += [OpCase(op, 8, 32, 32, 2048, 2048, p, sweep="prefix") for p in (16, 128, 512, 2048)]
        ops += [OpCase(op, b, 32, 32, 1024, 1024, 512, sweep="batch") for b in (1, 4, 16, 32)]
    # A sliding-window model's layers (GQA 4, as Mistral), the window over the prefix: the kernels skip the tiles
    # it leaves out, the baselines mask them.
    ops += [OpCase(op, 4, 32, 8, 4096, 4096, 128, window=w, sweep="window") for op in ("forward", "fwd+bwd")
            for w in (512, 1024, 4096)]
    ops += [OpCase("decode", 64, 32, 8, 1, 256, p, sweep="prefix") for p in (16, 128, 512, 2048, 8192)]
    ops += [OpCase("decode", b, 32, 8, 1, 256, 4096, sweep="batch") for b in (8, 32, 128, 256)]
    return Preset("sweep", "time against prefix length (16..2048), against batch and against a sliding window, bf16, "
                  "head dim 128", ops)


def _smoke() -> Preset:
    """Tiny fp32 shapes that run on a CPU in seconds (the timings mean nothing there)."""
    small = dict(heads_q=4, heads_kv=2, head_dim=32, dtype="fp32")
    ops = [OpCase("forward", 2, seq_q=16, seq_k=16, prefix=8, **small),
           OpCase("forward", 2, seq_q=16, seq_k=16, prefix=8, q_layout="bshd", **small),
           OpCase("fwd+bwd", 2, seq_q=16, seq_k=16, prefix=8, **small),
           OpCase("forward", 2, seq_q=16, seq_k=16, prefix=8, window=6, **small),
           OpCase("fwd+bwd", 2, seq_q=16, seq_k=16, prefix=8, window=6, **small),
           OpCase("decode", 3, seq_q=1, seq_k=16, prefix=8, **small)]
    # head dim 32 (hidden 64 over 2 query heads): the kernels take head dims 32..256
    tiny = dict(dtype="fp32", hidden=64, layers=2, heads_q=2, heads_kv=1, intermediate=128, vocab=128, repeats=2)
    models = [ModelCase("train_step", batch=2, seq=16, prefix=4, **tiny),
              ModelCase("generate", batch=2, seq=4, prefix=8, new_tokens=3, **tiny)]
    return Preset("smoke", "tiny fp32 shapes for CI; on a CPU the timings mean nothing", ops, models)


PRESETS = {"anchors": _anchors, "sweep": _sweep, "smoke": _smoke}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def override(preset: Preset, *, ops=None, batch=None, prefix=None, seq_k=None, seq_q=None, heads_q=None,
             heads_kv=None, head_dim=None, dtype=None, window=None) -> Preset:
    """The preset with sizes replaced by the command-line flags (None keeps the preset's value).

    `ops` filters the op and model rows by name. S applies to forward/fwd+bwd rows (decode keeps S = 1; L follows
    S there unless L is given too); L and the window apply to every op row.
    """
    def op_case(case: OpCase) -> OpCase:
        changes = {k: v for k, v in dict(batch=batch, prefix=prefix, heads_q=heads_q, heads_kv=heads_kv,
                                          head_dim=head_dim, dtype=dtype, window=window).items() if v is not None}
        if case.op != "decode" and seq_q is not None:
            changes["seq_q"] = seq_q
            changes["seq_k"] = seq_q
        if seq_k is not None:
            changes["seq_k"] = seq_k
        return replace(case, **changes)

    def model_case(case: ModelCase) -> ModelCase:
        changes = {k: v for k, v in dict(batch=batch, prefix=prefix, heads_q=heads_q, heads_kv=heads_kv,
                                          dtype=dtype).items() if v is not None}
        return replace(case, **changes)

    keep = (lambda c: c.op in ops) if ops else (lambda c: True)
    cases = []
    for case in (op_case(c) for c in preset.ops if keep(c)):
        if case not in cases:  # overriding a swept axis collapses the sweep to one row
            cases.append(case)
    models = [model_case(c) for c in preset.models if keep(c)]
    return Preset(preset.name, preset.description, cases, models)
