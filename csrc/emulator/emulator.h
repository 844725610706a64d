// pk_emu: a host-side emulator of the few CUDA features the kernels in csrc/ use, so that the same kernel source,
// built with g++ and -DPK_EMULATE (see csrc/platform.h), runs on the CPU in tests.
//
// Each emulated CUDA thread is a user-space fiber; the threads of a block run on the calling OS thread, scheduled
// cooperatively (a fiber runs until it waits at a barrier or finishes). Blocks run one after another.
// Warp-level instructions (shfl, ldmatrix, mma.sync) are collectives: every lane of the warp must call the same
// one; the last lane to arrive computes the results for the whole warp. sync_threads waits for every thread of the
// block. A launch that can make no progress (some threads wait at a barrier that others never reach) is reported
// as a deadlock instead of hanging.
//
// $PK_EMU_SCHEDULE (forward | reverse | random[:seed], read at each launch) sets the order in which a block's threads
// start and are woken from barriers; see README.md.
//
// Not thread-safe across a launch (one launch per OS thread at a time; separate OS threads may launch
// concurrently). Nothing here may be called from outside a launched thread, except launch itself.
// See README.md beside this file for what the emulator does not model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace pk_emu {

struct Dim3 { unsigned x = 1, y = 1, z = 1; };

// Runs `thread_body` once per emulated CUDA thread, for every block of `grid` (blocks run one after another), with
// `threads_per_block` threads (a multiple of 32, <= 1024) and `shared_bytes` of dynamic shared memory.
// Throws std::runtime_error (the message names the block and thread) on: a deadlock (some lanes of a warp skip a
// collective, or some threads skip sync_threads), an exception thrown in a thread, a warp whose lanes call different
// collectives, a shared-memory address out of the block's buffer or misaligned (ldmatrix, cp_async), a write
// just past either end of the shared buffer (checked when the block ends), a bad launch configuration, or an unknown
// $PK_EMU_SCHEDULE.
// Returns only after every thread finished.
// `kernel` (optional: kernel_id(the kernel function)) identifies the kernel as a GPU would for the shared-memory
// opt-in: a launch of more than 48 KiB of dynamic shared memory then also throws unless allow_shared_bytes(kernel,
// >= shared_bytes) came first (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) on a GPU), and every launch throws
// above max_shared_bytes_optin().
void launch(Dim3 grid, unsigned threads_per_block, size_t shared_bytes, const std::function<void()>& thread_body,
            const void* kernel = nullptr);

// The per-block opt-in limit of the emulated device: $PK_EMU_MAX_SHARED_KIB (read at each call) or 227 KiB, sm_90's
// (sm_80: 163 KiB; sm_86/89 consumer cards: 99 KiB), so that tests can emulate a smaller card.
size_t max_shared_bytes_optin();
// The most blocks a launch may have along grid y and z: $PK_EMU_MAX_GRID_Y (read at each call) or 65535, a GPU's, so
// that tests can make small batches take the launchers' paths for grids past it.
unsigned max_grid_yz();
// The emulated SM's shared memory, which resident blocks share: $PK_EMU_SHARED_PER_SM_KIB or 228 KiB (sm_90's; sm_80:
// 164, sm_86/89: 100). Only reported (launchers size their blocks by it); blocks here run one at a time.
size_t shared_bytes_per_sm();

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), remembered per kernel for the
// process (as on a GPU); more than max_shared_bytes_optin() throws, as the CUDA call fails.
void allow_shared_bytes(const void* kernel, size_t bytes);

template <class Function>
const void* kernel_id(Function* kernel) {
  return reinterpret_cast<const void*>(kernel);
}

unsigned thread_index();  // threadIdx.x
Dim3 block_index();       // blockIdx
Dim3 grid_dim();          // gridDim
unsigned block_dim();     // blockDim.x

// This block's dynamic shared memory: 1024-byte aligned, filled with 0xFF bytes at block start (so a read of
// never-written shared memory shows up as NaN in f32, f16 and bf16 alike).
char* shared_memory();

// __syncthreads(): waits until every thread of the block has called it.
void sync_threads();

// bar.sync id, count / bar.arrive id, count (named barriers, ids 1-15; 0 is sync_threads'): warp collectives (all 32
// lanes, the same id and count; a warp counts as 32 threads). The barrier's phase completes when `count` threads (a
// multiple of 32) have arrived by either call; named_barrier_sync waits for that, named_barrier_arrive does not. Errors: arrivals of one phase naming different counts, a bad id or count, a phase
// left incomplete when the block ends (the kernel's arrivals and waits do not pair up), and deadlocks (listed).
void named_barrier_sync(unsigned id, unsigned count);
void named_barrier_arrive(unsigned id, unsigned count);

// __syncwarp(): waits until every lane of the warp has called it (a warp collective, with nothing exchanged).
void sync_warp();

// __shfl_xor_sync(0xffffffff, value, lane_mask): the value of lane (lane ^ lane_mask); a source lane outside the
// warp (lane_mask >= 32) gives the caller its own value, as shfl.sync.bfly does.
float shfl_xor(float value, int lane_mask);

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: each lane passes ITS row address (lanes 8i..8i+7 give the 8 row
// addresses of matrix i, each 16-byte aligned and inside shared memory); r[j] receives this lane's 32-bit piece of
// matrix j: without .trans, lane l gets row l/4, elements 2(l%4) (low half) and 2(l%4)+1 (high half); with .trans,
// lane l gets column l/4, rows 2(l%4) (low half) and 2(l%4)+1 (high half).
void ldmatrix_x4(uint32_t r[4], const void* row_address, bool transpose);

enum class Element { f16, bf16 };

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d = a*b + c with the PTX ISA fragment layouts
// (g = lane/4, t = lane%4; low half of a register = the element with the lower index):
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]   (d likewise)
// Products are exact and summed in double, then rounded once to float (hardware sums in fp32 with its own order and
// rounding, so results can differ from a GPU's in the last bits). d may alias c.
void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], Element type);

// cp.async.cg.shared.global [dst], [src], 16, src_size: copies 16 bytes when `copy`, else writes 16 zero bytes
// (src_size = 0; src is not read). dst must lie in shared memory; dst and src must be 16-byte aligned.
// Modelled asynchronously: the copy lands only when the issuing thread's cp_async_wait covers its group, and an
// ldmatrix of a shared chunk with a copy still in flight is an error (a missing wait or sync_threads), as is a
// second copy into a chunk with one in flight, or a thread that finishes with copies never waited for.
void cp_async_16(void* shared_dst, const void* global_src, bool copy);
void cp_async_commit();                 // cp.async.commit_group: closes this thread's open group
void cp_async_wait(int pending_groups);  // cp.async.wait_group N: lands all but this thread's N newest groups

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16} (sm_90a), N = n in 8, 16, ..., 128:
// D[64 x n] = A[64 x 16] B[16 x n] (+ D when `accumulate`) for a warpgroup (4 consecutive warps, every lane
// calling). Warp w % 4 owns rows 16 (w % 4) .. + 15, in the m16n8 C layout once per 8 columns:
//   d[4j + q] = D[16 (w % 4) + lane/4 + 8 (q >= 2)][8j + 2 (lane % 4) + (q & 1)],  j < n/8, q < 4.
// A comes from registers when `a` is not null (this warp's 16 rows, the mma_m16n8k16 A layout), else from shared
// memory through `a_desc` (K-major); B from shared memory through `b_desc`, K-major, or MN-major when
// `transpose_b`. Descriptors in the PTX ISA's matrix-descriptor format with addresses relative to shared_memory();
// only the 128-byte swizzle, with atoms aligned to 1024 bytes, is emulated (anything else throws). Emulated per warp
// (its rows need only its A rows): the warpgroup's 4 warps are not checked to issue together.
// Asynchronous as on the GPU: the results land in d only at the wgmma_wait that covers their group (d reads NaN
// until then); a later wgmma on the same accumulators chains onto the pending results, as the hardware orders
// accumulator reuse. Errors: no wgmma_fence since the thread's last wgmma_wait; a shared operand whose cp.async has
// not landed, was not published by a sync_threads, or not handed to the async proxy by fence_proxy_async of the
// thread that landed it; results never waited for when the thread finishes. Numerics as mma_m16n8k16's.
void wgmma_m64k16(float* d, int n, const uint32_t a[4], uint64_t a_desc, uint64_t b_desc, bool accumulate,
                  bool transpose_b, Element type);
void wgmma_fence();                     // wgmma.fence.sync.aligned
void wgmma_commit();                    // wgmma.commit_group.sync.aligned
void wgmma_wait(int pending_groups);    // wgmma.wait_group.sync.aligned N
void fence_proxy_async();               // fence.proxy.async.shared::cta: this thread's landed copies -> async proxy

// sm_90's transaction barriers (mbarrier.*.shared::cta.b64) and tensor copies (TMA, cp.async.bulk.tensor), which
// a producer warp uses to feed consumer warpgroups without sync_threads. A barrier is an 8-byte slot in shared
// memory (its state is kept here, by offset); phase k completes when its `count` arrivals of the phase have come and
// every byte announced by arrive_expect_tx in it has landed; then the next phase starts with `count` again.
// mbarrier_wait(bar, parity) is try_wait.parity in a loop: it returns once the phase of that parity has completed,
// i.e. while the current phase's parity differs (a fresh barrier: parity 1 passes at once, 0 waits for phase 0).
// Errors: a barrier used before mbarrier_init, or not 8-byte aligned in shared memory; more arrivals than a phase
// expects; a deadlock (every unfinished thread waits) lists the barrier waiters with their phases.
void mbarrier_init(void* bar, unsigned count);            // mbarrier.init.shared::cta.b64 [bar], count
void mbarrier_arrive(void* bar);                          // mbarrier.arrive.shared::cta.b64 _, [bar]
void mbarrier_arrive_expect_tx(void* bar, unsigned bytes);  // mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], bytes
void mbarrier_wait(void* bar, unsigned parity);           // mbarrier.try_wait.parity.shared::cta.b64, until true

// What cuTensorMapEncodeTiled records (16-bit elements, interleave none, no L2 promotion, OOB fill zeros): the
// tensor's base, dims (innermost first), the byte strides of dims 1..rank-1, the box copied, and the swizzle.
struct TensorMap {
  const void* base = nullptr;
  int rank = 0;
  uint64_t dims[5] = {};
  uint64_t strides[5] = {};  // bytes; strides[0] is the element size (dim 0 is contiguous)
  uint32_t box[5] = {};
  bool swizzle_128b = false;
};
// cuTensorMapEncodeTiled's checks (base 16-byte aligned; rank 1-5; dims in [1, 2^32]; strides multiples of 16 below
// 2^40; box sizes in [1, 256], dim 0 of at most 128 bytes under the 128-byte swizzle): "" when the map is valid,
// else why not (a GPU's encode fails with CUDA_ERROR_INVALID_VALUE there). Host side: call it outside a launch.
std::string encode_tensor_map(TensorMap& map, const void* base, int rank, const uint64_t* dims,
                              const uint64_t* strides_bytes, const uint32_t* box, bool swizzle_128b);

// cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [map, {coords}], [bar]: copies
// the box at `coords` (one per dim, innermost first; elements outside the tensor read as zeros) to dst, packed
// innermost first, with the 128-byte swizzle of the address when the map has it (dst then 1024-byte aligned), and
// counts its bytes off `bar`'s transaction count when it lands. Modelled lazily: a copy lands only when some thread
// waits on its barrier, or when no thread can run otherwise. Errors: a wgmma or ldmatrix reading the box's bytes
// before the copy landed, or without having waited for the barrier phase the copy completed (the copy is not
// visible to that thread); a copy into bytes a wgmma not yet waited for still reads, into a copy in flight, or over
// a barrier; copies that never land before the block ends.
void tma_load(void* shared_dst, const TensorMap& map, void* bar, const int32_t* coords);

// setmaxnreg.{inc,dec}.sync.aligned.u32 count: every thread of a warpgroup (128 threads, aligned) asks for the
// same count (24-256, a multiple of 8); the last one to arrive applies it for the warpgroup. The block's registers
// are a pool of what the launch gave it: min(256, 64K / threads rounded down to a multiple of 8) per thread (what
// ptxas allots a kernel with __launch_bounds__(threads, 1) that needs more), nothing spare. dec returns registers to
// the pool; inc waits until the pool has enough (a deadlock if no warpgroup ever returns them). Errors: threads of
// a warpgroup asking differently, an inc below or a dec above the current count, a block of partial warpgroups.
void set_max_registers(unsigned count, bool increase);

// Shared-memory bank conflicts of ldmatrix, counted since the last reset: each of an ldmatrix's four 8-row phases
// is one 128-byte wavefront when its 8 rows (16 bytes each) fall in 8 different 16-byte bank groups; every further
// row in an already used group costs one more wavefront (a performance bug the results cannot show). Also the most
// dynamic shared memory a launch asked for since the reset (which tile setting a launcher chose), the blocks
// launched (which grid: the persistent forward's is one block per emulated SM) and the works the kernels noted
// (note_work: that a persistent block's schedule ran each work once, neither skipping nor repeating one).
struct SharedMemoryStats {
  uint64_t ldmatrix_phases = 0;
  uint64_t ldmatrix_extra_wavefronts = 0;
  uint64_t largest_launch_bytes = 0;
  uint64_t blocks_launched = 0;
  uint64_t works_noted = 0;
};
SharedMemoryStats shared_memory_stats();
void note_work();
void reset_shared_memory_stats();

}  // namespace pk_emu
