// The block-level attention loop shared by every CUDA kernel: 4 warps, each owning kRowTiles 16-row tiles of
// queries (or, kKeysAcrossWarps, sharing them and splitting each tile's keys: see BlockAttention), against a
// sequence of kKeys-key tiles, FlashAttention-2 style. Scores and P.V on sm_80 tensor cores
// (mma.sync m16n8k16, fp32 accumulate), online softmax in base 2, K and V tiles streamed through shared memory with
// cp.async so that each tile's V load overlaps its QK^T and the next K load overlaps the softmax and P.V.
//
// kRowTiles = 2 (the forward: 128 rows per block) reuses every K/V fragment a warp loads from shared memory for
// two row tiles, halving shared-memory traffic per FLOP; kRowTiles = 1 (the decode: few rows) wastes fewer rows.
//
// kStages = 1 keeps one K and one V tile in shared memory (the schedule above, FlashAttention-2's: at most a tile
// and a half in flight). kStages >= 2 keeps a ring of kStages (K, V) tile pairs and loads tile t + kStages - 1
// while tile t is computed: more bytes in flight per SM, which a memory-bound stream (the decode's own keys, a
// long prefix at few rows) needs to reach the bandwidth, for kStages - 1 more tile pairs of shared memory.
//
// The caller says which rows (a pointer per row: one sequence's consecutive queries for the forward, the packed
// queries of many sequences for the decode's prefix part) and which tiles (prefix keys, then own keys, each with
// its own base pointer): the same loop serves every kernel.
#pragma once

#include <cfloat>

#include "mma.h"
#include "params.h"
#include "wgmma.h"

namespace pk {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLn2 = 0.6931471805599453f;

PK_DEVICE int imin(int a, int b) { return a < b ? a : b; }

// [rows][D] tiles of 16-bit elements in shared memory, 16-byte chunks XOR-swizzled by the row's low 3 bits: the 8
// rows one ldmatrix reads at the same column then sit in 8 different bank groups (no conflicts), and a row stays
// whole.
template <int D>
struct TileLayout {
  static constexpr int kChunks = D / 8;
  static constexpr int kRowPitch = D;  // elements from a row to the next (same swizzle 8 rows on)
  static PK_DEVICE int offset(int row, int chunk) { return row * D + ((chunk ^ (row & 7)) << 3); }
};

// One tile of keys: [key0, key0 + kKeys) of the keys at k/v (clipped to `end`), from the prefix or the own keys.
template <typename T>
struct KeyTile {
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;  // elements per key position
  int key0, end;
  bool own;                    // own keys: causal and key_padding_mask apply; prefix keys are always visible
  bool needs_mask;             // false: every key of the tile is visible to every row (the fast path)
};

// Rows of a tile in `Layout` (TileLayout here, TileLayout128B for wgmma) through cp.async, shared by kThreads
// threads: row r of kRows from row(r), a pointer to its D elements, or nullptr (a row past the end: zeros). `any`
// is a valid address handed to the zero-filling copies (they read nothing from it).
template <typename T, class Layout, int kThreads, int kRows, class Row>
PK_DEVICE void load_rows_async(T* tile, Row row, const T* any, int thread) {
  for (int i = thread; i < kRows * Layout::kChunks; i += kThreads) {
    const int r = i / Layout::kChunks, c = i % Layout::kChunks;
    const T* src = row(r);
    cp_async_16(tile + Layout::offset(r, c), src ? src + c * 8 : any, src != nullptr);
  }
}

// A K or V tile of kRows keys [key0, key0 + kRows) (clipped to `end`: zeros past it) at `base`, `stride` elements
// per key: each thread copies one 16-byte column (thread % kChunks) of the rows thread / kChunks + kRowsPerPass * j.
// The destination advances by a fixed offset (rows a multiple of 8 apart keep their swizzle), the source by a fixed
// stride: with kStepPointer one 64-bit add a pass (~6 instructions a chunk, where the multiply per pass cost ~15 in
// the Hopper loops' SASS); without it a multiply per pass, for the sm_80 loops: they run at 254-255 registers, where
// the stepped pointers, all live at once, spilled 12-40 B. (The generic strided loop cost ~25 a chunk.)
template <typename T, class Layout, int kThreads, int kRows, bool kStepPointer = false>
PK_DEVICE void load_keys_async(T* dst, const T* base, int64_t stride, int key0, int end, int thread) {
  constexpr int kRowsPerPass = kThreads / Layout::kChunks;
  static_assert(kRowsPerPass % 8 == 0 && kRows % kRowsPerPass == 0, "passes must keep each row's swizzle");
  const int row = thread / Layout::kChunks, chunk = thread % Layout::kChunks;
  T* to = dst + Layout::offset(row, chunk);
  const T* from = base + (key0 + row) * stride + chunk * 8;
  PK_UNROLL
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const bool in_range = key0 + row + pass * kRowsPerPass < end;
    cp_async_16(to + pass * kRowsPerPass * Layout::kRowPitch,
                in_range ? (kStepPointer ? from : from + pass * kRowsPerPass * stride) : base, in_range);
    if constexpr (kStepPointer) from += kRowsPerPass * stride;  // (past `end` only as an address: base is read)
  }
}

// The cp.async ring the attention loops stream their (K, V) tiles through: tile t goes to stage t % (ring depth),
// loaded kAhead tiles before the step that reads it. Copy group g holds tile g (group 0 also Q); one group is
// committed per prologue tile and per step, empty past the last tile, so "all but the newest kAhead - 1 groups
// landed" always means "tile t landed". One barrier per step: after it, tile t is visible to every warp (with
// kAsyncProxy, to wgmma too: each thread hands its landed copies to the async proxy first), and every warp is done
// with the tiles the ring refills in this step. load(t) issues tile t's copies.
template <int kAhead, bool kAsyncProxy>
struct TileRing {
  static_assert(kAhead >= 1, "a tile is loaded at least one step ahead");
  template <class Load>
  static PK_DEVICE void prologue(int num_tiles, Load load) {
    PK_UNROLL
    for (int t = 0; t < kAhead; ++t) {
      if (t < num_tiles) load(t);
      cp_async_commit();
    }
  }
  // Each step: wait_for_tile (tile t landed and published), then, before the next step, load_ahead once (the tile
  // kAhead steps on; the wgmma loop issues it after its step's wgmmas).
  static PK_DEVICE void wait_for_tile() {
    cp_async_wait<kAhead - 1>();
    if constexpr (kAsyncProxy) fence_proxy_async();
    sync_threads();
  }
  template <class Load>
  static PK_DEVICE void load_ahead(int t, int num_tiles, Load load) {
    if (t + kAhead < num_tiles) load(t + kAhead);
    cp_async_commit();
  }
};

// The online softmax of one warp's rows, which every attention loop shares (mma.sync on sm_80, wgmma on sm_90a:
// both leave the scores and O in the m16n8 C layout). kRowTiles 16-row tiles per warp; scores s[rt][n][j] of
// kNTiles 8-key tiles hold key 8n + 2 (lane % 4) + (j & 1) of row 2 rt + (j >> 1); O acc[rt][d][j] likewise for
// kDTiles 8-column tiles.
template <typename T, int kRowTiles, int kNTiles, int kDTiles>
struct OnlineSoftmax {
  static constexpr int kRows = 2 * kRowTiles;  // rows this lane holds accumulators for
  int warp, lane;
  // Accumulators of row i = 2 * row_tile + h: rows (lane / 4) and (lane / 4 + 8) of each of the warp's row tiles.
  float acc[kRowTiles][kDTiles][4];
  float row_max[kRows];  // running max of the scaled (base-2) scores
  float row_sum[kRows];  // running sum of exp2, over this lane's columns only (reduced over the quad at the end)

  PK_DEVICE explicit OnlineSoftmax(int thread) : warp(thread / 32), lane(thread % 32) {
    PK_UNROLL
    for (int rt = 0; rt < kRowTiles; ++rt)
      PK_UNROLL
      for (int d = 0; d < kDTiles; ++d)
        PK_UNROLL
        for (int j = 0; j < 4; ++j) acc[rt][d][j] = 0.f;
    PK_UNROLL
    for (int i = 0; i < kRows; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.f;
    }
  }

  // Row of the block of this lane's row i (warps own consecutive 16-row tiles).
  PK_DEVICE int row_of(int i) const { return (warp * kRowTiles + i / 2) * 16 + lane / 4 + 8 * (i % 2); }
  // Whether this lane writes the LSE of its rows (one lane of the quad holding them).
  PK_DEVICE bool writes_lse() const { return lane % 4 == 0; }

  // Keys a row must not see become -inf (the scores stay unscaled: probabilities() scales them inside one FFMA).
  // visible(tile, i, key) says for row i. One branch per tile, outside the loops: with the test inside them ptxas
  // kept a branch per 8-key tile even where no mask applies (~10 instructions each, 16 per 128-key tile).
  template <class Visible>
  PK_DEVICE void mask(float (&s)[kRowTiles][kNTiles][4], const KeyTile<T>& tile, Visible visible) const {
    if (!tile.needs_mask) return;
    PK_UNROLL
    for (int rt = 0; rt < kRowTiles; ++rt)
      PK_UNROLL
      for (int n = 0; n < kNTiles; ++n)
        PK_UNROLL
        for (int j = 0; j < 4; ++j) {
          const int key = tile.key0 + n * 8 + (lane % 4) * 2 + (j & 1);
          if (!visible(tile, 2 * rt + (j >> 1), key)) s[rt][n][j] = -INFINITY;
        }
  }

  // Online softmax update: new row maxima (over the quad of lanes sharing a row), rescale O and the sums, and
  // turn s into the tile's probabilities. A row that has seen nothing yet keeps max -inf and adds exact zeros.
  PK_DEVICE void softmax(float (&s)[kRowTiles][kNTiles][4], float scale_log2) {
    float alpha[kRows];
    probabilities(s, scale_log2, alpha);
    rescale(alpha);
  }

  // The part of softmax() that leaves O alone (a loop whose P.V is still writing O runs it first): new maxima, s
  // to probabilities, the sums; alpha[i] is what row i's O must still be multiplied by. s holds the raw (masked)
  // scores; the maxima are kept in the base-2 domain, scale_log2 times theirs (scale_log2 > 0, so the raw
  // maximum's), and each probability is exp2(fma(s, scale_log2, -max)): one FFMA where scaling first cost an FMUL
  // and an FADD per score (FlashAttention's order).
  PK_DEVICE void probabilities(float (&s)[kRowTiles][kNTiles][4], float scale_log2, float (&alpha)[kRows]) {
    PK_UNROLL
    for (int rt = 0; rt < kRowTiles; ++rt)
      PK_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * rt + h;
        float m = -INFINITY;
        PK_UNROLL
        for (int n = 0; n < kNTiles; ++n) m = fmaxf(m, fmaxf(s[rt][n][2 * h], s[rt][n][2 * h + 1]));
        m = fmaxf(m, shfl_xor(m, 1));
        m = fmaxf(m, shfl_xor(m, 2));
        m = fmaxf(row_max[i], m * scale_log2);
        const float m_use = m == -INFINITY ? 0.f : m;  // exp2(-inf - -inf) would be NaN
        alpha[i] = fast_exp2(row_max[i] - m_use);
        row_max[i] = m;
        float sum = 0.f;
        PK_UNROLL
        for (int n = 0; n < kNTiles; ++n)
          PK_UNROLL
          for (int j = 0; j < 2; ++j) {
            const float p = fast_exp2(fmaf(s[rt][n][2 * h + j], scale_log2, -m_use));
            s[rt][n][2 * h + j] = p;
            sum += p;
          }
        row_sum[i] = row_sum[i] * alpha[i] + sum;
      }
  }

  PK_DEVICE void rescale(const float (&alpha)[kRows]) {
    PK_UNROLL
    for (int rt = 0; rt < kRowTiles; ++rt)
      PK_UNROLL
      for (int h = 0; h < 2; ++h)
        PK_UNROLL
        for (int d = 0; d < kDTiles; ++d) {
          acc[rt][d][2 * h] *= alpha[2 * rt + h];
          acc[rt][d][2 * h + 1] *= alpha[2 * rt + h];
        }
  }

  // Normalized output of row i is acc * inv[i]; lse[i] natural log, -inf for a row that saw nothing (its output
  // is then zeros, never NaN).
  PK_DEVICE void finish(float (&inv)[kRows], float (&lse)[kRows]) const {
    PK_UNROLL
    for (int i = 0; i < kRows; ++i) normalization(row_max[i], row_total(i), inv[i], lse[i]);
  }

  // Row i's sum of exp2 over all its columns (each lane of the quad holds its own columns' share).
  PK_DEVICE float row_total(int i) const {
    float sum = row_sum[i];
    sum += shfl_xor(sum, 1);
    sum += shfl_xor(sum, 2);
    return sum;
  }

  // 1 / sum and the natural-log LSE of a row whose base-2 maximum is `max` and sum of exp2 `sum`; 0 and -inf for a
  // row that saw nothing.
  static PK_DEVICE void normalization(float max, float sum, float& inv, float& lse) {
    const bool seen = sum > 0.f;
    inv = seen ? 1.f / sum : 0.f;
    lse = seen ? (max + fast_log2(sum)) * kLn2 : -INFINITY;
  }

  // store(i, column, value0, value1): this lane's two adjacent output columns of its row i. acc[.][d] holds the
  // 8-column tile first_tile + d, for d < kCount (BlockAttention's kKeysAcrossWarps leaves each warp a quarter).
  template <int kCount = kDTiles, class Store>
  PK_DEVICE void for_each_output(const float (&inv)[kRows], Store store, int first_tile = 0) const {
    PK_UNROLL
    for (int rt = 0; rt < kRowTiles; ++rt)
      PK_UNROLL
      for (int h = 0; h < 2; ++h)
        PK_UNROLL
        for (int d = 0; d < kCount; ++d)
          store(2 * rt + h, (first_tile + d) * 8 + (lane % 4) * 2, acc[rt][d][2 * h] * inv[2 * rt + h],
                acc[rt][d][2 * h + 1] * inv[2 * rt + h]);
  }
};

// kKeys keys per tile (a multiple of 16): 64, or 32 where 64 would not fit the registers.
//
// kKeysAcrossWarps: the 4 warps share the same 16 * kRowTiles rows and split each tile's keys instead (warp w scores
// keys [w, w + 1) * kKeys / 4 of every tile), each with its own online softmax over its keys; finish() merges the
// four (max, sum, O) through shared memory (FlashDecoding inside the block). For blocks with at most 16 rows (the
// decode's own programs, G * S rows of one sequence): split by rows, three of the four warps would have none and
// one warp would run every tile's whole chain alone. Replaces OnlineSoftmax's row_of, finish and
// for_each_output (after finish, warp w holds the output columns [w, w + 1) * D / 4), and says which lanes write
// the LSE (writes_lse): hidden, not virtual, so callers use this class's (OnlineSoftmax's row_of would be wrong).
template <typename T, int D, int kRowTiles, int kKeys = 64, int kStages = 1, bool kKeysAcrossWarps = false>
struct BlockAttention : OnlineSoftmax<T, kRowTiles, (kKeysAcrossWarps ? kKeys / kWarps : kKeys) / 8, D / 8> {
  static_assert(kStages >= 1, "at least one stage");
  static constexpr int kWarpKeys = kKeysAcrossWarps ? kKeys / kWarps : kKeys;  // keys of each tile a warp scores
  static_assert(kWarpKeys % 16 == 0, "P.V takes a warp's keys 16 at a time");
  using Softmax = OnlineSoftmax<T, kRowTiles, kWarpKeys / 8, D / 8>;
  using Softmax::acc;
  using Softmax::kRows;
  using Softmax::lane;
  using Softmax::mask;
  using Softmax::softmax;
  using Softmax::warp;
  static constexpr int kBlockThreads = kThreads;
  static constexpr bool kTmaFeed = false;  // cp.async by every thread (HopperAttention may use TMA instead)
  using Layout = TileLayout<D>;
  static constexpr int kBlockM = 16 * kRowTiles * (kKeysAcrossWarps ? 1 : kWarps);  // query rows per block
  static constexpr int kBlockN = kKeys;
  static constexpr int kNTiles = kWarpKeys / 8;            // 8-key score tiles per warp
  static constexpr int kDTiles = D / 8;                    // 8-column output tiles per row tile
  // finish()'s merge of the warps' states (kKeysAcrossWarps), over the ring once the loop is done: each warp's
  // unnormalized O [kBlockM][D] in fp32, rows kMergePitch floats apart (8 more than D: the 8 rows a quad pattern
  // touches fall into 16 banks two ways instead of 4 banks eight ways), then each warp's (max, sum) per row.
  static constexpr int kMergePitch = D + 8;
  static constexpr size_t kMergeBytes = kKeysAcrossWarps ? (kWarps * kBlockM * (kMergePitch + 2)) * sizeof(float) : 0;
  static constexpr size_t kRingBytes = (kBlockM + 2 * kBlockN * kStages) * D * 2;  // Q, kStages x (K, V)
  static constexpr size_t kSharedBytes = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static constexpr int kOutputDTiles = kKeysAcrossWarps ? kDTiles / kWarps : kDTiles;  // a warp's after finish()
  static_assert(kOutputDTiles * (kKeysAcrossWarps ? kWarps : 1) == kDTiles, "finish() splits the columns evenly");
  static constexpr int kDSteps = D / 16;                   // 16-deep k-steps of QK^T
  // Q's A fragments stay in registers when they fit; otherwise each k-step reloads them from shared memory.
  static constexpr bool kQInRegisters = kRowTiles * kDSteps * 4 <= 32;

  T* q_tile;
  T* k_tile;  // stage s's K tile is k_tile + s * kStageElements, its V tile v_tile + s * kStageElements
  T* v_tile;
  static constexpr int kStageElements = 2 * kBlockN * D;
  int thread;
  uint32_t q_frag[kQInRegisters ? kRowTiles : 1][kQInRegisters ? kDSteps : 1][4];

  PK_DEVICE explicit BlockAttention(char* shared) : Softmax(static_cast<int>(thread_index())) {
    q_tile = reinterpret_cast<T*>(shared);
    k_tile = q_tile + kBlockM * D;
    v_tile = k_tile + kBlockN * D;
    thread = static_cast<int>(thread_index());
  }

  // Q tile: row r comes from q_row(r) (see load_rows_async).
  template <class QRow>
  PK_DEVICE void load_q_async(QRow q_row, const T* any_q) {
    load_rows_async<T, Layout, kThreads, kBlockM>(q_tile, q_row, any_q, thread);
  }

  // With kKeysAcrossWarps through a stepped pointer: each warp's share of a tile's math is a quarter, so the copies'
  // address math was ~40% of its loop (~280 of ~700 instructions in the SASS), and these blocks' registers (their
  // kernel's other programs set the count) leave room for the pointers.
  PK_DEVICE void load_keys_async(T* dst, const T* base, int64_t stride, int key0, int end) const {
    pk::load_keys_async<T, Layout, kThreads, kBlockN, kKeysAcrossWarps>(dst, base, stride, key0, end, thread);
  }

  // The warp's first 16-row tile (all warps share rows 0.. with kKeysAcrossWarps) and the first of its keys in
  // every key tile.
  PK_DEVICE int first_row_tile() const { return kKeysAcrossWarps ? 0 : warp * kRowTiles; }
  PK_DEVICE int first_key() const { return kKeysAcrossWarps ? warp * kWarpKeys : 0; }

  PK_DEVICE int row_of(int i) const { return (first_row_tile() + i / 2) * 16 + lane / 4 + 8 * (i % 2); }

  // Whether this lane writes the LSE of its rows: one lane of the quad holding them, in one warp.
  PK_DEVICE bool writes_lse() const { return lane % 4 == 0 && (!kKeysAcrossWarps || warp == 0); }

  // A busy warp has rows below rows_in_use (the same in the whole warp).
  PK_DEVICE bool busy(int rows_in_use) const { return first_row_tile() * 16 < rows_in_use; }

  // `tile` as mask() sees it for this warp's keys: its key0 moved to the warp's first key.
  PK_DEVICE KeyTile<T> warp_keys(KeyTile<T> tile) const {
    tile.key0 += first_key();
    return tile;
  }

  PK_DEVICE void load_q_fragment(uint32_t (&a)[4], int rt, int kk) const {
    ldmatrix_x4(a, q_tile + Layout::offset((first_row_tile() + rt) * 16 + lane % 16, kk * 2 + lane / 16));
  }

  PK_DEVICE void load_q_fragments() {
    if constexpr (kQInRegisters) {
      PK_UNROLL
      for (int rt = 0; rt < kRowTiles; ++rt) {
        PK_UNROLL
        for (int kk = 0; kk < kDSteps; ++kk) load_q_fragment(q_frag[rt][kk], rt, kk);
      }
    }
  }

  // s = Q K^T for this warp's rows and keys of the tile (the K tile at `keys`): s[rt][n][j] is key
  // first_key() + 8n + 2 (lane % 4) + (j & 1) of row 2 rt + (j >> 1). Each K fragment is loaded once for all row
  // tiles.
  PK_DEVICE void scores(float (&s)[kRowTiles][kNTiles][4], const T* keys) const {
    PK_UNROLL
    for (int rt = 0; rt < kRowTiles; ++rt)
      PK_UNROLL
      for (int n = 0; n < kNTiles; ++n)
        PK_UNROLL
        for (int j = 0; j < 4; ++j) s[rt][n][j] = 0.f;
    const int matrix = lane / 8;
    PK_UNROLL
    for (int kk = 0; kk < kDSteps; ++kk) {
      uint32_t a[kRowTiles][4];
      PK_UNROLL
      for (int rt = 0; rt < kRowTiles; ++rt) {
        if constexpr (kQInRegisters) {
          PK_UNROLL
          for (int j = 0; j < 4; ++j) a[rt][j] = q_frag[rt][kk][j];
        } else {
          load_q_fragment(a[rt], rt, kk);
        }
      }
      PK_UNROLL
      for (int np = 0; np < kNTiles / 2; ++np) {  // two 8-key tiles per ldmatrix.x4: keys 16np + [0, 8), + [8, 16)
        uint32_t b[4];
        ldmatrix_x4(b, keys + Layout::offset(first_key() + np * 16 + (matrix / 2) * 8 + lane % 8,
                                             kk * 2 + matrix % 2));
        PK_UNROLL
        for (int rt = 0; rt < kRowTiles; ++rt) {
          mma_16816<T>(s[rt][2 * np], a[rt], b[0], b[1]);
          mma_16816<T>(s[rt][2 * np + 1], a[rt], b[2], b[3]);
        }
      }
    }
  }

  // O += P V (the V tile at `values`): the score accumulators are re-packed in registers as the A operand (the C
  // layout of two 8-key tiles is the A layout of one 16-key step), V comes through ldmatrix.trans, once for all
  // row tiles.
  PK_DEVICE void accumulate_pv(const float (&s)[kRowTiles][kNTiles][4], const T* values) {
    const int matrix = lane / 8;
    PK_UNROLL
    for (int ks = 0; ks < kNTiles / 2; ++ks) {
      uint32_t a[kRowTiles][4];
      PK_UNROLL
      for (int rt = 0; rt < kRowTiles; ++rt) {
        a[rt][0] = pack2<T>(s[rt][2 * ks][0], s[rt][2 * ks][1]);
        a[rt][1] = pack2<T>(s[rt][2 * ks][2], s[rt][2 * ks][3]);
        a[rt][2] = pack2<T>(s[rt][2 * ks + 1][0], s[rt][2 * ks + 1][1]);
        a[rt][3] = pack2<T>(s[rt][2 * ks + 1][2], s[rt][2 * ks + 1][3]);
      }
      PK_UNROLL
      for (int dp = 0; dp < kDSteps; ++dp) {  // two 8-column output tiles per ldmatrix.x4.trans
        uint32_t b[4];
        ldmatrix_x4_trans(b, values + Layout::offset(first_key() + ks * 16 + (matrix % 2) * 8 + lane % 8,
                                                     dp * 2 + matrix / 2));
        PK_UNROLL
        for (int rt = 0; rt < kRowTiles; ++rt) {
          mma_16816<T>(acc[rt][2 * dp], a[rt], b[0], b[1]);
          mma_16816<T>(acc[rt][2 * dp + 1], a[rt], b[2], b[3]);
        }
      }
    }
  }

  // The whole loop over `num_tiles` tiles (tile(t) -> KeyTile<T>). Q must have been issued with load_q_async.
  // Rows from `rows_in_use` on are padding (past the sequence, or past the G * S rows of a decode group): a warp
  // holding only such rows still loads its share of every tile and meets every barrier, but skips the math.
  template <class Tiles, class Visible>
  PK_DEVICE void run(int num_tiles, Tiles tile, float scale_log2, Visible visible, int rows_in_use) {
    if constexpr (kStages > 1) {
      run_ring(num_tiles, tile, scale_log2, visible, rows_in_use);
      return;
    }
    const bool busy = this->busy(rows_in_use);
    if (num_tiles > 0) {
      const KeyTile<T> first = tile(0);
      load_keys_async(k_tile, first.k, first.k_stride, first.key0, first.end);
    }
    cp_async_commit();
    for (int t = 0; t < num_tiles; ++t) {
      const KeyTile<T> current = tile(t);
      cp_async_wait<0>();
      sync_threads();  // K(t) (and Q) landed; every warp is done with V(t - 1)
      if (t == 0 && busy) load_q_fragments();
      load_keys_async(v_tile, current.v, current.v_stride, current.key0, current.end);
      cp_async_commit();
      float s[kRowTiles][kNTiles][4];
      if (busy) scores(s, k_tile);
      sync_threads();  // every warp is done with K(t)
      if (t + 1 < num_tiles) {
        const KeyTile<T> next = tile(t + 1);
        load_keys_async(k_tile, next.k, next.k_stride, next.key0, next.end);
      }
      cp_async_commit();
      if (busy) {
        mask(s, warp_keys(current), visible);
        softmax(s, scale_log2);
      }
      cp_async_wait<1>();  // V(t) landed; K(t + 1) may still be in flight
      sync_threads();
      if (busy) accumulate_pv(s, v_tile);
    }
    cp_async_wait<0>();
  }

  // run() with a ring of kStages tile pairs (TileRing, loading kStages - 1 tiles ahead): after step t's barrier every
  // warp is done with tile t - 1, whose stage the step refills.
  template <class Tiles, class Visible>
  PK_DEVICE void run_ring(int num_tiles, Tiles tile, float scale_log2, Visible visible, int rows_in_use) {
    using Ring = TileRing<kStages - 1, false>;
    const bool busy = this->busy(rows_in_use);
    auto load = [&](int t) { load_tile_async(t % kStages, tile(t)); };
    Ring::prologue(num_tiles, load);
    for (int t = 0; t < num_tiles; ++t) {
      Ring::wait_for_tile();
      if (t == 0 && busy) load_q_fragments();
      Ring::load_ahead(t, num_tiles, load);
      if (busy) {
        const int stage = t % kStages;
        float s[kRowTiles][kNTiles][4];
        scores(s, k_tile + stage * kStageElements);
        mask(s, warp_keys(tile(t)), visible);
        softmax(s, scale_log2);
        accumulate_pv(s, v_tile + stage * kStageElements);
      }
    }
    cp_async_wait<0>();
  }

  PK_DEVICE void load_tile_async(int stage, const KeyTile<T>& t) const {
    load_keys_async(k_tile + stage * kStageElements, t.k, t.k_stride, t.key0, t.end);
    load_keys_async(v_tile + stage * kStageElements, t.v, t.v_stride, t.key0, t.end);
  }

  // OnlineSoftmax::finish, after merging the warps' states with kKeysAcrossWarps. Every thread of the block calls
  // it (it meets two barriers), after run(). The merge: each warp writes its unnormalized O and its rows' (max, sum)
  // to shared memory; then row by row M = max_w m_w, factor_w = exp2(m_w - M) (0 for a warp that saw none of the
  // row's keys), total = sum_w factor_w * l_w, and warp w sums factor_w' * O_w' over w' for its quarter of the
  // columns (into acc[rt][0, kOutputDTiles)).
  PK_DEVICE void finish(float (&inv)[kRows], float (&lse)[kRows]) {
    if constexpr (!kKeysAcrossWarps) {
      Softmax::finish(inv, lse);
    } else {
      float* partial = reinterpret_cast<float*>(q_tile);  // [kWarps][kBlockM][kMergePitch], over the ring
      float* stats = partial + kWarps * kBlockM * kMergePitch;  // [kWarps][kBlockM][max, sum]
      auto at = [&](int w, int row) { return partial + (w * kBlockM + row) * kMergePitch; };
      sync_threads();  // every warp is done with the ring (its last P.V read a V tile there)
      float ones[kRows];
      PK_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const float sum = this->row_total(i);
        if (lane % 4 == 0) {
          stats[(warp * kBlockM + row_of(i)) * 2] = this->row_max[i];
          stats[(warp * kBlockM + row_of(i)) * 2 + 1] = sum;
        }
        ones[i] = 1.f;
      }
      Softmax::for_each_output(ones, [&](int i, int col, float x0, float x1) {  // every column, unnormalized
        float* out = at(warp, row_of(i)) + col;
        out[0] = x0;
        out[1] = x1;
      });
      sync_threads();
      float factor[kRows][kWarps];
      PK_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const int row = row_of(i);
        float m = -INFINITY;
        PK_UNROLL
        for (int w = 0; w < kWarps; ++w) m = fmaxf(m, stats[(w * kBlockM + row) * 2]);
        const float m_use = m == -INFINITY ? 0.f : m;  // exp2(-inf - -inf) would be NaN
        float total = 0.f;
        PK_UNROLL
        for (int w = 0; w < kWarps; ++w) {
          factor[i][w] = fast_exp2(stats[(w * kBlockM + row) * 2] - m_use);
          total += factor[i][w] * stats[(w * kBlockM + row) * 2 + 1];
        }
        Softmax::normalization(m, total, inv[i], lse[i]);
      }
      PK_UNROLL
      for (int rt = 0; rt < kRowTiles; ++rt)
        PK_UNROLL
        for (int h = 0; h < 2; ++h)
          PK_UNROLL
          for (int d = 0; d < kOutputDTiles; ++d)
            PK_UNROLL
            for (int j = 0; j < 2; ++j) {
              const int col = (warp * kOutputDTiles + d) * 8 + (lane % 4) * 2 + j;
              float x = 0.f;
              PK_UNROLL
              for (int w = 0; w < kWarps; ++w) x += factor[2 * rt + h][w] * at(w, row_of(2 * rt + h))[col];
              acc[rt][d][2 * h + j] = x;
            }
    }
  }

  // store(i, column, value0, value1): this lane's two adjacent output columns of its row i (with kKeysAcrossWarps,
  // in the warp's quarter of the columns).
  template <class Store>
  PK_DEVICE void for_each_output(const float (&inv)[kRows], Store store) const {
    Softmax::template for_each_output<kOutputDTiles>(inv, store, kKeysAcrossWarps ? warp * kOutputDTiles : 0);
  }
};

// prefix_index / prefix_lens entries are int32 or int64.
PK_DEVICE int64_t load_index(const void* data, bool is_int32, int64_t i) {
  return is_int32 ? static_cast<const int32_t*>(data)[i] : static_cast<const int64_t*>(data)[i];
}

}  // namespace pk
