// The warp-level instructions the kernels use, one wrapper each: sm_80 tensor cores (mma.sync m16n8k16 with fp32
// accumulators), ldmatrix, cp.async and warp shuffles. Under PK_EMULATE each one calls csrc/emulator/.
#pragma once

#include <cmath>

#include "platform.h"

namespace pk {

// The two 16-bit element types the kernels take; `Element` is the storage type, `kBf16` picks the mma variant.
template <typename T> struct ElementTraits;
template <> struct ElementTraits<__half> {
  static constexpr bool kBf16 = false;
  static PK_DEVICE float to_float(__half x) { return __half2float(x); }
  static PK_DEVICE uint16_t bits(float x) {
    __half h = __float2half_rn(x);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};
template <> struct ElementTraits<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
  static PK_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static PK_DEVICE uint16_t bits(float x) {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};

// Two floats rounded to the element type, packed low-first into one 32-bit register (an mma A/B operand pair).
template <typename T>
PK_DEVICE uint32_t pack2(float lo, float hi) {
  return uint32_t(ElementTraits<T>::bits(lo)) | (uint32_t(ElementTraits<T>::bits(hi)) << 16);
}

// Four 8x8 b16 matrices from shared memory; this lane passes the address of row (lane % 8) of matrix (lane / 8).
PK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#ifdef PK_EMULATE
  pk_emu::ldmatrix_x4(r, row_address, false);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}

// The same, each matrix transposed on the way (a B operand from a [k][n] row-major tile).
PK_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
#ifdef PK_EMULATE
  pk_emu::ldmatrix_x4(r, row_address, true);
#else
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}

// d += a * b on a 16x8x16 tile: a row-major 16x16, b "col" 16x8, fp32 accumulators (PTX ISA fragment layouts).
template <typename T>
PK_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef PK_EMULATE
  const uint32_t b[2] = {b0, b1};
  const float c[4] = {d[0], d[1], d[2], d[3]};
  pk_emu::mma_m16n8k16(d, a, b, c, ElementTraits<T>::kBf16 ? pk_emu::Element::bf16 : pk_emu::Element::f16);
#else
  if constexpr (ElementTraits<T>::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// 16 bytes global -> shared without passing through registers; `copy` false writes 16 zero bytes instead
// (out-of-range rows and keys come in as zeros, so no garbage ever reaches an mma).
PK_DEVICE void cp_async_16(void* shared_dst, const void* global_src, bool copy) {
#ifdef PK_EMULATE
  pk_emu::cp_async_16(shared_dst, global_src, copy);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  const int src_bytes = copy ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes));
#endif
}

PK_DEVICE void cp_async_commit() {
#ifdef PK_EMULATE
  pk_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most `kPending` committed groups of this thread are still in flight.
template <int kPending>
PK_DEVICE void cp_async_wait() {
#ifdef PK_EMULATE
  pk_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

PK_DEVICE float shfl_xor(float value, int lane_mask) {
#ifdef PK_EMULATE
  return pk_emu::shfl_xor(value, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#endif
}

PK_DEVICE float fast_exp2(float x) {
#ifdef PK_EMULATE
  return std::exp2(x);
#else
  return exp2f(x);  // ex2.approx under --use_fast_math
#endif
}

PK_DEVICE float fast_log2(float x) {
#ifdef PK_EMULATE
  return std::log2(x);
#else
  return log2f(x);
#endif
}

}  // namespace pk
