"""A small sweep of the CUDA kernels (csrc/) for compute-sanitizer: every kernel, both dtypes, both head dims,
masks and several prefixes, at sizes that make the tools finish in seconds. bench/gpu_check.sh runs it as
    compute-sanitizer --tool memcheck   --error-exitcode 1 python3 bench/sanitize_cuda.py
    compute-sanitizer --tool racecheck  --error-exitcode 1 python3 bench/sanitize_cuda.py
(150 x 300 with a 200-key prefix: every stage of the forward's rings is refilled),
and also checks each result against the reference, so a clean run is also a correct one. On an sm_90 card the sweep
runs five times: with the mma.sync loops, with the forward's wgmma loop fed by cp.async and by TMA, one work per
block and on the persistent grid (PK_CUDA_FORWARD, csrc/forward.cu), and with the decode's wgmma prefix programs
(PK_CUDA_DECODE, csrc/decode.cu): the loops "mma", "wgmma", "wgmma-tma", "wgmma-tma-persistent" and "decode-wgmma".

gpu_check.sh also runs it once per Hopper loop, alone and under a short timeout (--loops LOOP), before the tests: a
loop built with new settings may hang (an mbarrier never completing) or trap, which would stall or break every later
CUDA call in the test processes. A loop that hangs or crashes there (any exit but 0, and WRONG_RESULTS: wrong numbers
are for the tests to report) is named in $PK_BROKEN_CUDA_LOOPS, which this sweep, the tests and
bench/tune_cuda.py then leave out (each saying so)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

import prefix_kernels
from prefix_kernels.reference import prefix_attention_reference


WRONG_RESULTS = 3  # the exit status when every call ran but some result was wrong


def card_loops():
    """The loops this card runs: the Hopper ones on sm_90 only."""
    if torch.cuda.get_device_capability() == (9, 0):
        return ("mma", "wgmma", "wgmma-tma", "wgmma-tma-persistent", "decode-wgmma")
    return ("mma",)


def broken_loops():
    return set(os.environ.get("PK_BROKEN_CUDA_LOOPS", "").split())


PERSISTENT_SMS = "2"  # the persistent forward's grid in the sweep: 2 blocks, each through many works


def select_loop(loop):
    """Sets the variables the extension reads at each call: "decode-X" is the decode's prefix loop X (the forward on
    mma.sync), any other name the forward's loop (the decode on mma.sync). The persistent forward plans for 2 SMs
    ($PK_CUDA_SMS), so that the sweep's few works share blocks as a real shape's do: the handover of the
    pipelines from one work to the next is what the sanitizer must see."""
    decode = loop.removeprefix("decode-") if loop.startswith("decode-") else "mma"
    os.environ["PK_CUDA_DECODE"] = decode
    os.environ["PK_CUDA_DECODE_OWN"] = "auto"  # (an inherited layout would leave one of the two uncovered)
    os.environ["PK_CUDA_FORWARD"] = "mma" if loop.startswith("decode-") else loop
    if loop.endswith("-persistent"):
        os.environ["PK_CUDA_SMS"] = PERSISTENT_SMS
    else:
        os.environ.pop("PK_CUDA_SMS", None)


def sweep(loops):
    for loop in loops:
        select_loop(loop)
        yield from _shapes(loop)


def _shapes(loop):
    """(loop, dtype, head dim, batch, S, L, P, prefixes): forward shapes (S > 16) and decode shapes (the public op
    sends S <= 16 without grad to the decode); a decode-* loop runs the decode shapes only, one of them with a batch
    of 30 (90 packed rows: both warpgroups of a 128-row block busy). The decode shapes with own keys (L > 0) of up to
    16 rows per sequence (G * S, G = 3 here: S = 3 and 1) take the own programs whose warps split the keys, S = 9 the
    64-row ones."""
    shapes = [(3, 70, 75, 45, 1), (3, 150, 300, 200, 1), (3, 3, 140, 19, 2), (3, 9, 140, 19, 1), (3, 1, 0, 130, 1)]
    if loop.endswith("-persistent"):  # 3 query blocks: a unit of two different ones, and the middle one alone
        shapes.append((1, 300, 300, 130, 1))
    if loop.startswith("decode-"):
        shapes = [shape for shape in shapes if shape[1] <= 16] + [(30, 1, 20, 700, 1)]
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            for batch, seq_q, seq_k, prefix_len, prefixes in shapes:
                yield loop, dtype, head_dim, batch, seq_q, seq_k, prefix_len, prefixes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", help="comma-separated loops (default: the card's, less the broken ones)")
    parser.add_argument("--list-hopper-loops", action="store_true", help="print the card's opt-in loops and exit")
    args = parser.parse_args(argv)
    if args.list_hopper_loops:
        print(" ".join(loop for loop in card_loops() if loop != "mma"))
        return 0
    if prefix_kernels.cuda.UNAVAILABLE_REASON:
        print(f"skipped: {prefix_kernels.cuda.UNAVAILABLE_REASON}")
        return 0
    loops = args.loops.split(",") if args.loops else [loop for loop in card_loops() if loop not in broken_loops()]
    for loop in sorted(broken_loops() - set(loops)):
        print(f"left out: {loop} (it failed its smoke run)")
    failures = 0
    for loop, dtype, head_dim, batch, seq_q, seq_k, prefix_len, prefixes in sweep(loops):
        heads_q, heads_kv = 6, 2
        q = torch.randn(batch, seq_q, heads_q, head_dim, device="cuda", dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(batch, heads_kv, seq_k, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        pk, pv = (torch.randn(prefixes, heads_kv, prefix_len, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        options = dict(causal=True, key_padding_mask=torch.rand(batch, seq_k, device="cuda") > 0.2)
        if prefixes > 1:
            options.update(prefix_index=torch.arange(batch, device="cuda") % prefixes,
                           prefix_lens=torch.tensor([prefix_len, prefix_len // 2], device="cuda"))
        with torch.no_grad():
            out = prefix_kernels.prefix_attention(q, k, v, pk, pv, backend="cuda", **options)
        expected = prefix_attention_reference(q, k, v, pk, pv, **options)
        error = (out.float() - expected.float()).abs().max().item() if out.numel() else 0.0
        ok = error < (2e-2 if dtype == torch.bfloat16 else 4e-3)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {loop:20} {str(dtype)[6:]:8} D={head_dim:3} B={batch:2} S={seq_q:3} "
              f"L={seq_k:3} P={prefix_len:3} N={prefixes} max error {error:.2e}")
    torch.cuda.synchronize()
    return WRONG_RESULTS if failures else 0


if __name__ == "__main__":
    sys.exit(main())
