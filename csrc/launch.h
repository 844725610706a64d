// The host side of the kernels: one entry per kernel family, dispatching on element type and head dim.
// Callers (ops.cpp) have validated everything these assume (see there).
#pragma once

#include "params.h"
#include "platform.h"

namespace pk {

// out, lse of every (b, hq, position) in one launch: grid (query blocks, B * Hq).
void launch_forward(const AttentionParams& params, Stream stream);

struct DecodePlan {
  int prefix_row_blocks, prefix_splits, prefix_chunk;
  int own_row_blocks, own_splits, own_chunk;
  int slots() const { return prefix_splits + own_splits; }
};

// How the decode splits its work (from shapes only, so a CUDA graph can capture it) for a GPU of `sms` SMs.
DecodePlan plan_decode(const AttentionParams& params, int sms);

// The partials (prefix programs, then own programs, one launch), then the merge into params.attention.out/lse.
void launch_decode(const DecodeParams& params, Stream stream);

}  // namespace pk
