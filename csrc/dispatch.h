// Element type x head dim -> a kernel template instantiation. The only place that lists the instantiations.
#pragma once

#include "mma.h"
#include "params.h"

// Runs the statement(s) after `params` with `Element` and `kHeadDim` defined for the call's dtype and head dim
// (variadic so that the body may contain commas).
#define PK_DISPATCH(params, ...)                                                  \
  do {                                                                            \
    if ((params).is_bf16) {                                                       \
      using Element = __nv_bfloat16;                                              \
      if ((params).head_dim == 64) { constexpr int kHeadDim = 64; __VA_ARGS__; }  \
      else { constexpr int kHeadDim = 128; __VA_ARGS__; }                         \
    } else {                                                                      \
      using Element = __half;                                                     \
      if ((params).head_dim == 64) { constexpr int kHeadDim = 64; __VA_ARGS__; }  \
      else { constexpr int kHeadDim = 128; __VA_ARGS__; }                         \
    }                                                                             \
  } while (0)
