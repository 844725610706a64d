// sm_90's producer/consumer machinery, one wrapper each: transaction barriers (mbarrier) in shared memory, tensor
// copies (TMA: cp.async.bulk.tensor, global -> shared through a tensor map, with the 128-byte swizzle wgmma reads),
// named barriers (any arch; here for warpgroups taking turns) and the warpgroup register reallocation (setmaxnreg)
// that lets a producer warpgroup give its registers to the consumers. Under PK_EMULATE each one calls
// csrc/emulator/ (which checks arrivals, phases, and that a thread reads a copied tile only after waiting for the
// phase that completed it).
//
// Like wgmma, these are used only in code built for sm_90a; every other device target compiles them to a trap
// (or nothing), and the launcher runs the kernels that use them only where wgmma runs (forward.cu).
#pragma once

#include <cstdint>
#include <string>

#include "wgmma.h"

#ifndef PK_EMULATE
#include <cuda.h>  // CUtensorMap and its enums (types only: the encode function is found at run time)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#endif

namespace pk {

#ifdef PK_EMULATE
using TensorMap = pk_emu::TensorMap;
#define PK_GRID_CONSTANT
#else
using TensorMap = CUtensorMap;
// A kernel parameter whose address is taken (a tensor map TMA reads) must be __grid_constant__.
#define PK_GRID_CONSTANT __grid_constant__
#endif

PK_DEVICE uint32_t shared_address(const void* p) {
#ifdef PK_EMULATE
  return static_cast<uint32_t>(static_cast<const char*>(p) - shared_memory());
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// One thread initializes; fence_barrier_init and a block barrier must follow before any other thread uses it.
PK_DEVICE void mbarrier_init(uint64_t* bar, unsigned count) {
#ifdef PK_EMULATE
  pk_emu::mbarrier_init(bar, count);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
#else
  (void)bar, (void)count;
#endif
}

// Makes the initialized barriers visible to the other threads and to the async proxy (TMA's completions).
PK_DEVICE void fence_barrier_init() {
#if !defined(PK_EMULATE) && defined(PK_WGMMA_NATIVE)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// An arrival by the threads whose `arrive` is true (predicated, no branch: CUTLASS's ClusterBarrier::arrive(cta,
// pred)), e.g. one lane per warp where the barrier counts warps.
PK_DEVICE void mbarrier_arrive_if(uint64_t* bar, bool arrive) {
#ifdef PK_EMULATE
  if (arrive) pk_emu::mbarrier_arrive(bar);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(
          shared_address(bar)),
      "r"(static_cast<uint32_t>(arrive))
      : "memory");
#else
  (void)bar, (void)arrive;
#endif
}

// Announces `bytes` of copies completing on this barrier's current phase, and arrives.
PK_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef PK_EMULATE
  pk_emu::mbarrier_arrive_expect_tx(bar, bytes);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
#else
  (void)bar, (void)bytes;
#endif
}

// Returns once the barrier's phase of parity `parity` has completed (phase k has parity k % 2; on a fresh barrier
// parity 1 counts as completed, so a producer's first wait for an empty stage passes).
PK_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef PK_EMULATE
  pk_emu::mbarrier_wait(bar, parity);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile(
      "{\n.reg .pred done;\nwait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
#else
  (void)bar, (void)parity;
  trap();
#endif
}

// Fetches a tensor map (a __grid_constant__ kernel parameter) into the cache before its first copy.
PK_DEVICE void prefetch_tensor_map(const TensorMap& map) {
#if !defined(PK_EMULATE) && defined(PK_WGMMA_NATIVE)
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map)) : "memory");
#else
  (void)map;
#endif
}

// The box of `map` at (c0, c1, c2, c3) (dim 0 innermost; elements outside the tensor read as zeros) into `dst`,
// completing on `bar` (which must expect its bytes).
PK_DEVICE void tma_load_4d(void* dst, const TensorMap& map, uint64_t* bar, int c0, int c1, int c2, int c3) {
#ifdef PK_EMULATE
  const int32_t coords[4] = {c0, c1, c2, c3};
  pk_emu::tma_load(dst, map, bar, coords);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(shared_address(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#else
  (void)dst, (void)map, (void)bar, (void)c0, (void)c1, (void)c2, (void)c3;
  trap();
#endif
}

// Named barriers (bar.sync / bar.arrive with an id and a thread count, whole warps): sync waits until kCount
// threads arrived by either; arrive does not wait. Id 0 is sync_threads'. Immediate ids: with ids in registers
// ptxas reserves all 16 barriers.
template <unsigned kId, unsigned kCount>
PK_DEVICE void named_barrier_sync() {
  static_assert(kId > 0 && kId < 16 && kCount % 32 == 0, "ids 1-15, whole warps");
#ifdef PK_EMULATE
  pk_emu::named_barrier_sync(kId, kCount);
#else
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
#endif
}
template <unsigned kId, unsigned kCount>
PK_DEVICE void named_barrier_arrive() {
  static_assert(kId > 0 && kId < 16 && kCount % 32 == 0, "ids 1-15, whole warps");
#ifdef PK_EMULATE
  pk_emu::named_barrier_arrive(kId, kCount);
#else
  asm volatile("bar.arrive %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
#endif
}

// setmaxnreg: every thread of a warpgroup asks for the same register count; a producer warpgroup lowers its own so
// that the consumers may raise theirs above the launch's 64K / threads. The emulation keeps the block's pool (an
// inc waits until a dec gave enough back) and checks that whole warpgroups ask alike.
template <int kRegisters>
PK_DEVICE void lower_registers_to() {
#ifdef PK_EMULATE
  pk_emu::set_max_registers(kRegisters, false);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}
template <int kRegisters>
PK_DEVICE void raise_registers_to() {
#ifdef PK_EMULATE
  pk_emu::set_max_registers(kRegisters, true);
#elif defined(PK_WGMMA_NATIVE)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

// Host side: a 4-d tensor map of 16-bit elements (dims innermost first, the byte strides of dims 1-3) copied in
// boxes of `box`, with the 128-byte swizzle and zeros outside the tensor. "" when made, else why not (TMA needs a
// 16-byte aligned base and strides that are multiples of 16 bytes).
#ifdef PK_EMULATE
inline std::string encode_tensor_map_4d(TensorMap& map, const void* base, const uint64_t (&dims)[4],
                                        const uint64_t (&strides_bytes)[3], const uint32_t (&box)[4], bool) {
  return pk_emu::encode_tensor_map(map, base, 4, dims, strides_bytes, box, true);
}
#elif defined(__CUDACC__)
inline std::string encode_tensor_map_4d(TensorMap& map, const void* base, const uint64_t (&dims)[4],
                                        const uint64_t (&strides_bytes)[3], const uint32_t (&box)[4], bool bf16) {
  // The driver's encoder, found once through the runtime (the extension does not link libcuda itself).
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t error =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000, cudaEnableDefault, &found);
#else  // (CUDA 13 dropped this one)
    const cudaError_t error = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &function, cudaEnableDefault, &found);
#endif
    if (error != cudaSuccess) cudaGetLastError();
    return error == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function)
               : nullptr;
  }();
  if (!encode) return "the driver has no cuTensorMapEncodeTiled (CUDA 12 or newer is needed)";
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  cuuint64_t global_dims[4], global_strides[3];
  cuuint32_t box_dims[4];
  for (int d = 0; d < 4; ++d) global_dims[d] = dims[d], box_dims[d] = box[d];
  for (int d = 0; d < 3; ++d) global_strides[d] = strides_bytes[d];
  const CUresult result = encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                                 const_cast<void*>(base), global_dims, global_strides, box_dims, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result == CUDA_SUCCESS) return "";
  return "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(result)) +
         " (TMA needs a 16-byte aligned base and strides that are multiples of 16 bytes)";
}
#endif

}  // namespace pk
