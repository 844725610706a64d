// Shared-prefix decode (a few queries per sequence, no gradient), the Hydragen / FlashInfer-cascade scheme:
//  1. partials: prefix programs take 64 packed rows (b, g, s) of MANY sequences and of all G heads of a KV head
//     against one split of one prefix's keys: a prefix tile is read once per 64 rows instead of once per
//     sequence. Own programs take the G * S rows of one (sequence, KV head) against one split of its own keys.
//     Both kinds share one launch (prefix programs first); each writes a normalized partial + LSE to its slot.
//     With PK_CUDA_DECODE=wgmma (sm_90a) the prefix programs take 128 rows on the Hopper loop (attend_sm90.h) in a
//     launch of their own before the own programs': with many packed rows (B * G in the hundreds) the prefix part
//     is bound by the tensor cores, where mma.sync reaches about a third of what wgmma can.
//  2. merge: every row's slots combined by their LSEs into out (q's dtype) and lse.
// Sized from shapes only (no host sync): CUDA-graph safe.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "attend.h"
#include "attend_sm90.h"
#include "dispatch.h"
#include "launch.h"

namespace pk {

namespace {

constexpr int kProgramsPerSm = 2;    // enough programs to fill the GPU twice over
constexpr int kMinSplitTiles = 2;    // no split shorter than this many tiles: each split costs an fp32 partial
constexpr int kMaxSplits = 32;
constexpr int kMergeRowsPerBlock = 4;  // one warp per row
// Prefix programs (and own programs of more than 16 rows): 64 rows per block; own programs of at most 16 rows:
// 16-row blocks (OwnKeysAttention below). 64-key tiles.
// A ring of PK_DECODE_STAGES (K, V) tile pairs (BlockAttention's kStages): the own keys and a long prefix at few
// rows are memory-bound streams, and with one K and one V tile per block (1 stage) an SM of two blocks had at
// most ~64 KB in flight (the H200 ran this decode at 51-53% of the copy floor where the Triton decode, 3 stages,
// reached 72-82%). 3 stages: 112 KB of shared memory at head dim 128, two blocks per SM on sm_90 (226 of 228 KiB);
// where two such blocks do not fit an SM the launcher takes 2 stages (sm_80) or 1 (sm_86/89): launch_decode. On
// the H200 (8816e5e) the 3-stage decode took what the 1-stage one had at B=64 P=4096 (0.150 ms; bench/NOTES.md);
// a --tune-cuda variant with decode_stages 1 compares the two in one run.
#ifndef PK_DECODE_STAGES
#define PK_DECODE_STAGES 3
#endif
template <typename T, int D, int kStages>
using DecodeAttention = BlockAttention<T, D, 1, 64, kStages>;
// The own programs of a sequence with G * S <= 16 rows (every one-query decode with G <= 16): 16-row blocks whose 4
// warps split each tile's keys (BlockAttention's kKeysAcrossWarps). In 64-row blocks only the first warp would have
// rows, and would run each tile's whole chain alone (~890 instructions in the SASS) while the other three only
// load. $PK_CUDA_DECODE_OWN chooses (decode_own_layout).
template <typename T, int D, int kStages>
using OwnKeysAttention = BlockAttention<T, D, 1, 64, kStages, true>;
constexpr int kKeysAcrossWarpsMaxRows = OwnKeysAttention<__half, 64, 1>::kBlockM;
// The partials kernel's dynamic shared memory: its programs' largest.
template <typename T, int D, int kStages>
constexpr size_t partials_shared_bytes() {
  return std::max(DecodeAttention<T, D, kStages>::kSharedBytes, OwnKeysAttention<T, D, kStages>::kSharedBytes);
}
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
// The wgmma prefix programs: the shipped Hopper forward's loop (FA3's overlap over a ring of 3 tile pairs, fed by
// cp.async: the packed rows are gathered, which a TMA box cannot do).
constexpr int kHopperBlockM = 128;  // two warpgroups of 64 rows
constexpr int kHopperBlockN = 128;
template <typename T, int D>
using HopperPrefixAttention = HopperAttention<T, D, kHopperBlockN, 3, true, false, false>;

template <int D, class Attention>
PK_DEVICE void store_partial(const DecodeParams& d, Attention& attention, int slot,
                             const int64_t (&row)[Attention::kRows]) {
  float inv[Attention::kRows], lse[Attention::kRows];
  attention.finish(inv, lse);
  const int64_t base = static_cast<int64_t>(slot) * d.rows;
  attention.for_each_output(inv, [&](int h, int col, float x0, float x1) {
    if (row[h] >= 0) {
      float* out = d.work_out + (base + row[h]) * D + col;
      out[0] = x0;
      out[1] = x1;
    }
  });
  if (attention.writes_lse()) {
    PK_UNROLL
    for (int h = 0; h < Attention::kRows; ++h)
      if (row[h] >= 0) d.work_lse[base + row[h]] = lse[h];
  }
}

// `Attention` is DecodeAttention (mma.sync, 64 rows, 64-key tiles) or HopperPrefixAttention (wgmma, 128 and 128).
template <typename T, int D, class Attention>
PK_DEVICE void prefix_program(const DecodeParams& d, int pid) {
  constexpr int kRowsPerBlock = Attention::kBlockM, kKeysPerTile = Attention::kBlockN;
  const AttentionParams& p = d.attention;
  const int nh_count = p.num_prefixes * p.heads_kv;
  const int row_block = pid % d.prefix_row_blocks;
  const int nh = (pid / d.prefix_row_blocks) % nh_count;
  const int split = pid / (d.prefix_row_blocks * nh_count);
  const int n = nh / p.heads_kv, h = nh % p.heads_kv;
  const int packed_rows = p.batch * p.group * p.seq_q;

  // Packed row r = (b * G + g) * S + s; it belongs here if sequence b uses prefix n. With several prefixes a
  // block may hold none of them: it then loads nothing (the test is the same in every thread).
  auto sequence_of = [&](int r) { return r / (p.group * p.seq_q); };
  auto mine = [&](int r) {
    return r < packed_rows &&
           (!p.prefix_index || load_index(p.prefix_index, p.prefix_index_int32, sequence_of(r)) == n);
  };
  const int r0 = row_block * kRowsPerBlock;
  bool any_mine = false;
  for (int r = r0; r < r0 + kRowsPerBlock && !any_mine; ++r) any_mine = mine(r);

  const int prefix_len = p.prefix_lens ? static_cast<int>(load_index(p.prefix_lens, p.prefix_lens_int32, n))
                                       : p.prefix_len;
  const int begin = split * d.prefix_chunk;
  const int end = any_mine ? imin(begin + d.prefix_chunk, prefix_len) : begin;
  const int num_tiles = end > begin ? (end - begin + kKeysPerTile - 1) / kKeysPerTile : 0;
  const T* pk = static_cast<const T*>(p.prefix_k) + n * p.pk_stride[0] + h * p.pk_stride[1];
  const T* pv = static_cast<const T*>(p.prefix_v) + n * p.pv_stride[0] + h * p.pv_stride[1];
  auto tile = [&](int t) {
    const int key0 = begin + t * kKeysPerTile;
    return KeyTile<T>{pk, pv, p.pk_stride[2], p.pv_stride[2], key0, end, false, key0 + kKeysPerTile > end};
  };
  auto visible = [](const KeyTile<T>& t, int, int key) { return key < t.end; };

  const T* q = static_cast<const T*>(p.q);
  auto q_row = [&](int i) -> const T* {
    const int r = r0 + i;
    if (!mine(r)) return nullptr;
    const int b = sequence_of(r), g = (r / p.seq_q) % p.group, s = r % p.seq_q;
    return q + b * p.q_stride[0] + (h * p.group + g) * p.q_stride[1] + s * p.q_stride[2];
  };

  Attention attention(shared_memory());
  attention.load_q_async(q_row, q);
  attention.run(num_tiles, tile, p.scale_log2, visible, packed_rows - r0);
  int64_t row[Attention::kRows];
  PK_UNROLL
  for (int hh = 0; hh < Attention::kRows; ++hh) {
    const int r = r0 + attention.row_of(hh);
    const int b = sequence_of(r), g = (r / p.seq_q) % p.group, s = r % p.seq_q;
    row[hh] = mine(r) ? (static_cast<int64_t>(b) * p.heads_q + h * p.group + g) * p.seq_q + s : -1;
  }
  store_partial<D>(d, attention, split, row);
}

// `Attention` is DecodeAttention (64 rows, split across the warps) or OwnKeysAttention (16 rows, the keys split).
template <typename T, int D, class Attention>
PK_DEVICE void own_program(const DecodeParams& d, int pid) {
  constexpr int kRowsPerBlock = Attention::kBlockM, kRows = Attention::kRows;
  const AttentionParams& p = d.attention;
  const int bh_count = p.batch * p.heads_kv;
  const int row_block = pid % d.own_row_blocks;
  const int bh = (pid / d.own_row_blocks) % bh_count;
  const int split = pid / (d.own_row_blocks * bh_count);
  const int b = bh / p.heads_kv, h = bh % p.heads_kv;
  const int group_rows = p.group * p.seq_q;  // row r = g * S + s of this sequence's KV-head group
  const int r0 = row_block * kRowsPerBlock;
  const int offset = p.seq_k - p.seq_q;

  const int begin = split * d.own_chunk;
  const int end = imin(begin + d.own_chunk, p.seq_k);
  const int num_tiles = end > begin ? (end - begin + kBlockN - 1) / kBlockN : 0;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const uint8_t* key_ok = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride[0] : nullptr;
  // A tile every row sees whole skips the masking: full, no padding mask, and (causal) no key past the first
  // query's position `offset` (every row's position is offset + s >= offset). With one query per sequence that is
  // every tile but the last; the masked path costs ~5 instructions a score (~170 a warp's tile in the keys layout).
  auto tile = [&](int t) {
    const int key0 = begin + t * kBlockN;
    const bool needs_mask = key0 + kBlockN > end || key_ok != nullptr || (p.causal && key0 + kBlockN - 1 > offset);
    return KeyTile<T>{k, v, p.k_stride[2], p.v_stride[2], key0, end, true, needs_mask};
  };

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.group * p.q_stride[1];
  auto q_row = [&](int i) -> const T* {
    const int r = r0 + i;
    if (r >= group_rows) return nullptr;
    return q + (r / p.seq_q) * p.q_stride[1] + (r % p.seq_q) * p.q_stride[2];
  };

  Attention attention(shared_memory());
  int row_pos[kRows];
  PK_UNROLL
  for (int hh = 0; hh < kRows; ++hh) row_pos[hh] = offset + (r0 + attention.row_of(hh)) % p.seq_q;
  auto visible = [&](const KeyTile<T>& t, int hh, int key) {
    if (key >= t.end) return false;
    const bool kept = !key_ok || key_ok[key * p.mask_stride[1]] != 0;  // first: one load a key, not a (row, key)
    return kept && (!p.causal || key <= row_pos[hh]);
  };
  attention.load_q_async(q_row, q);
  attention.run(num_tiles, tile, p.scale_log2, visible, group_rows - r0);
  int64_t row[kRows];
  PK_UNROLL
  for (int hh = 0; hh < kRows; ++hh) {
    const int r = r0 + attention.row_of(hh);
    row[hh] = r < group_rows ? (static_cast<int64_t>(b) * p.heads_q + h * p.group) * p.seq_q + r : -1;
  }
  store_partial<D>(d, attention, d.prefix_splits + split, row);
}

// The prefix programs first, then the own programs; only the own programs when the prefix programs have a wgmma
// launch of their own.
template <typename T, int D, int kStages>
PK_KERNEL(kThreads) decode_partials_kernel(const DecodeParams d) {
  const int pid = static_cast<int>(block_index_x());
  const int prefix_here =
      d.prefix_wgmma ? 0 : d.prefix_row_blocks * d.attention.num_prefixes * d.attention.heads_kv * d.prefix_splits;
  if (pid < prefix_here)
    prefix_program<T, D, DecodeAttention<T, D, kStages>>(d, pid);
  else if (d.own_keys_across_warps)
    own_program<T, D, OwnKeysAttention<T, D, kStages>>(d, pid - prefix_here);
  else
    own_program<T, D, DecodeAttention<T, D, kStages>>(d, pid - prefix_here);
}

template <typename T, int D>
PK_KERNEL(HopperPrefixAttention<T, D>::kBlockThreads) decode_prefix_wgmma_kernel(const DecodeParams d) {
  static_assert(HopperPrefixAttention<T, D>::kBlockM == kHopperBlockM, "plan_decode's row blocks");
  prefix_program<T, D, HopperPrefixAttention<T, D>>(d, static_cast<int>(block_index_x()));
}

// One warp per row (b, hq, s): out = sum_slot e^(lse_slot - m) o_slot / sum_slot e^(lse_slot - m), m = max lse;
// a row whose every slot is -inf gets zeros and -inf.
template <typename T, int D>
PK_KERNEL(32 * kMergeRowsPerBlock) decode_merge_kernel(const DecodeParams d) {
  constexpr int kColumns = D / 32;  // per lane
  const int lane = static_cast<int>(thread_index()) % 32;
  const int64_t row = static_cast<int64_t>(block_index_x()) * kMergeRowsPerBlock + thread_index() / 32;
  if (row >= d.rows) return;
  const int slots = d.prefix_splits + d.own_splits;
  float m = -INFINITY;
  for (int slot = 0; slot < slots; ++slot) m = fmaxf(m, d.work_lse[slot * static_cast<int64_t>(d.rows) + row]);
  const float m_use = m == -INFINITY ? 0.f : m;
  float acc[kColumns] = {};
  float total = 0.f;
  for (int slot = 0; slot < slots; ++slot) {
    const int64_t at = slot * static_cast<int64_t>(d.rows) + row;
    const float weight = fast_exp2((d.work_lse[at] - m_use) * 1.4426950408889634f);
    total += weight;
    const float* part = d.work_out + at * D + lane * kColumns;
    PK_UNROLL
    for (int c = 0; c < kColumns; ++c) acc[c] += weight * part[c];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(d.attention.out) + row * D + lane * kColumns;
  PK_UNROLL
  for (int c = 0; c < kColumns; c += 2)
    *reinterpret_cast<uint32_t*>(out + c) = pack2<T>(acc[c] * inv, acc[c + 1] * inv);
  if (lane == 0) d.attention.lse[row] = total > 0.f ? m_use + fast_log2(total) * kLn2 : -INFINITY;
}

// `keys` keys in about `wanted` splits of whole `tile`-key tiles: (splits, chunk).
void split_evenly(int keys, int64_t wanted, int tile, int& splits, int& chunk) {
  if (keys <= 0) {
    splits = 0;
    chunk = tile;
    return;
  }
  wanted = std::max<int64_t>(1, std::min<int64_t>(wanted, kMaxSplits));
  chunk = ceil_div(ceil_div(keys, static_cast<int>(wanted)), tile) * tile;
  splits = ceil_div(keys, chunk);
}

// (splits, chunk) of `keys` keys when every program should read about `per_program` keys.
void split_keys(int keys, int64_t per_program, int tile, int& splits, int& chunk) {
  split_evenly(keys, (keys + per_program - 1) / per_program, tile, splits, chunk);
}

}  // namespace

DecodePlan plan_decode(const AttentionParams& p, int sms, DecodePrefixLoop loop, DecodeOwnLayout own) {
  DecodePlan plan{};
  const int packed_rows = p.batch * p.group * p.seq_q;
  plan.own_keys_across_warps = own == DecodeOwnLayout::keys ||
                               (own == DecodeOwnLayout::automatic && p.group * p.seq_q <= kKeysAcrossWarpsMaxRows);
  plan.own_row_blocks = ceil_div(p.group * p.seq_q, plan.own_keys_across_warps ? kKeysAcrossWarpsMaxRows : kBlockM);
  const int64_t own_programs = static_cast<int64_t>(plan.own_row_blocks) * p.batch * p.heads_kv;
  if (loop == DecodePrefixLoop::wgmma) {
    // Two launches, each balanced on its own. The prefix programs: as many splits as fill one wave of the SMs
    // (one block per SM: 224 KB of shared memory at head dim 128, 168 x 256 = 43K registers at 64), no split under
    // kMinSplitTiles tiles.
    plan.prefix_wgmma = true;
    plan.prefix_row_blocks = ceil_div(packed_rows, kHopperBlockM);
    const int64_t prefix_programs =
        std::max<int64_t>(1, static_cast<int64_t>(plan.prefix_row_blocks) * p.num_prefixes * p.heads_kv);
    const int64_t most = std::max(1, p.prefix_len / (kHopperBlockN * kMinSplitTiles));
    split_evenly(p.prefix_len, std::min(sms / prefix_programs, most), kHopperBlockN, plan.prefix_splits,
                 plan.prefix_chunk);
    const int64_t per_own = std::max<int64_t>(
        kBlockN * kMinSplitTiles, (own_programs * p.seq_k + kProgramsPerSm * sms - 1) / (kProgramsPerSm * sms));
    split_keys(p.seq_k, per_own, kBlockN, plan.own_splits, plan.own_chunk);
    return plan;
  }
  plan.prefix_row_blocks = ceil_div(packed_rows, kBlockM);
  // Prefix and own programs share one launch: balance the keys each program reads (see the Triton decode).
  const int64_t prefix_programs = static_cast<int64_t>(plan.prefix_row_blocks) * p.num_prefixes * p.heads_kv;
  const int64_t total = prefix_programs * p.prefix_len + own_programs * p.seq_k;
  const int64_t per_program =
      std::max<int64_t>(kBlockN * kMinSplitTiles, (total + kProgramsPerSm * sms - 1) / (kProgramsPerSm * sms));
  split_keys(p.prefix_len, per_program, kBlockN, plan.prefix_splits, plan.prefix_chunk);
  split_keys(p.seq_k, per_program, kBlockN, plan.own_splits, plan.own_chunk);
  return plan;
}

// $PK_CUDA_DECODE (read at each call): "mma" (the default) or "wgmma", which needs an sm_90 device and a kernel built
// for 9.0a (an error otherwise, never a silent fallback). The default stays mma.sync: on the H200 the wgmma prefix
// part was 5-17% faster at 128 packed rows or more and 9% slower at 64, Triton's decode faster than both, and its
// extra launch would cost the small eager calls "auto" sends here (bench/NOTES.md, tenth session).
DecodePrefixLoop decode_prefix_loop(Stream stream) {
  const char* choice = std::getenv("PK_CUDA_DECODE");
  if (!choice || !*choice || std::strcmp(choice, "mma") == 0) return DecodePrefixLoop::mma;
  if (std::strcmp(choice, "wgmma") != 0)
    throw std::invalid_argument(std::string("PK_CUDA_DECODE=") + choice + " is not one of mma, wgmma");
  // (it asks forward.cu's code whether the build holds sm_90a: setup.py builds every source for the same archs)
  const std::string why = hopper_unavailable_reason(stream);
  if (!why.empty()) throw std::runtime_error("PK_CUDA_DECODE=wgmma: " + why);
  return DecodePrefixLoop::wgmma;
}

// $PK_CUDA_DECODE_OWN (read at each call): the own programs' layout, "auto" (the default: the keys split across the
// warps where a sequence has at most 16 rows, else 64-row blocks), "rows" (64-row blocks always: the layout before
// the split, which bench/tune_cuda.py times next to the default) or "keys" (16-row blocks always).
DecodeOwnLayout decode_own_layout() {
  const char* choice = std::getenv("PK_CUDA_DECODE_OWN");
  if (!choice || !*choice || std::strcmp(choice, "auto") == 0) return DecodeOwnLayout::automatic;
  if (std::strcmp(choice, "rows") == 0) return DecodeOwnLayout::rows;
  if (std::strcmp(choice, "keys") == 0) return DecodeOwnLayout::keys;
  throw std::invalid_argument(std::string("PK_CUDA_DECODE_OWN=") + choice + " is not one of auto, rows, keys");
}

namespace {

// Whether a block using `bytes` of shared memory still shares an SM with a second one (plan_decode sizes the
// launch for two programs per SM) within the card's per-block opt-in: 3 stages on sm_90 (112 KB of 228 KiB), 2 on
// sm_80 (80 KB of 164 KiB; 3 would leave one block per SM), 1 on sm_86/89 (48 KB of 100 KiB).
bool two_blocks_fit(size_t bytes, const SharedMemoryLimits& limits) {
  constexpr size_t kReservedPerBlock = 1024;  // the driver's share of every block's shared memory
  return bytes <= limits.per_block_optin && 2 * (bytes + kReservedPerBlock) <= limits.per_sm;
}

// The partials kernel with a ring of kStages tile pairs, after the shared-memory opt-in it needs (a process-wide
// setting of the kernel on each device: made once per device, not on every call of the host-bound small decodes).
template <typename T, int D, int kStages>
void launch_partials(const DecodeParams& d, int programs, Stream stream) {
  constexpr size_t kShared = partials_shared_bytes<T, D, kStages>();
  static std::atomic<int> opted_in[kCachedDevices];
  once_per_device(opted_in, current_device(), [] {
    allow_shared_bytes(decode_partials_kernel<T, D, kStages>, kShared);
    return 1;
  });
  PK_LAUNCH((decode_partials_kernel<T, D, kStages>), (Dim3{static_cast<unsigned>(programs), 1, 1}), kThreads,
            kShared, stream, d);
}

// The wgmma prefix programs (after the same once-per-device opt-in).
template <typename T, int D>
void launch_prefix_wgmma(const DecodeParams& d, int programs, Stream stream) {
  using Attention = HopperPrefixAttention<T, D>;
  static std::atomic<int> opted_in[kCachedDevices];
  once_per_device(opted_in, current_device(), [] {
    allow_shared_bytes(decode_prefix_wgmma_kernel<T, D>, Attention::kSharedBytes);
    return 1;
  });
  PK_LAUNCH((decode_prefix_wgmma_kernel<T, D>), (Dim3{static_cast<unsigned>(programs), 1, 1}),
            Attention::kBlockThreads, Attention::kSharedBytes, stream, d);
}

}  // namespace

void launch_decode(const DecodeParams& d, Stream stream) {
  const AttentionParams& p = d.attention;
  const int prefix_programs = d.prefix_row_blocks * p.num_prefixes * p.heads_kv * d.prefix_splits;
  const int own_programs = d.own_row_blocks * p.batch * p.heads_kv * d.own_splits;
  const int programs = d.prefix_wgmma ? own_programs : prefix_programs + own_programs;  // in the partials kernel
  const Dim3 merge_grid{static_cast<unsigned>(ceil_div(d.rows, kMergeRowsPerBlock)), 1, 1};
  PK_DISPATCH(p, {
    if (d.prefix_wgmma && prefix_programs > 0) launch_prefix_wgmma<Element, kHeadDim>(d, prefix_programs, stream);
    if (programs > 0) {
      // The deepest ring that keeps two blocks per SM; one K and one V tile (<= 48 KB) where none does.
      const SharedMemoryLimits limits = shared_memory_limits();
      if (two_blocks_fit(partials_shared_bytes<Element, kHeadDim, PK_DECODE_STAGES>(), limits))
        launch_partials<Element, kHeadDim, PK_DECODE_STAGES>(d, programs, stream);
      else if (two_blocks_fit(partials_shared_bytes<Element, kHeadDim, 2>(), limits))
        launch_partials<Element, kHeadDim, 2>(d, programs, stream);
      else
        launch_partials<Element, kHeadDim, 1>(d, programs, stream);
    }
    PK_LAUNCH((decode_merge_kernel<Element, kHeadDim>), merge_grid, 32 * kMergeRowsPerBlock, 0, stream, d);
  });
}

}  // namespace pk
