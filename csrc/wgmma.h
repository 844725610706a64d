// sm_90a's warpgroup MMA (wgmma), one wrapper each: the shared-memory matrix descriptor, the m64nNk16 f32-accumulate
// MMAs the Hopper forward uses (A and B from shared memory; A from registers with an MN-major B), and the fences
// and group waits around them. Under PK_EMULATE each one calls csrc/emulator/ (which checks the fences, the waits
// and that the operands reached the async proxy).
//
// wgmma exists only in code built for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); every other device target compiles these
// to a trap, and the launcher runs the kernels that use them only on a device of compute capability 9.0 whose
// loaded code is sm_90a (forward.cu asks its pk_wgmma_in_binary symbol).
#pragma once

#include "mma.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_WGMMA_NATIVE 1
#endif

namespace pk {

// The descriptor of a 16-bit operand in shared memory laid out with the 128-byte swizzle (rows of 128 bytes, their
// 16-byte chunks XOR-ed with the row's index in its 1024-byte atom; atoms 1024-byte aligned). `leading_bytes`:
// MN-major operands, the distance between 64-element panels; `stride_bytes`: the distance between 8-row (K-major)
// or 8-k (MN-major) groups. PTX ISA "Matrix Descriptor Format": start, leading and stride offsets >> 4 in bits
// 0-13, 16-29 and 32-45, swizzle mode in bits 62-63 (1: 128-byte).
PK_DEVICE uint64_t matrix_descriptor(const void* shared, uint32_t leading_bytes, uint32_t stride_bytes) {
#ifdef PK_EMULATE
  const uint32_t address = static_cast<uint32_t>(static_cast<const char*>(shared) - shared_memory());
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
#endif
  return (uint64_t((address & 0x3FFFF) >> 4)) | (uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32) | (uint64_t(1) << 62);
}

// The descriptor of the operand `bytes` (a multiple of 16, known at compile time in the loops) past `descriptor`'s:
// one 32-bit add to the start-address field (14 bits of address >> 4), which cannot carry into the bits above it
// because every shared address of a block (< 228 KB < 256 KB) fits; the high word (stride, swizzle) is the same
// (the emulator refuses a descriptor with those bits set). The loops build one
// descriptor per tile and step through it this way, where a matrix_descriptor per k-step cost ~14 instructions
// between consecutive wgmmas in the SASS (a 64-bit add, ~8).
PK_DEVICE uint64_t descriptor_plus(uint64_t descriptor, uint32_t bytes) {
  return (descriptor & 0xFFFFFFFF00000000ull) | (static_cast<uint32_t>(descriptor) + (bytes >> 4));
}

// Orders this thread's register writes (accumulators, A fragments) before the wgmma that reads them.
PK_DEVICE void wgmma_fence() {
#ifdef PK_EMULATE
  pk_emu::wgmma_fence();
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

PK_DEVICE void wgmma_commit() {
#ifdef PK_EMULATE
  pk_emu::wgmma_commit();
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Wait until at most `kPending` committed wgmma groups of this thread are in flight.
template <int kPending>
PK_DEVICE void wgmma_wait() {
#ifdef PK_EMULATE
  pk_emu::wgmma_wait(kPending);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Makes this thread's shared-memory writes (here: landed cp.async copies) visible to the async proxy, which wgmma
// reads its shared operands through; before the barrier that publishes them.
PK_DEVICE void fence_proxy_async() {
#ifdef PK_EMULATE
  pk_emu::fence_proxy_async();
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Tells the compiler that the registers may change here (CUTLASS's warpgroup_fence_operand): wgmma writes its
// accumulators asynchronously, so no read may move above the wait and no write below the issue.
template <int N>
PK_DEVICE void fence_operand(float (&r)[N]) {
#ifndef PK_EMULATE
  PK_UNROLL
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#else
  (void)r;
#endif
}

// The same for A fragments in registers, which wgmma also reads asynchronously: they must stay live and unchanged
// until the wait (the compiler would otherwise reuse their registers right after the issue).
template <int M>
PK_DEVICE void fence_operand(uint32_t (&r)[M][4]) {
#ifndef PK_EMULATE
  PK_UNROLL
  for (int i = 0; i < M; ++i)
    PK_UNROLL
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
#else
  (void)r;
#endif
}

#define PK_WGMMA_D64 "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" "}"
#define PK_WGMMA_OUT64 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PK_WGMMA_D128 "{" "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" "}"
#define PK_WGMMA_OUT128 PK_WGMMA_OUT64, \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// A and B both K-major from shared memory (no transposes), scale 1: d (+)= A B for N = 64 or 128 columns.
// The operands after the N/2 accumulators: %N/2 the A descriptor, + 1 the B descriptor, + 2 `accumulate`.
#define PK_WGMMA_SS(N, TYPE, A, B, S)                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S ", 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " PK_WGMMA_D##N ", %" #A      \
               ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                                                \
               : PK_WGMMA_OUT##N : "l"(a_desc), "l"(b_desc), "r"(static_cast<int>(accumulate)))

// A from registers (this warp's 16 rows in the mma.m16n8k16 A layout), B MN-major (imm-trans-b = 1): the operands
// after the accumulators are A's 4 registers (`A`, their list), the B descriptor and `accumulate`.
#define PK_WGMMA_RS(N, TYPE, A, B, S)                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S ", 0;\n"                                                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " PK_WGMMA_D##N ", " A ", %" #B \
               ", p, 1, 1, 1;\n}\n"                                                                             \
               : PK_WGMMA_OUT##N : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc),                   \
                 "r"(static_cast<int>(accumulate)))

template <typename T, int N>
PK_DEVICE void wgmma_ss(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, bool accumulate) {
  static_assert(N == 64 || N == 128, "instantiated for 64 and 128 columns");
#ifdef PK_EMULATE
  pk_emu::wgmma_m64k16(d, N, nullptr, a_desc, b_desc, accumulate, false,
                       ElementTraits<T>::kBf16 ? pk_emu::Element::bf16 : pk_emu::Element::f16);
#elif defined(PK_WGMMA_NATIVE)
  if constexpr (N == 64) {
    if constexpr (ElementTraits<T>::kBf16) PK_WGMMA_SS(64, "bf16", 32, 33, 34);
    else PK_WGMMA_SS(64, "f16", 32, 33, 34);
  } else {
    if constexpr (ElementTraits<T>::kBf16) PK_WGMMA_SS(128, "bf16", 64, 65, 66);
    else PK_WGMMA_SS(128, "f16", 64, 65, 66);
  }
#else
  (void)d, (void)a_desc, (void)b_desc, (void)accumulate;
  trap();
#endif
}

// d (+)= A B with A from registers and B MN-major (a [16 k][N] tile, N contiguous, through `b_desc`).
template <typename T, int N>
PK_DEVICE void wgmma_rs_mn_major_b(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b_desc, bool accumulate) {
  static_assert(N == 64 || N == 128, "instantiated for 64 and 128 columns");
#ifdef PK_EMULATE
  pk_emu::wgmma_m64k16(d, N, a, 0, b_desc, accumulate, true,
                       ElementTraits<T>::kBf16 ? pk_emu::Element::bf16 : pk_emu::Element::f16);
#elif defined(PK_WGMMA_NATIVE)
  if constexpr (N == 64) {
    if constexpr (ElementTraits<T>::kBf16) PK_WGMMA_RS(64, "bf16", "{%32, %33, %34, %35}", 36, 37);
    else PK_WGMMA_RS(64, "f16", "{%32, %33, %34, %35}", 36, 37);
  } else {
    if constexpr (ElementTraits<T>::kBf16) PK_WGMMA_RS(128, "bf16", "{%64, %65, %66, %67}", 68, 69);
    else PK_WGMMA_RS(128, "f16", "{%64, %65, %66, %67}", 68, 69);
  }
#else
  (void)d, (void)a, (void)b_desc, (void)accumulate;
  trap();
#endif
}

#undef PK_WGMMA_SS
#undef PK_WGMMA_RS

}  // namespace pk
