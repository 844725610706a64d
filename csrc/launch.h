// The host side of the kernels: one entry per kernel family, dispatching on element type and head dim.
// Callers (ops.cpp) have validated everything these assume (see there).
#pragma once

#include <string>

#include "params.h"
#include "platform.h"

namespace pk {

// Empty when the current device can run the sm_90a (wgmma) kernels, else why not (forward.cu).
std::string hopper_unavailable_reason(Stream stream);

// out, lse of every (b, hq, position) in one launch: grid (query blocks, B * Hq).
void launch_forward(const AttentionParams& params, Stream stream);

// The decode's prefix part: packed rows by mma.sync in the partials kernel (the default), or by the sm_90a wgmma
// loop (attend_sm90.h) in a launch of its own before the own part's ($PK_CUDA_DECODE, read by decode_prefix_loop).
enum class DecodePrefixLoop { mma, wgmma };
DecodePrefixLoop decode_prefix_loop(Stream stream);

// The own programs' layout ($PK_CUDA_DECODE_OWN, read by decode_own_layout): 64-row blocks split by rows across the
// warps, 16-row blocks whose warps split each tile's keys, or (automatic) the keys where a sequence has <= 16 rows.
enum class DecodeOwnLayout { automatic, rows, keys };
DecodeOwnLayout decode_own_layout();

struct DecodePlan {
  int prefix_row_blocks, prefix_splits, prefix_chunk;
  int own_row_blocks, own_splits, own_chunk;
  bool prefix_wgmma;
  bool own_keys_across_warps;
  int slots() const { return prefix_splits + own_splits; }
};

// How the decode splits its work (from shapes only, so a CUDA graph can capture it) for a GPU of `sms` SMs.
DecodePlan plan_decode(const AttentionParams& params, int sms, DecodePrefixLoop loop, DecodeOwnLayout own);

// The partials (prefix programs, then own programs, one launch; two with the wgmma prefix programs), then the merge
// into params.attention.out/lse.
void launch_decode(const DecodeParams& params, Stream stream);

}  // namespace pk
