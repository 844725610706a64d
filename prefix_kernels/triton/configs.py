"""Launch configurations of the Triton kernels: data in one place.

The launchers ask `forward_config`; the compile check (`prefix_kernels.triton.compile_check`) enumerates
`forward_launch_space()`, which is every configuration `forward_config` can return, so what can be launched is
exactly what is compiled for sm_80 and sm_90 on the CPU machines.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Optional

import torch

# Head dims are padded to the next power of two inside the kernels (80 -> 128, 96 -> 128).
BLOCK_D_CHOICES = (32, 64, 128, 256)
# Query-block heights for short query lengths (decode, speculative widths); tl.dot needs M >= 16.
SHORT_BLOCK_M = (16, 32, 64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V tiles through TMA tensor descriptors (sm_90+; the forward, and the decode prefix part)
    # Query blocks in reverse order within each (sequence, head) (the forward and dq kernels): under causality the
    # last blocks see the most keys (at S=2048, P=128, 64-row blocks: 2176 keys vs 192), and launched last they
    # leave the longest programs as the grid's tail; reversed, the tail is the shortest ones. K/V stay shared in
    # L2 since the blocks of one head still run together. Not timed yet (tune_forward.py / tune_backward.py
    # time it); off until a GPU run shows it.
    heavy_first: bool = False


def cdiv(a: int, b: int) -> int:
    """Ceil division for the launchers' host code: triton.cdiv is a constexpr function there and costs ~4 us a
    call, a noticeable part of a decode step's host time."""
    return -(-a // b)


def block_d_for(head_dim: int) -> int:
    return max(32, 1 << (head_dim - 1).bit_length())


def _long_query_config(block_d: int, dtype: torch.dtype) -> ForwardConfig:
    if dtype == torch.float32:
        # fp32 is the exact path: IEEE products on CUDA cores, whose register tiles grow with the head dim.
        # Larger tiles spill heavily at head dim 128+ (seen in ptxas -v: thousands of bytes), so keep them small.
        if block_d >= 128:
            return ForwardConfig(16, 16, 4, 2)
        return ForwardConfig(64, 32, 8, 2)
    if block_d >= 256:
        return ForwardConfig(64, 32, 8, 2)
    if block_d == 128:
        return ForwardConfig(128, 64, 8, 3)
    return ForwardConfig(128, 64, 4, 3)


# fp16/bf16 prefill configs for sm_90+ that read K/V tiles through TMA tensor descriptors, by padded head dim.
# Timed on an H200 (bench/tune_forward.py, bench/results/nvidia-h200/tune_forward.json) at the ANCHORS training
# shapes: 0.743 / 0.732 ms against 0.853 / 0.778 ms for the best pointer config. Head dims not listed were not
# timed and keep the pointer path.
HOPPER_TMA_CONFIGS = {128: ForwardConfig(64, 64, 4, 3, tma=True)}


def forward_config(head_dim: int, dtype: torch.dtype, seq_q: int, tma_capable: bool = False) -> ForwardConfig:
    """The configuration the forward launcher uses for this call; tma_capable: the GPU has TMA (sm_90+)."""
    block_d = block_d_for(head_dim)
    base = _long_query_config(block_d, dtype)
    for block_m in SHORT_BLOCK_M:
        if seq_q <= block_m and block_m < base.block_m:
            # A short query block: fewer warps, since the tile has few rows.
            return ForwardConfig(block_m, base.block_n, 4, base.num_stages)
    if tma_capable and dtype != torch.float32 and block_d in HOPPER_TMA_CONFIGS:
        return HOPPER_TMA_CONFIGS[block_d]
    return base


def forward_launch_space() -> list[tuple[int, torch.dtype, ForwardConfig]]:
    """Every (block_d, dtype, config) that forward_config can return (TMA configs: sm_90 only)."""
    space = []
    for dtype in FLOAT_DTYPES:
        for block_d in BLOCK_D_CHOICES:
            head_dim = block_d
            seen = set()
            for seq_q in (1, 17, 33, 4096):
                for tma_capable in (False, True):
                    config = forward_config(head_dim, dtype, seq_q, tma_capable)
                    if config not in seen:
                        seen.add(config)
                        space.append((block_d, dtype, config))
    return space


# ---------------------------------------------------------------------------------------------------------------
# Backward (prefix_kernels/triton/backward.py): four kernels, each with its own tile shape.
#   preprocess  Delta = rowsum(dO * O) - dlse, BLOCK_M rows per program;
#   dq          query-major like the forward: BLOCK_M queries, streaming BLOCK_N keys;
#   dkdv        key-major over each sequence's own keys: BLOCK_N keys, streaming BLOCK_M queries;
#   dprefix     key-major over one prefix's keys, streaming every query that sees them (all sequences using it).
# The key-major kernels hold two fp32 [BLOCK_N, BLOCK_D] accumulators, so their BLOCK_N shrinks with the head dim.

PREPROCESS_BLOCK_M = 64
# d prefix_k / d prefix_v: when N * Hkv * cdiv(P, BLOCK_N) programs cannot fill the GPU, the queries are split into
# at most this many chunks (a cap independent of B), each writing an fp32 partial [chunks, N, Hkv, P, D] that is
# summed in a fixed order: deterministic, and O(P) memory whatever the batch.
MAX_PREFIX_CHUNKS = 16


@dataclass(frozen=True)
class BackwardConfig:
    dq: ForwardConfig
    dkdv: ForwardConfig
    dprefix: ForwardConfig
    # dq added with fp32 atomics by the dkdv and d prefix kernels (FlashAttention-2's way: two matmuls per tile
    # pair fewer than the separate dq kernel, which recomputes p and dp) instead of the dq kernel; dq is then not
    # bit-reproducible. Off: slower on an H200 (the backward 3.04 vs 2.60 ms at B=8 S=2048 P=128, 8816e5e;
    # bench/tune_backward.py times both).
    fuse_dq: bool = False


def _long_query_backward(block_d: int, dtype: torch.dtype) -> BackwardConfig:
    # Picked so that ptxas reports no spills on sm_80 and sm_90 with every feature on (fp16/bf16); not yet timed
    # on a GPU. The key-major kernels hold two fp32 [BLOCK_N, BLOCK_D] accumulators plus the K/V tile, hence
    # 8 warps throughout. fp32 is the accurate path, not the fast one: small tiles, spills tolerated on sm_90.
    if dtype == torch.float32:
        # (on sm_90 the IEEE fp32 dots spilled hundreds of bytes with 32-wide key tiles in dq: 16 keeps it at 0)
        if block_d >= 128:
            dq, dkdv = ForwardConfig(32, 16, 8, 1), ForwardConfig(16, 32, 8, 1)
        else:
            dq, dkdv = ForwardConfig(64, 16, 8, 1), ForwardConfig(32, 32, 8, 1)
    elif block_d >= 256:
        dq, dkdv = ForwardConfig(32, 32, 8, 1), ForwardConfig(32, 32, 8, 1)
    elif block_d == 128:
        # Timed on an H200 (bench/tune_backward.py, bench/results/nvidia-h200/tune_backward.json): these took the
        # ANCHORS fwd+bwd from 6.26 / 5.97 ms to 3.44 / 3.21 ms against the first untimed (128,32) / (32,64) tiles.
        dq, dkdv = ForwardConfig(128, 64, 8, 3), ForwardConfig(64, 128, 8, 2)
    else:
        dq, dkdv = ForwardConfig(128, 64, 8, 2), ForwardConfig(32, 128, 8, 2)
    return BackwardConfig(dq=dq, dkdv=dkdv, dprefix=dkdv)


# Key-major tiles for BackwardConfig.fuse_dq besides the default: the fused tile holds a third fp32 product
# ([BLOCK_M, BLOCK_D], the dq terms) while the dk/dv accumulators live. Compile-checked for sm_80/90
# (backward_cases.py) and timed by bench/tune_backward.py.
# (64, 64, 4, 3), the other non-fused candidate, spilled ~300 B on sm_90 with fusion: left out.
FUSED_DQ_CANDIDATES = (ForwardConfig(32, 128, 8, 2), ForwardConfig(32, 64, 4, 2))


def backward_config(head_dim: int, dtype: torch.dtype, seq_q: int) -> BackwardConfig:
    """The configurations the backward launcher uses for this call."""
    base = _long_query_backward(block_d_for(head_dim), dtype)
    dq = base.dq
    for block_m in SHORT_BLOCK_M:
        if seq_q <= block_m and block_m < dq.block_m:
            dq = ForwardConfig(block_m, dq.block_n, 4 if block_m <= 32 else dq.num_warps, dq.num_stages)
            break
    dkdv, dprefix = base.dkdv, base.dprefix
    if seq_q <= 16 and dkdv.block_m > 16:  # few queries: don't stream mostly-empty query tiles
        dkdv = ForwardConfig(16, dkdv.block_n, dkdv.num_warps, dkdv.num_stages)
        dprefix = dkdv
    return BackwardConfig(dq=dq, dkdv=dkdv, dprefix=dprefix)


def prefix_grad_chunks(programs: int, query_tiles: int, device: torch.device) -> int:
    """How many query chunks the d prefix kernel splits into (1 off the GPU): chunks_for_waves with one program
    per SM, what its 8-warp tiles get at 16 bits and head dim >= 64 (~255 registers x 256 threads, ptxas via
    compile_check; only the fp32 and head-dim-32 tiles could hold two, and they are not the fast paths)."""
    if device.type != "cuda" or programs <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return chunks_for_waves(programs, query_tiles, min(MAX_PREFIX_CHUNKS, query_tiles), sms)


# chunks_for_waves: a program's fixed cost (its K/V tile, its fp32 partials' stores), in query tiles, and the
# factor of the best time within which it takes the fewest chunks (each chunk's partials are summed again)
CHUNK_PROGRAM_COST = Fraction(1, 2)
CHUNK_TIME_SLACK = Fraction(21, 20)


def chunks_for_waves(programs: int, query_tiles: int, most: int, slots: int) -> int:
    """The chunk count in [1, most] for `programs` programs that each stream `query_tiles` query tiles, split into
    chunks of at most cdiv(query_tiles, chunks) tiles (the kernel deals them out round-robin).

    Equal programs finish in waves: with `slots` programs resident at a time, c chunks of t tiles take
    ceil(programs * c / slots) rounds of t + CHUNK_PROGRAM_COST tiles. Only counts c with cdiv(query_tiles, t) == c
    are taken (any other has the largest chunk of a smaller count, so no less time and more partials), and the
    fewest chunks within 5% of the best time. The first rule, enough chunks for two programs per SM, rounded up past
    a wave boundary: B=8 P=128 at head dim 128 got 9 chunks, 288 programs in 3 rounds on 132 SMs, where 4 chunks
    take one round of a quarter of the tiles.
    """
    def tiles(c):
        return -(-query_tiles // c)

    candidates = [c for c in range(1, max(1, most) + 1) if -(-query_tiles // tiles(c)) == c] or [1]
    time = {c: -(-programs * c // slots) * (tiles(c) + CHUNK_PROGRAM_COST) for c in candidates}
    best = min(time.values())
    return next(c for c in candidates if time[c] <= best * CHUNK_TIME_SLACK)


BACKWARD_KERNELS = ("dq", "dkdv", "dprefix")


def backward_launch_space() -> list[tuple[int, torch.dtype, str, ForwardConfig]]:
    """Every (block_d, dtype, kernel, config) that backward_config can return."""
    space = []
    for dtype in FLOAT_DTYPES:
        for block_d in BLOCK_D_CHOICES:
            seen = set()
            for seq_q in (1, 17, 33, 4096):
                config = backward_config(block_d, dtype, seq_q)
                for kernel in BACKWARD_KERNELS:
                    key = (kernel, getattr(config, kernel))
                    if key not in seen:
                        seen.add(key)
                        space.append((block_d, dtype, kernel, key[1]))
    return space


# ---------------------------------------------------------------------------------------------------------------
# Decode (prefix_kernels/triton/decode.py): short query lengths (S <= DECODE_MAX_SEQ_Q) without gradients.
# One launch computes every partial attention into an fp32 workspace, a second merges them by LSE:
#   prefix programs  one (row block, prefix n, KV head, split) each; rows = the (b, g, s) triples of ALL sequences
#                    (Hydragen's inter-sequence batching), so a prefix tile is loaded once for up to BLOCK_M rows;
#   own programs     one (row block, sequence, KV head, split) each; rows = the G * S queries of the group, so a
#                    sequence's own K/V is read once for all heads of its group (GQA packing).
# Splits (Flash-Decoding) are chosen from shapes and the SM count only: no host sync, CUDA-graph safe.

DECODE_MAX_SEQ_Q = 16
# Splits make every program of the one launch (prefix and own alike) about (all keys read) / (this * SMs) keys
# long: the GPU fills, and the long prefix programs do not leave a tail behind the many short own ones.
DECODE_PROGRAMS_PER_SM = 2
# More splits than this only add fp32 partial traffic (each split writes rows * D * 4 bytes).
DECODE_MAX_SPLITS = 32
# A split reads at least this many key tiles, so the partial it writes stays small next to the keys it reads.
DECODE_MIN_SPLIT_TILES = 2
# Off the GPU (interpreter) there is no SM count: a notional small GPU, so tests exercise split-K.
DECODE_OFF_GPU_SMS = 2
MERGE_BLOCK_M = 16
MERGE_NUM_WARPS = 4


@dataclass(frozen=True)
class DecodeConfig:
    prefix: ForwardConfig  # block_m rows of the packed (b, g, s) matrix, block_n prefix keys per tile
    own: ForwardConfig     # block_m rows of one sequence's (g, s) queries, block_n own keys per tile
    # Program order: False = every prefix program, then every own program; True = the two alternate until the
    # fewer runs out (all prefix programs still start in the first waves, so no long one is left as a tail).
    # Why it may pay: at B=256 G=4 P=4096 (H100, c194848) the step took 0.143 ms, about the compute-bound prefix
    # phase (~0.045 ms) plus the memory-bound own phase (~0.092 ms): with prefix programs first the two do not
    # overlap. H200 (dd6375c, bench/results/nvidia-h200/tune_decode.json): 0.114 against 0.117 ms there, within 2% of
    # the default at the other three ANCHORS decode shapes: off.
    interleave: bool = False
    # At most this many prefix programs per SM (None: the prefix keys are split like the own keys, by count).
    # Why 1 may pay at the GQA serving shapes (B=256 G=4 P=4096: 58% of the floor on the H200): the split by key
    # count gives 2 prefix programs per SM, and a prefix program (64 packed rows) costs ~10x an own program per key
    # in tensor-core time, so the first wave is all prefix work (~35 us compute-bound) and the memory-bound own
    # stream (~268 MB, ~65 us at full bandwidth) only starts after it. One prefix program per SM (one split) leaves
    # each SM's second program slot to the own stream from the start: ~max(45, 70) us instead of their sum, if
    # one own program per SM keeps enough loads in flight. H200 (dd6375c): 0.106 against 0.117 ms there, but 0.273
    # against 0.181 at B=256 G=4 P=16384 (the same 128 prefix programs, each 4x as long in one wave); the same at
    # G=1. Off: one point on each side is no rule to tell the two apart.
    prefix_programs_per_sm: Optional[int] = None
    # About this many own programs per SM, each taking several whole (sequence, KV head) pairs in one pipelined loop
    # (None: one pair per program). Where it may pay: the launch's footprint is the prefix part's (B=128 G=1
    # P=16384: 128 KB of shared memory and 255 registers x 8 warps, one program per SM; 72% of the floor on the
    # H200), so between two short own programs (256 keys, 128 KB) the SM has nothing in flight for a whole memory
    # latency. Only where the own part is one split and one row block. H200 (dd6375c): 8 per SM 0.259 against
    # 0.266 ms there, 2 and 4 slower; slower or the same at the other shapes (own_stream does better there): off.
    own_programs_per_sm: Optional[int] = None
    # The own programs in a launch of their own, after the prefix programs', with the own tiling's warps and
    # pipelining (so its shared memory and registers) instead of the prefix part's. Where it may pay: the same
    # B=128 G=1 P=16384 shape, whose own programs run one per SM under the prefix part's footprint; alone, the own
    # stream (537 MB) should run as fast as at B=64 P=4096 (~3.5 TB/s there, where the prefix part is small): about
    # 0.08 + 0.15 ms + the merge against 0.265 ms (H200, 8816e5e). It gives up the overlap of the two parts, which
    # the compute-bound GQA shapes need. H200 (dd6375c): 0.237 against 0.266 ms there, slower at the other three
    # shapes (3-14%). No meaning with `interleave`. decode_config sets it with own_stream.
    own_launch: bool = False
    # With own_launch on a GPU: the own launch on a side stream, concurrent with the prefix launch (joined before the
    # merge), so that the two parts overlap with each one's own footprint: the compute-bound prefix programs and the
    # memory-bound own stream share the SMs. Where it may pay: B=256 G=4 P=4096 (1.72x of the floor on the H200:
    # ~0.04 ms of prefix compute and ~0.07 ms of own stream, one after the other today) towards ~max of the two;
    # and B=128 G=1 P=16384, where both parts stream memory. Costs two event records and waits per eager call
    # (free under CUDA graphs, where a stream fork and join are captured). H200 (dd6375c): 0.207 against 0.266 ms
    # at B=128 G=1 P=16384 (1.09x its floor), no faster at the other three shapes, whose prefix tiles have the own
    # programs' 4 warps already (nor at the GQA ones, where it was to overlap compute and memory). decode_config sets it
    # where one launch would run the own programs under the prefix part's bigger footprint (OWN_STREAM_MIN_OWN_BYTES).
    own_stream: bool = False
    # own_launch and own_stream inside a CUDA-graph capture only; an eager call runs one launch of both parts. On the
    # H200 (67a1aae) the eager call at B=128 G=1 P=16384 took 0.585 ms with the side stream, where a graph replay took
    # 0.204 and one launch had taken 0.266 eagerly (d432cfb's anchors run). Not explained yet: one more launch and
    # two stream waits should add ~0.1 ms of host time. So decode_config asks for the side stream this way.
    graphs_only: bool = False

    def one_launch(self) -> "DecodeConfig":
        """This config with both kinds of program in one launch (what a graphs_only config runs eagerly); the plan's
        splits do not depend on it."""
        return replace(self, own_launch=False, own_stream=False, graphs_only=False)

    def __post_init__(self):
        if self.own_launch and self.interleave:
            raise ValueError("DecodeConfig: own_launch puts the own programs in a launch of their own, so there is "
                             "nothing to interleave them with; set one of the two")
        if self.own_stream and not self.own_launch:
            raise ValueError("DecodeConfig: own_stream runs the own launch on a side stream, which needs "
                             "own_launch=True")
        if self.graphs_only and not self.own_launch:
            raise ValueError("DecodeConfig: graphs_only limits own_launch (and own_stream) to CUDA-graph captures, "
                             "which needs own_launch=True")


# The packed prefix part on sm_90+ (fp16/bf16, by padded head dim) once it spans several row blocks (compute-bound
# serving batches): the forward's TMA tile (HOPPER_TMA_CONFIGS). H100, CUDA-graph replays, same run
# (bench/results/nvidia-h100-80gb-hbm3/tune_decode.json): B=256 G=4 P=4096 0.144 vs 0.158 ms for the pointer tile,
# B=256 G=4 P=16384 0.190 vs 0.220; at 64 packed rows both took 0.131 ms.
HOPPER_DECODE_PREFIX_CONFIGS = {128: ForwardConfig(64, 64, 4, 3, tma=True)}
# Taller prefix tiles for the compute-bound serving case (B=256 G=4 P=16384 ran at 51% of its compute floor with the
# 64-row tile: ~360 TFLOP/s in the kernel): timed against the default by bench/tune_decode.py on sm_90, not chosen
# by decode_config until a GPU run shows one faster. ptxas for sm_90 (bf16, D=128): these three spill nothing;
# 128 x 128 and 64 x 128 tiles spilled 68 bytes at 255 registers, 128 x 64 on 4 warps 980 bytes (not candidates).
HOPPER_DECODE_PREFIX_CANDIDATES = {"tma-128x64": ForwardConfig(128, 64, 8, 3, tma=True),
                                   "tma-128x64-2st": ForwardConfig(128, 64, 8, 2, tma=True),
                                   "tma-128x32": ForwardConfig(128, 32, 8, 3, tma=True)}
# Up to this many packed rows one block holds them all and the prefix is read from memory exactly once, which is
# what the memory-bound cases need (B=128 G=1 P=16384: 89% of the copy floor on the H100 with one 128-row block).
DECODE_ONE_BLOCK_ROWS = 128


def _decode_prefix_config(block_d: int, dtype: torch.dtype, rows: int, tma_capable: bool) -> ForwardConfig:
    if dtype == torch.float32:  # the accurate path: IEEE dots on CUDA cores, small tiles (see _long_query_config)
        return ForwardConfig(16, 16, 4, 2) if block_d >= 128 else ForwardConfig(32, 32, 4, 2)
    if block_d >= 256:
        # 8 warps: a 64 x 256 fp32 accumulator on 4 warps spilled ~1 KB (ptxas, sm_80 and sm_90).
        return ForwardConfig(64, 32, 8, 2)
    if tma_capable and block_d in HOPPER_DECODE_PREFIX_CONFIGS and rows > DECODE_ONE_BLOCK_ROWS:
        return HOPPER_DECODE_PREFIX_CONFIGS[block_d]
    # Large packed row counts (B * G * S > 64, the serving case) take 128-row tiles: the prefix part of a big batch
    # is compute-bound (B=256, G=4, P=16k is ~69 GFLOP per step), so tensor-core tile efficiency matters there.
    if rows > 64:
        return ForwardConfig(128, 64, 8, 3)
    return ForwardConfig(64, 64, 4, 3)


def _decode_own_config(block_d: int, dtype: torch.dtype, rows: int) -> ForwardConfig:
    if dtype == torch.float32:
        return ForwardConfig(16, 16, 4, 2) if block_d >= 128 else ForwardConfig(16, 32, 4, 2)
    block_n = 32 if block_d >= 256 else 64
    # Own keys are streamed once per (sequence, KV head): memory-bound, so the row tile is only as tall as G * S.
    for block_m in (16, 32):
        if rows <= block_m:
            return ForwardConfig(block_m, block_n, 4, 2 if block_d >= 256 else 3)
    return ForwardConfig(32 if block_d >= 256 else 64, block_n, 4, 2)


# The own programs go in a launch of their own on a side stream (DecodeConfig.own_launch, own_stream) where one launch
# would run them under a bigger footprint than their own tiling's: the prefix part in one row block of 65-128 packed
# rows (its 128 x 64 tile on 8 warps, 255 registers and ~131 KB on sm_90, one program per SM) next to own programs of
# 4 warps. H200, CUDA-graph replays, one run (bench/results/nvidia-h200/tune_decode.json at dd6375c): B=128 G=1
# P=16384 L=256 took 0.207 ms with the side stream, 0.237 with the own launch after the prefix one, 0.266 in one
# launch (the copy floor is 0.190); inside CUDA-graph captures only (DecodeConfig.graphs_only: eagerly it was
# slower). Where the footprints match it does not pay (B=64 G=1 P=4096, 64 rows on 4 warps: 0.100 against 0.097; the
# GQA shapes, whose TMA prefix tile has 4 warps: 0.118 / 0.181 against 0.117 / 0.181). Only for own K/V of at least
# this many bytes a step, so that the stream's fork and join (~3 us of device time, and host time in eager calls)
# stay a few percent of what they save; only the measured geometry (16-bit, head dims 65-128).
OWN_STREAM_MIN_OWN_BYTES = 64 << 20


def decode_config(head_dim: int, dtype: torch.dtype, packed_rows: int, group_rows: int,
                  tma_capable: bool = False, own_kv_bytes: int = 0) -> DecodeConfig:
    """packed_rows = B * G * S (the prefix matrix of one KV head), group_rows = G * S (one sequence's rows);
    tma_capable: the GPU has TMA (sm_90+); own_kv_bytes: the bytes of every sequence's own K and V that a step reads
    (B * Hkv * L * D * 2 * itemsize)."""
    block_d = block_d_for(head_dim)
    prefix = _decode_prefix_config(block_d, dtype, packed_rows, tma_capable)
    own = _decode_own_config(block_d, dtype, group_rows)
    own_stream = (dtype in (torch.float16, torch.bfloat16) and block_d == 128 and packed_rows <= DECODE_ONE_BLOCK_ROWS
                  and prefix.num_warps > own.num_warps and own_kv_bytes >= OWN_STREAM_MIN_OWN_BYTES)
    return DecodeConfig(prefix, own, own_launch=own_stream, own_stream=own_stream, graphs_only=own_stream)


def decode_splits(prefix_programs: int, prefix_keys: int, own_programs: int, own_keys: int, block_n: int,
                  sms: int, prefix_programs_per_sm: Optional[int] = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((splits, chunk) of the prefix keys, (splits, chunk) of the own keys), chunks in whole tiles.

    Prefix and own programs share one launch, so the splits balance the two: every program should read about
    (all keys read) / (DECODE_PROGRAMS_PER_SM * sms) keys, enough to fill the GPU, and no more splits than
    that, since each split costs an fp32 partial (rows * D * 4 bytes written, then read by the merge): with
    B = 256, Hq = 32, a slot is 4 MB against ~300 MB of K/V per step. No keys gives (0, block_n): no slot.
    `prefix_programs_per_sm` (DecodeConfig) caps the prefix splits so that prefix_programs * splits stays within
    that many per SM (at least one split).
    """
    total = prefix_programs * prefix_keys + own_programs * own_keys
    per_program = max(block_n * DECODE_MIN_SPLIT_TILES, -(-total // (DECODE_PROGRAMS_PER_SM * sms)))

    def split(keys, most=DECODE_MAX_SPLITS):
        if keys <= 0:
            return 0, block_n
        splits = max(1, min(-(-keys // per_program), most))
        chunk = -(-(-(-keys // splits)) // block_n) * block_n
        return -(-keys // chunk), chunk

    prefix_most = DECODE_MAX_SPLITS
    if prefix_programs_per_sm is not None and prefix_programs:
        prefix_most = min(prefix_most, max(1, prefix_programs_per_sm * sms // prefix_programs))
    return split(prefix_keys, prefix_most), split(own_keys)


def decode_launch_space() -> list[tuple[int, torch.dtype, DecodeConfig]]:
    """Every (block_d, dtype, config) that decode_config can return (prefix TMA configs: sm_90 only)."""
    space = []
    for dtype in FLOAT_DTYPES:
        for block_d in BLOCK_D_CHOICES:
            seen = set()
            for packed_rows in (1, 64, 65, 4096):
                for group_rows in (1, 17, 33, 512):
                    for tma_capable in (False, True):
                        for own_kv_bytes in (0, OWN_STREAM_MIN_OWN_BYTES):
                            config = decode_config(block_d, dtype, max(packed_rows, group_rows), group_rows,
                                                   tma_capable, own_kv_bytes)
                            if config not in seen:
                                seen.add(config)
                                space.append((block_d, dtype, config))
    return space
