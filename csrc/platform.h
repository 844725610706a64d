// One kernel source, two builds.
//  - nvcc (the extension setup.py builds): the real CUDA kernels.
//  - PK_EMULATE (a host C++ build, tests only): the same kernel code runs on the CPU, one emulated thread per
//    CUDA thread, with the warp-level instructions (ldmatrix, mma.sync, shfl, cp.async) emulated by csrc/emulator/.
//    That is how the kernels' index math, fragment layouts, masking and pipelining are tested on machines
//    without a GPU. Kernels touch the hardware only through the names defined here and in mma.h.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pk {
// What shared_memory_limits() (below, per build) reports about the current device.
struct SharedMemoryLimits {
  size_t per_block_optin;  // the most dynamic shared memory a block may opt in to
  size_t per_sm;           // an SM's shared memory, which its resident blocks share
};

// A value asked once per device and kept in `cache` (0: not asked yet, so an ask() that returns 0 is asked again);
// devices past kCachedDevices ask on every call. No synchronization: a race asks twice and stores the same value.
constexpr int kCachedDevices = 64;
template <class Ask>
inline int once_per_device(std::atomic<int> (&cache)[kCachedDevices], int device, Ask ask) {
  const bool cached = device >= 0 && device < kCachedDevices;
  int value = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    value = ask();
    if (cached) cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}
}  // namespace pk

#ifdef PK_EMULATE

#include <stdexcept>

#include "emulator/emulator.h"

#define PK_KERNEL(...) void  // a host function that pk_emu::launch runs once per emulated thread
#define PK_UNROLL
#define PK_NO_UNROLL
#define PK_DEVICE inline
#define PK_RESTRICT __restrict__

namespace pk {
inline unsigned thread_index() { return pk_emu::thread_index(); }
inline unsigned block_index_x() { return pk_emu::block_index().x; }
inline unsigned block_index_y() { return pk_emu::block_index().y; }
inline unsigned block_index_z() { return pk_emu::block_index().z; }
inline unsigned grid_dim_x() { return pk_emu::grid_dim().x; }
// A work (one block's worth of a launch) done, counted for the tests (a GPU build counts nothing)
inline void note_work() { pk_emu::note_work(); }
inline char* shared_memory() { return pk_emu::shared_memory(); }
inline void sync_threads() { pk_emu::sync_threads(); }
inline void sync_warp() { pk_emu::sync_warp(); }
// A kernel's own check failed: the launch fails (the emulator names the thread).
[[noreturn]] inline void trap() { throw std::runtime_error("the kernel trapped (one of its own checks failed)"); }

// More than 48 KiB of dynamic shared memory needs an opt-in per kernel, on a GPU and in the emulator alike.
template <class Kernel>
inline void allow_shared_bytes(Kernel kernel, size_t bytes) {
  pk_emu::allow_shared_bytes(pk_emu::kernel_id(kernel), bytes);
}
// The emulated device's ($PK_EMU_MAX_SHARED_KIB, $PK_EMU_SHARED_PER_SM_KIB; sm_90's by default).
inline SharedMemoryLimits shared_memory_limits() {
  return {pk_emu::max_shared_bytes_optin(), pk_emu::shared_bytes_per_sm()};
}
inline int current_device() { return 0; }
}  // namespace pk

// kernel<<<grid, threads, shared_bytes, stream>>>(args...), emulated: every block, one at a time.
#define PK_LAUNCH(kernel, grid, threads, shared_bytes, stream, ...)                                            \
  pk_emu::launch(pk_emu::Dim3{(grid).x, (grid).y, (grid).z}, (threads), (shared_bytes), [&] { kernel(__VA_ARGS__); }, \
                 pk_emu::kernel_id(kernel))

namespace pk {
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
using Stream = void*;
}  // namespace pk

#else  // nvcc

#include <cuda_runtime.h>

// PK_KERNEL(max threads per block[, min blocks per SM]): the second caps registers at 64K / (threads * blocks).
#define PK_KERNEL(...) __global__ void __launch_bounds__(__VA_ARGS__)
// Fixed-trip loops over register arrays must unroll fully, or the arrays spill to local memory.
#define PK_UNROLL _Pragma("unroll")
// A loop kept rolled where its unrolled copies would not fit the registers (the TMA producer's 24).
#define PK_NO_UNROLL _Pragma("unroll 1")
#define PK_DEVICE __device__ __forceinline__
#define PK_RESTRICT __restrict__

namespace pk {
#ifdef __CUDACC__  // device code; ops.cpp (host compiler) only needs Dim3 and Stream from here
PK_DEVICE unsigned thread_index() { return threadIdx.x; }
PK_DEVICE unsigned block_index_x() { return blockIdx.x; }
PK_DEVICE unsigned block_index_y() { return blockIdx.y; }
PK_DEVICE unsigned block_index_z() { return blockIdx.z; }
PK_DEVICE unsigned grid_dim_x() { return gridDim.x; }
PK_DEVICE void note_work() {}  // (the emulation counts works for the tests)
PK_DEVICE char* shared_memory() {  // 1024-byte aligned: wgmma's 128-byte-swizzle atoms must be
  extern __shared__ __align__(1024) char pk_dynamic_shared[];
  return pk_dynamic_shared;
}
PK_DEVICE void sync_threads() { __syncthreads(); }
PK_DEVICE void sync_warp() { __syncwarp(); }
// A kernel's own check failed: the launch fails with an illegal-instruction error, which the caller checks.
PK_DEVICE void trap() { __trap(); }

// More than 48 KiB of dynamic shared memory needs an opt-in per kernel (sm_80: up to 163 KiB, sm_90: 227 KiB).
// A refusal shows up as the launch's error, which the caller checks.
template <class Kernel>
inline void allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

inline int current_device() {
  int device = 0;
  cudaGetDevice(&device);
  return device;
}

// The current device's (sm_90: 227 / 228 KiB, sm_80: 163 / 164 KiB, sm_86/89: 99 / 100 KiB), asked once per device
// (the small eager decodes this serves are bound by host time per call); no synchronization.
inline SharedMemoryLimits shared_memory_limits() {
  static std::atomic<int> per_block[kCachedDevices], per_sm[kCachedDevices];
  const int device = current_device();
  auto attribute = [device](cudaDeviceAttr which) {
    int value = 0;
    cudaDeviceGetAttribute(&value, which, device);
    return value;
  };
  const int block = once_per_device(per_block, device,
                                    [&] { return attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); });
  const int sm = once_per_device(per_sm, device,
                                 [&] { return attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor); });
  return {static_cast<size_t>(block), static_cast<size_t>(sm)};
}
#endif
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
using Stream = cudaStream_t;
}  // namespace pk

#define PK_LAUNCH(kernel, grid, threads, shared_bytes, stream, ...) \
  kernel<<<dim3((grid).x, (grid).y, (grid).z), (threads), (shared_bytes), (stream)>>>(__VA_ARGS__)

#endif
