// Element type x head dim -> a kernel template instantiation. The only place that lists the instantiations.
#pragma once

#include "mma.h"
#include "params.h"

// Calls BODY with `Element` and `kHeadDim` defined for the call's dtype and head dim.
#define PK_DISPATCH(params, BODY)                                  \
  do {                                                             \
    if ((params).is_bf16) {                                        \
      using Element = __nv_bfloat16;                               \
      if ((params).head_dim == 64) { constexpr int kHeadDim = 64; BODY; }   \
      else { constexpr int kHeadDim = 128; BODY; }                 \
    } else {                                                       \
      using Element = __half;                                      \
      if ((params).head_dim == 64) { constexpr int kHeadDim = 64; BODY; }   \
      else { constexpr int kHeadDim = 128; BODY; }                 \
    }                                                              \
  } while (0)
