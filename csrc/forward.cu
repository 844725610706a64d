// The fused forward (prefill and training forward): each block takes 128 consecutive queries of one (b, hq) (64 in
// a one-warpgroup Hopper build) and attends to its sequence's prefix (read in place from the ONE prefix copy, picked
// by prefix_index) and then to its own keys, in one online softmax. Own tiles past the block's last causal key are
// never loaded; only tiles that cross a boundary (prefix end, causal diagonal, sequence end) or have a
// key_padding_mask are masked.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "attend.h"
#include "attend_sm90.h"
#include "dispatch.h"
#include "launch.h"

namespace pk {

namespace {

// 32 rows per warp (two 16-row tiles), 128 per block; 64-key tiles, 32 at head dim 128 (64-key tiles spilled
// 168 B there and timed 8% slower on the H100, as did 16 rows per warp). PK_FORWARD_ROW_TILES, PK_FORWARD_KEYS_D128,
// PK_FORWARD_MIN_BLOCKS and PK_FORWARD_STAGES exist for bench/tune_cuda.py, which rebuilds with them
// (NVCC_APPEND_FLAGS) to time other shapes; the defaults ship.
#ifndef PK_FORWARD_ROW_TILES
#define PK_FORWARD_ROW_TILES 2
#endif
#ifndef PK_FORWARD_KEYS_D128
#define PK_FORWARD_KEYS_D128 32
#endif
#ifndef PK_FORWARD_MIN_BLOCKS  // blocks per SM the register allocation must allow (1: up to 255 registers)
#define PK_FORWARD_MIN_BLOCKS 1
#endif
#ifndef PK_FORWARD_STAGES  // BlockAttention's kStages: 1 = one K and one V tile (timed so far); 2-3: a ring
#define PK_FORWARD_STAGES 1
#endif
template <typename T, int D>
using ForwardAttention =
    BlockAttention<T, D, PK_FORWARD_ROW_TILES, D == 128 ? PK_FORWARD_KEYS_D128 : 64, PK_FORWARD_STAGES>;

// The sm_90a forward (attend_sm90.h): 128 rows, 128-key tiles, FA3's overlap of one tile's softmax with the
// previous tile's P.V, over a ring of 3 tile pairs (224 KB at head dim 128): one block per SM, 333-345 TFLOP/s on
// the H200 with the cp.async feed, 382-395 with the TMA feed (bench/NOTES.md, fourteenth session).
// PK_HOPPER_STAGES, PK_HOPPER_OVERLAP, PK_HOPPER_PINGPONG, PK_HOPPER_WARPGROUPS and PK_HOPPER_KEYS are for
// bench/tune_cuda.py: the plain loop with 2 stages, the ping-pong of the two warpgroups (+2% there with the
// cp.async feed), and one warpgroup of 64 rows with 64-key tiles, two blocks per SM (the shape of the Triton
// forward's tiles; the cp.async feed only: 312-320 TFLOP/s on the H200, below the shipped 333-345).
#ifndef PK_HOPPER_STAGES
#define PK_HOPPER_STAGES 3
#endif
#ifndef PK_HOPPER_OVERLAP
#define PK_HOPPER_OVERLAP 1
#endif
#ifndef PK_HOPPER_PINGPONG  // the two warpgroups take turns issuing (needs the overlap)
#define PK_HOPPER_PINGPONG 0
#endif
#ifndef PK_HOPPER_WARPGROUPS  // 64-row warpgroups per block (the TMA feed keeps 2)
#define PK_HOPPER_WARPGROUPS 2
#endif
#ifndef PK_HOPPER_KEYS  // keys per tile (the TMA feed keeps 128)
#define PK_HOPPER_KEYS 128
#endif
template <typename T, int D, bool kTma>
using HopperForwardAttention =
    HopperAttention<T, D, kTma ? 128 : PK_HOPPER_KEYS, PK_HOPPER_STAGES, PK_HOPPER_OVERLAP != 0, kTma,
                    PK_HOPPER_PINGPONG != 0, kTma ? 2 : PK_HOPPER_WARPGROUPS>;
// Blocks per SM the register allocation must allow: two for a one-warpgroup block whose shared memory lets two
// share an SM (at most 255 registers a thread either way), one otherwise.
template <class Attention>
constexpr int hopper_min_blocks() {
  return Attention::kBlockThreads == 128 && 2 * (Attention::kSharedBytes + 1024) <= 228 * 1024 ? 2 : 1;
}

// The tensor maps of the TMA feed (tma.h), one per tensor it copies; nothing for the cp.async loops.
template <bool kTma>
struct ForwardMaps {};
template <>
struct ForwardMaps<true> {
  TensorMap q, k, v, prefix_k, prefix_v;
};

// One block's work: kBlockM consecutive queries of one (b, hq), attending to the prefix its sequence uses, then to
// its own keys up to the last one a row of it sees: prefix_tiles + own_tiles key tiles of kBlockN.
template <typename T, int kBlockM, int kBlockN>
struct ForwardWork {
  int m0, bh, hq, h, b, n, prefix_len, own_end, prefix_tiles, own_tiles, first_row_pos;
  const T* q;
  const T *pk, *pv, *k, *v;
  const uint8_t* key_ok;

  // Query block m_blocks - 1 - m_block_from_last: the last query blocks first, which under causal masking have the
  // most keys, so that the long works start early and the short ones fill the tail.
  PK_DEVICE ForwardWork(const AttentionParams& p, int m_block_from_last, int bh_) : bh(bh_) {
    const int m_blocks = (p.seq_q + kBlockM - 1) / kBlockM;
    m0 = (m_blocks - 1 - m_block_from_last) * kBlockM;
    b = bh / p.heads_q, hq = bh % p.heads_q, h = hq / p.group;
    q = static_cast<const T*>(p.q) + b * p.q_stride[0] + hq * p.q_stride[1];
    n = p.prefix_index ? static_cast<int>(load_index(p.prefix_index, p.prefix_index_int32, b)) : 0;
    prefix_len = p.prefix_lens ? static_cast<int>(load_index(p.prefix_lens, p.prefix_lens_int32, n)) : p.prefix_len;
    pk = static_cast<const T*>(p.prefix_k) + n * p.pk_stride[0] + h * p.pk_stride[1];
    pv = static_cast<const T*>(p.prefix_v) + n * p.pv_stride[0] + h * p.pv_stride[1];
    k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
    v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
    key_ok = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride[0] : nullptr;
    const int offset = p.seq_k - p.seq_q;  // query i sits at sequence position offset + i
    const int last_row = (m0 + kBlockM < p.seq_q ? m0 + kBlockM : p.seq_q) - 1;
    own_end = p.seq_k;
    if (p.causal) {  // no row of this block sees an own key past its last row's position
      own_end = offset + last_row + 1;
      own_end = own_end < 0 ? 0 : (own_end > p.seq_k ? p.seq_k : own_end);
    }
    prefix_tiles = (prefix_len + kBlockN - 1) / kBlockN;
    own_tiles = (own_end + kBlockN - 1) / kBlockN;
    first_row_pos = offset + m0;
  }

  PK_DEVICE int num_tiles() const { return prefix_tiles + own_tiles; }

  // Only tiles that cross a boundary (prefix end, causal diagonal, sequence end) or have a key_padding_mask are
  // masked.
  PK_DEVICE KeyTile<T> tile(const AttentionParams& p, int t) const {
    if (t < prefix_tiles) {
      const int key0 = t * kBlockN;
      return KeyTile<T>{pk, pv, p.pk_stride[2], p.pv_stride[2], key0, prefix_len, false, key0 + kBlockN > prefix_len};
    }
    const int key0 = (t - prefix_tiles) * kBlockN;
    const bool crosses_diagonal = p.causal && key0 + kBlockN - 1 > first_row_pos;
    return KeyTile<T>{k, v, p.k_stride[2], p.v_stride[2], key0, own_end, true,
                      key0 + kBlockN > own_end || crosses_diagonal || key_ok != nullptr};
  }
};

// The consumers' side of one work: the attention loop over its tiles, then its output and LSE rows.
template <typename T, int D, class Attention, class Work, class... Position>
PK_DEVICE void attend_work(const AttentionParams& p, const Work& work, Position... position) {
  Attention attention(shared_memory());
  int row_pos[Attention::kRows];
  PK_UNROLL
  for (int i = 0; i < Attention::kRows; ++i) row_pos[i] = work.first_row_pos + attention.row_of(i);
  auto visible = [&](const KeyTile<T>& t, int i, int key) {
    if (key >= t.end) return false;
    if (!t.own) return true;  // prefix keys: always visible up to the prefix's length
    return (!p.causal || key <= row_pos[i]) && (!work.key_ok || work.key_ok[key * p.mask_stride[1]] != 0);
  };
  const int m0 = work.m0;
  attention.load_q_async([&](int r) { return m0 + r < p.seq_q ? work.q + (m0 + r) * p.q_stride[2] : nullptr; },
                         work.q);
  attention.run(work.num_tiles(), [&](int t) { return work.tile(p, t); }, p.scale_log2, visible, p.seq_q - m0,
                position...);

  float inv[Attention::kRows], lse[Attention::kRows];
  attention.finish(inv, lse);
  const int64_t row0 = static_cast<int64_t>(work.bh) * p.seq_q + m0;
  T* out = static_cast<T*>(p.out);
  attention.for_each_output(inv, [&](int i, int col, float x0, float x1) {
    const int r = attention.row_of(i);
    if (m0 + r < p.seq_q)
      *reinterpret_cast<uint32_t*>(out + (row0 + r) * D + col) = pack2<T>(x0, x1);
  });
  if (attention.lane % 4 == 0) {
    PK_UNROLL
    for (int i = 0; i < Attention::kRows; ++i) {
      const int r = attention.row_of(i);
      if (m0 + r < p.seq_q) p.lse[row0 + r] = lse[i];
    }
  }
  if (attention.warp == 0 && attention.lane == 0) note_work();
}

// One kernel for every loop: `Attention` is BlockAttention (mma.sync, any sm_80+) or HopperAttention (wgmma, fed
// by cp.async or by a TMA producer warpgroup). A block does one work: the grid is (query blocks, B * Hq). With
// kPersistent (the TMA feed only: FlashAttention-3's persistent kernel) the grid is one block per SM working
// through several works: its barriers are set up once, and the producer copies the next work's Q and first tiles
// while the consumers finish the current one's P.V and store its output, where a block of its own would start
// with the tensor cores idle. No block scheduler balances a persistent grid, so the works go out statically in
// units of equal length: query blocks j and m_blocks - 1 - j of one (b, hq) (under causal masking the second has
// as many own keys fewer as the first has more; the middle block of an odd count is a unit alone), block i taking
// units i, i + grid, ... And the units of one (b, hq) are consecutive, so that the blocks running at once share
// the K/V of a few heads in L2 (ordered heads first, each block would stream K/V of its own from DRAM: at B=8
// S=2048, ~3 TB/s).
template <class Work, class Visit>
PK_DEVICE void for_each_persistent_work(const AttentionParams& p, int block_m, Visit visit) {
  const int m_blocks = (p.seq_q + block_m - 1) / block_m, pairs = (m_blocks + 1) / 2;
  const int units = pairs * p.batch * p.heads_q;
  for (int u = static_cast<int>(block_index_x()); u < units; u += static_cast<int>(grid_dim_x())) {
    const int bh = u / pairs, j = u % pairs, works = m_blocks - 1 - j != j ? 2 : 1;
    PK_NO_UNROLL  // one call site: the TMA producer's copy of `visit` must fit its 24 registers once
    for (int k = 0; k < works; ++k) visit(Work(p, k == 0 ? j : m_blocks - 1 - j, bh));  // the longer one first
  }
}
// The persistent grid's units (above)
inline int64_t persistent_units(const AttentionParams& p, int block_m) {
  return (ceil_div(p.seq_q, block_m) + 1) / 2 * static_cast<int64_t>(p.batch) * p.heads_q;
}

template <typename T, int D, class Attention, bool kPersistent>
PK_DEVICE void forward_blocks(const AttentionParams& p, const ForwardMaps<Attention::kTmaFeed>& maps) {
  static_assert(!kPersistent || Attention::kTmaFeed, "the persistent grid overlaps works through the TMA producer");
  using Work = ForwardWork<T, Attention::kBlockM, Attention::kBlockN>;
  auto for_each_work = [&](auto visit) {
    if constexpr (kPersistent) {
      for_each_persistent_work<Work>(p, Attention::kBlockM, visit);
    } else {
      visit(Work(p, static_cast<int>(block_index_x()), static_cast<int>(block_index_y())));
    }
  };

  if constexpr (Attention::kTmaFeed) {  // the producer warpgroup copies every work's Q and tiles by TMA, then leaves
    Attention::init_barriers(shared_memory());
    if (Attention::is_producer()) {
      if (thread_index() == 0) {  // the maps the block copies through (the host left unused ones unencoded)
        prefetch_tensor_map(maps.q);
        if (p.prefix_len > 0) prefetch_tensor_map(maps.prefix_k), prefetch_tensor_map(maps.prefix_v);
        if (p.seq_k > 0) prefetch_tensor_map(maps.k), prefetch_tensor_map(maps.v);
      }
      Attention::produce(shared_memory(), [&](auto copy_work) {
        for_each_work([&](const Work& work) {
          copy_work(
              work.num_tiles(),
              [&](T* dst, uint64_t* bar) { tma_load_tile<T, D, Attention::kBlockM>(dst, maps.q, bar, work.m0,
                                                                                    work.hq, work.b); },
              [&](int t, T* keys, uint64_t* bar) {
                if (t < work.prefix_tiles)
                  tma_load_tile<T, D, Attention::kBlockN>(keys, maps.prefix_k, bar, t * Attention::kBlockN, work.h,
                                                         work.n);
                else
                  tma_load_tile<T, D, Attention::kBlockN>(keys, maps.k, bar,
                                                         (t - work.prefix_tiles) * Attention::kBlockN, work.h, work.b);
              },
              [&](int t, T* values, uint64_t* bar) {
                if (t < work.prefix_tiles)
                  tma_load_tile<T, D, Attention::kBlockN>(values, maps.prefix_v, bar, t * Attention::kBlockN,
                                                         work.h, work.n);
                else
                  tma_load_tile<T, D, Attention::kBlockN>(values, maps.v, bar,
                                                         (t - work.prefix_tiles) * Attention::kBlockN, work.h,
                                                         work.b);
              });
        });
      });
      return;
    }
    Attention::begin_consuming();
    typename Attention::PipelinePosition position;
    for_each_work([&](const Work& work) {
      attend_work<T, D, Attention>(p, work, position);
      position.works += 1;
      position.tiles += work.num_tiles();
    });
  } else {
    for_each_work([&](const Work& work) { attend_work<T, D, Attention>(p, work); });
  }
}

template <typename T, int D, class Attention, int kMinBlocks>
PK_KERNEL(Attention::kBlockThreads, kMinBlocks)
forward_kernel(const AttentionParams p, const PK_GRID_CONSTANT ForwardMaps<Attention::kTmaFeed> maps) {
  forward_blocks<T, D, Attention, false>(p, maps);
}

// A kernel of its own name, so that profiles and the ptxas budgets (tests/test_cuda_ptxas.py) tell it apart
template <typename T, int D, class Attention>
PK_KERNEL(Attention::kBlockThreads, 1)
forward_persistent_kernel(const AttentionParams p, const PK_GRID_CONSTANT ForwardMaps<Attention::kTmaFeed> maps) {
  forward_blocks<T, D, Attention, true>(p, maps);
}

// The TMA feed's maps: each [outer, heads, rows, D] tensor (any strides, D contiguous) as 4-d boxes of 64 columns x
// `box_rows` rows; rows past the tensor read as zeros (Q past seq_q, keys past L or P). Keys in [prefix_lens[n], P)
// are copied and masked, as the reference masks them. ops.cpp already refused what TMA cannot read (an address or a
// stride not a multiple of 16 bytes); a refusal here (the driver's: a driver without the encoder, a stride it does
// not take, such as 0 for a broadcast dim) names the tensor. Its own type lets the default fall back (launch_forward).
struct TmaMapError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <int D>
void encode_forward_map(TensorMap& map, const char* name, const void* base, const int64_t (&stride)[3], int outer,
                        int heads, int rows, uint32_t box_rows, bool bf16) {
  const uint64_t dims[4] = {uint64_t(D), uint64_t(rows), uint64_t(heads), uint64_t(outer)};
  uint64_t strides[3] = {uint64_t(stride[2]) * 2, uint64_t(stride[1]) * 2, uint64_t(stride[0]) * 2};
  uint64_t extent = 2 * D;  // a dim of size 1 is never stepped over: any multiple of 16 will do for its stride
  for (int d = 0; d < 3; ++d) {
    if (dims[d + 1] == 1) strides[d] = (extent + 15) / 16 * 16;
    extent = strides[d] * dims[d + 1] > extent ? strides[d] * dims[d + 1] : extent;
  }
  const uint32_t box[4] = {64, box_rows, 1, 1};
  const std::string why = encode_tensor_map_4d(map, base, dims, strides, box, bf16);
  if (!why.empty())
    throw TmaMapError(std::string("the TMA-fed forward: ") + name + " cannot be copied by TMA: " + why +
                      " (PK_CUDA_FORWARD=wgmma takes the cp.async feed)");
}

template <int D, class Attention>
ForwardMaps<true> forward_maps(const AttentionParams& p) {
  ForwardMaps<true> maps{};
  encode_forward_map<D>(maps.q, "q", p.q, p.q_stride, p.batch, p.heads_q, p.seq_q, Attention::kBlockM, p.is_bf16);
  if (p.seq_k > 0) {  // else no own tile is copied
    encode_forward_map<D>(maps.k, "k", p.k, p.k_stride, p.batch, p.heads_kv, p.seq_k, Attention::kBlockN, p.is_bf16);
    encode_forward_map<D>(maps.v, "v", p.v, p.v_stride, p.batch, p.heads_kv, p.seq_k, Attention::kBlockN, p.is_bf16);
  }
  if (p.prefix_len > 0) {  // else no prefix tile is copied
    encode_forward_map<D>(maps.prefix_k, "prefix_k", p.prefix_k, p.pk_stride, p.num_prefixes, p.heads_kv,
                          p.prefix_len, Attention::kBlockN, p.is_bf16);
    encode_forward_map<D>(maps.prefix_v, "prefix_v", p.prefix_v, p.pv_stride, p.num_prefixes, p.heads_kv,
                          p.prefix_len, Attention::kBlockN, p.is_bf16);
  }
  return maps;
}

// The kernel's shared-memory opt-in is a process-wide setting per device: made once per device, as the decode's.
// The persistent grid: one block per SM (the TMA feed's 224 KB), fewer where there are fewer units.
template <typename T, int D, class Attention, int kMinBlocks, bool kPersistent = false>
void launch_forward_with(const AttentionParams& params, Stream stream) {
  static_assert(!kPersistent || kMinBlocks == 1, "the persistent kernel's launch bounds are for one block per SM");
  constexpr size_t kShared = Attention::kSharedBytes;
  ForwardMaps<Attention::kTmaFeed> maps{};
  if constexpr (Attention::kTmaFeed) maps = forward_maps<D, Attention>(params);
  const auto kernel = [] {  // (the persistent kernel exists for the TMA feed only: chosen at compile time)
    if constexpr (kPersistent)
      return &forward_persistent_kernel<T, D, Attention>;
    else
      return &forward_kernel<T, D, Attention, kMinBlocks>;
  }();
  static std::atomic<int> opted_in[kCachedDevices];
  once_per_device(opted_in, current_device(), [kernel] {
    allow_shared_bytes(kernel, kShared);
    return 1;
  });
  const int sms = std::max(params.sms, 1);  // (0: a caller that left it unset)
  const Dim3 grid = kPersistent ? Dim3{static_cast<unsigned>(std::min<int64_t>(
                                           persistent_units(params, Attention::kBlockM), sms)), 1, 1}
                                : Dim3{static_cast<unsigned>(ceil_div(params.seq_q, Attention::kBlockM)),
                                       static_cast<unsigned>(params.batch * params.heads_q), 1};
  PK_LAUNCH(kernel, grid, Attention::kBlockThreads, kShared, stream, params, maps);
}

}  // namespace

#ifdef PK_EMULATE
std::string hopper_unavailable_reason(Stream) { return ""; }  // the emulator runs wgmma on any machine
#else
namespace {
// 1 in the device code built for sm_90a, 0 in every other target's (sm_90 without the "a" has no wgmma): read
// from the code loaded for the current device.
#ifdef PK_WGMMA_NATIVE
__device__ int pk_wgmma_in_binary = 1;
#else
__device__ int pk_wgmma_in_binary = 0;
#endif
}  // namespace

// Empty when the current device can run the wgmma kernels (forward and decode), else why not. The loaded code is
// asked once per device (once_per_device) by a synchronous copy: not while `stream` is being captured into a CUDA
// graph (the reason then says so, and the next call asks again), and in the relaxed capture mode, so that a
// capture another thread runs in the global mode is not invalidated by it (PyTorch's streams do not block on the
// legacy stream the copy uses).
std::string hopper_unavailable_reason(Stream stream) {
  const int device = current_device();
  int major = 0, minor = 0;
  cudaError_t error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return std::string("the device's compute capability could not be read: ") + cudaGetErrorString(error);
  }
  if (major != 9) return "wgmma needs an sm_90 GPU, this one is sm_" + std::to_string(10 * major + minor);
  static std::atomic<int> in_binary_cache[kCachedDevices];  // 1: in the binary, 2: not
  std::string why;
  const int state = once_per_device(in_binary_cache, device, [&] {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
      cudaGetLastError();  // (a status that could not be read counts as a capture)
      why = "the first wgmma kernel on a device checks its code with a synchronous copy, which a CUDA-graph "
            "capture forbids: run one call outside the capture first";
      return 0;  // not asked: asked again next time
    }
    int in_binary = 0;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    const cudaError_t copy = cudaMemcpyFromSymbol(&in_binary, pk_wgmma_in_binary, sizeof(int));
    cudaThreadExchangeStreamCaptureMode(&mode);  // the thread's own mode back
    if (copy != cudaSuccess) {
      cudaGetLastError();  // a non-sticky error must not be blamed on the launch that follows
      why = std::string("the extension's device code for this GPU could not be read: ") + cudaGetErrorString(copy);
      return 0;
    }
    return in_binary ? 1 : 2;
  });
  if (state == 0) return why;
  if (state != 1)
    return "the extension holds no sm_90a code (sm_90 code has no wgmma): rebuild it with 9.0a in "
           "PREFIX_KERNELS_CUDA_ARCHS";
  return "";
}
#endif

namespace {

enum class ForwardLoop { mma, wgmma, wgmma_tma, wgmma_tma_persistent };

// A dim of more than one element with stride 0 (a broadcast view, which ops.cpp's operand checks accept): the
// driver may refuse such a TMA map, so the default takes the cp.async feed for it up front rather than through
// launch_forward's fallback on every call.
#ifndef PK_EMULATE
bool has_broadcast_dim(const AttentionParams& p) {
  const int q_sizes[3] = {p.batch, p.heads_q, p.seq_q}, k_sizes[3] = {p.batch, p.heads_kv, p.seq_k},
            prefix_sizes[3] = {p.num_prefixes, p.heads_kv, p.prefix_len};
  for (int d = 0; d < 3; ++d)
    if ((q_sizes[d] > 1 && p.q_stride[d] == 0) || (k_sizes[d] > 1 && (p.k_stride[d] == 0 || p.v_stride[d] == 0)) ||
        (prefix_sizes[d] > 1 && (p.pk_stride[d] == 0 || p.pv_stride[d] == 0)))
      return true;
  return false;
}
#endif

// Unset, the loop is a wgmma one where the device runs it, mma.sync elsewhere (sm_80, a build without 9.0a code) and
// in the emulator, whose tests name each loop. Of the two Hopper feeds, D = 128 takes TMA's: 1.15x cp.async's on the
// H200 at both ANCHORS training shapes since its separate K and V pipelines (395 / 382 against 345 / 333 TFLOP/s,
// one process, bench/results/nvidia-h200/tune_cuda.json at dd6375c); D = 64 keeps cp.async's (the TMA feed there
// is untimed). ops.cpp's operand checks are TMA's too (16-byte aligned bases and strides). A first call on a device
// made inside a CUDA-graph capture cannot ask the loaded code (above): that graph keeps mma.sync, as does every call
// until one outside a capture has asked; all loops compute the same function.
ForwardLoop default_forward_loop(const AttentionParams& params, Stream stream) {
#ifdef PK_EMULATE
  (void)params;
  (void)stream;
  return ForwardLoop::mma;
#else
  if (!hopper_unavailable_reason(stream).empty()) return ForwardLoop::mma;
  return params.head_dim == 128 && !has_broadcast_dim(params) ? ForwardLoop::wgmma_tma : ForwardLoop::wgmma;
#endif
}

// $PK_CUDA_FORWARD (read at each call) names the loop: "mma", "wgmma" (the Hopper loop fed by cp.async),
// "wgmma-tma" (fed by a TMA producer warpgroup) or "wgmma-tma-persistent" (that loop on a grid of one block per SM,
// each working through several query blocks; untimed, so not a default yet); the Hopper loops need an sm_90 device
// and a kernel built for 9.0a (an error otherwise, never a silent fallback).
ForwardLoop forward_loop(const char* choice, const AttentionParams& params, Stream stream) {
  if (!choice || !*choice) return default_forward_loop(params, stream);
  if (std::strcmp(choice, "mma") == 0) return ForwardLoop::mma;
  ForwardLoop loop;
  if (std::strcmp(choice, "wgmma") == 0)
    loop = ForwardLoop::wgmma;
  else if (std::strcmp(choice, "wgmma-tma") == 0)
    loop = ForwardLoop::wgmma_tma;
  else if (std::strcmp(choice, "wgmma-tma-persistent") == 0)
    loop = ForwardLoop::wgmma_tma_persistent;
  else
    throw std::invalid_argument(std::string("PK_CUDA_FORWARD=") + choice +
                                " is not one of mma, wgmma, wgmma-tma, wgmma-tma-persistent");
  const std::string why = hopper_unavailable_reason(stream);
  if (!why.empty()) throw std::runtime_error(std::string("PK_CUDA_FORWARD=") + choice + ": " + why);
  return loop;
}

}  // namespace

void launch_forward(const AttentionParams& params, Stream stream) {
  const char* choice = std::getenv("PK_CUDA_FORWARD");
  ForwardLoop loop = forward_loop(choice, params, stream);
  PK_DISPATCH(params, {
    using TmaAttention = HopperForwardAttention<Element, kHeadDim, true>;
    if (loop == ForwardLoop::wgmma_tma_persistent) {  // (named only: a refused map is the error)
      launch_forward_with<Element, kHeadDim, TmaAttention, 1, true>(params, stream);
      return;
    }
    if (loop == ForwardLoop::wgmma_tma) {
      try {
        launch_forward_with<Element, kHeadDim, TmaAttention, 1>(params, stream);
        return;
      } catch (const TmaMapError&) {
        if (choice && *choice) throw;  // named: the error; the default takes the cp.async feed (the same function)
      }
      loop = ForwardLoop::wgmma;
    }
    if (loop == ForwardLoop::wgmma)
      launch_forward_with<Element, kHeadDim, HopperForwardAttention<Element, kHeadDim, false>,
                          hopper_min_blocks<HopperForwardAttention<Element, kHeadDim, false>>()>(params, stream);
    else
      launch_forward_with<Element, kHeadDim, ForwardAttention<Element, kHeadDim>, PK_FORWARD_MIN_BLOCKS>(params,
                                                                                                         stream);
  });
}

}  // namespace pk
