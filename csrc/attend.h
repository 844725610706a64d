// The block-level attention loop shared by every CUDA kernel: 64 query rows (4 warps x 16) against a sequence of
// 64-key tiles, FlashAttention-2 style. Scores and P.V on sm_80 tensor cores (mma.sync m16n8k16, fp32 accumulate),
// online softmax in base 2, K and V tiles streamed through shared memory with cp.async so that each tile's V load
// overlaps its QK^T and the next K load overlaps the softmax and P.V.
//
// The caller says which rows (a pointer per row: one sequence's consecutive queries for the forward, the packed
// queries of many sequences for the decode's prefix part) and which tiles (prefix keys, then own keys, each with
// its own base pointer): the same loop serves every kernel.
#pragma once

#include <cfloat>

#include "mma.h"
#include "params.h"

namespace pk {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per block: one 16-row mma tile per warp
constexpr int kBlockN = 64;           // keys per tile
constexpr float kLn2 = 0.6931471805599453f;

// [64][D] tiles of 16-bit elements in shared memory, 16-byte chunks XOR-swizzled by the row's low 3 bits: the 8 rows
// one ldmatrix reads at the same column then sit in 8 different bank groups (no conflicts), and a row stays whole.
template <int D>
struct TileLayout {
  static constexpr int kChunks = D / 8;
  static constexpr int kElements = 64 * D;
  static PK_DEVICE int offset(int row, int chunk) { return row * D + ((chunk ^ (row & 7)) << 3); }
};

template <int D>
constexpr size_t attention_shared_bytes() { return 3 * TileLayout<D>::kElements * 2; }  // Q, K, V tiles

// One tile of keys: [key0, key0 + 64) of the keys at k/v (clipped to `end`), from the prefix or the own keys.
template <typename T>
struct KeyTile {
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;  // elements per key position
  int key0, end;
  bool own;                    // own keys: causal and key_padding_mask apply; prefix keys are always visible
  bool needs_mask;             // false: every key of the tile is visible to every row (the fast path)
};

template <typename T, int D>
struct BlockAttention {
  using Layout = TileLayout<D>;
  static constexpr int kDTiles = D / 8;    // 8-column output tiles per warp row tile
  static constexpr int kDSteps = D / 16;   // 16-deep k-steps of QK^T

  T* q_tile;
  T* k_tile;
  T* v_tile;
  int thread, warp, lane;
  float acc[kDTiles][4];    // O accumulators: rows (lane / 4) and (lane / 4 + 8) of this warp's 16
  float row_max[2];         // running max of the scaled (base-2) scores of those two rows
  float row_sum[2];         // running sum of exp2, over this lane's columns only (reduced over the quad at the end)
  uint32_t q_frag[kDSteps][4];

  PK_DEVICE explicit BlockAttention(char* shared) {
    q_tile = reinterpret_cast<T*>(shared);
    k_tile = q_tile + Layout::kElements;
    v_tile = k_tile + Layout::kElements;
    thread = static_cast<int>(thread_index());
    warp = thread / 32;
    lane = thread % 32;
    for (int i = 0; i < kDTiles; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int h = 0; h < 2; ++h) {
      row_max[h] = -INFINITY;
      row_sum[h] = 0.f;
    }
  }

  // Row of the block (0..63) that this lane's accumulator half h (0: rows 0-7, 1: rows 8-15 of the warp) holds.
  PK_DEVICE int row_of(int h) const { return warp * 16 + lane / 4 + 8 * h; }

  // Q tile: row r comes from q_row(r), a pointer to its D elements, or nullptr (a row past the end: zeros).
  // `any_q` is a valid address handed to the zero-filling copies (they read nothing from it).
  template <class QRow>
  PK_DEVICE void load_q_async(QRow q_row, const T* any_q) {
    for (int i = thread; i < 64 * Layout::kChunks; i += kThreads) {
      const int r = i / Layout::kChunks, c = i % Layout::kChunks;
      const T* src = q_row(r);
      cp_async_16(q_tile + Layout::offset(r, c), src ? src + c * 8 : any_q, src != nullptr);
    }
  }

  PK_DEVICE static void load_keys_async(T* dst, const T* base, int64_t stride, int key0, int end) {
    for (int i = static_cast<int>(thread_index()); i < 64 * Layout::kChunks; i += kThreads) {
      const int r = i / Layout::kChunks, c = i % Layout::kChunks;
      const int key = key0 + r;
      const bool in_range = key < end;
      cp_async_16(dst + Layout::offset(r, c), in_range ? base + key * stride + c * 8 : base, in_range);
    }
  }

  PK_DEVICE void load_q_fragments() {
    for (int kk = 0; kk < kDSteps; ++kk)
      ldmatrix_x4(q_frag[kk], q_tile + Layout::offset(warp * 16 + lane % 16, kk * 2 + lane / 16));
  }

  // s = Q K^T for this warp's 16 rows and the tile's 64 keys: s[n][i] is key 8n + 2 (lane % 4) + (i & 1)
  // of row half (i >> 1).
  PK_DEVICE void scores(float (&s)[8][4]) const {
    for (int n = 0; n < 8; ++n)
      for (int i = 0; i < 4; ++i) s[n][i] = 0.f;
    const int matrix = lane / 8;
    for (int kk = 0; kk < kDSteps; ++kk) {
      for (int np = 0; np < 4; ++np) {  // two 8-key tiles per ldmatrix.x4: keys 16np + [0, 8) and + [8, 16)
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + Layout::offset(np * 16 + (matrix / 2) * 8 + lane % 8, kk * 2 + matrix % 2));
        mma_16816<T>(s[2 * np], q_frag[kk], b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[kk], b[2], b[3]);
      }
    }
  }

  // Scores to the base-2 domain; keys a row must not see become -inf. visible(tile, h, key) says for row half h.
  template <class Visible>
  PK_DEVICE void scale_and_mask(float (&s)[8][4], float scale_log2, const KeyTile<T>& tile, Visible visible) const {
    for (int n = 0; n < 8; ++n)
      for (int i = 0; i < 4; ++i) {
        s[n][i] *= scale_log2;
        if (tile.needs_mask) {
          const int key = tile.key0 + n * 8 + (lane % 4) * 2 + (i & 1);
          if (!visible(tile, i >> 1, key)) s[n][i] = -INFINITY;
        }
      }
  }

  // Online softmax update: new row maxima (over the quad of lanes sharing a row), rescale O and the sums, and
  // turn s into the tile's probabilities. A row that has seen nothing yet keeps max -inf and adds exact zeros.
  PK_DEVICE void softmax(float (&s)[8][4]) {
    for (int h = 0; h < 2; ++h) {
      float m = row_max[h];
      for (int n = 0; n < 8; ++n) m = fmaxf(m, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      m = fmaxf(m, shfl_xor(m, 1));
      m = fmaxf(m, shfl_xor(m, 2));
      const float m_use = m == -INFINITY ? 0.f : m;  // exp2(-inf - -inf) would be NaN
      const float alpha = fast_exp2(row_max[h] - m_use);
      row_max[h] = m;
      float sum = 0.f;
      for (int n = 0; n < 8; ++n)
        for (int j = 0; j < 2; ++j) {
          const float p = fast_exp2(s[n][2 * h + j] - m_use);
          s[n][2 * h + j] = p;
          sum += p;
        }
      row_sum[h] = row_sum[h] * alpha + sum;
      for (int d = 0; d < kDTiles; ++d) {
        acc[d][2 * h] *= alpha;
        acc[d][2 * h + 1] *= alpha;
      }
    }
  }

  // O += P V: the score accumulators are re-packed in registers as the A operand (the C layout of two 8-key
  // tiles is the A layout of one 16-key step), V comes through ldmatrix.trans.
  PK_DEVICE void accumulate_pv(const float (&s)[8][4]) {
    const int matrix = lane / 8;
    for (int ks = 0; ks < 4; ++ks) {
      const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]), pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                             pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                             pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
      for (int dp = 0; dp < kDSteps; ++dp) {  // two 8-column output tiles per ldmatrix.x4.trans
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + Layout::offset(ks * 16 + (matrix % 2) * 8 + lane % 8, dp * 2 + matrix / 2));
        mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
        mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
  }

  // The whole loop over `num_tiles` tiles (tile(t) -> KeyTile<T>). Q must have been issued with load_q_async.
  template <class Tiles, class Visible>
  PK_DEVICE void run(int num_tiles, Tiles tile, float scale_log2, Visible visible) {
    if (num_tiles > 0) {
      const KeyTile<T> first = tile(0);
      load_keys_async(k_tile, first.k, first.k_stride, first.key0, first.end);
    }
    cp_async_commit();
    for (int t = 0; t < num_tiles; ++t) {
      const KeyTile<T> current = tile(t);
      cp_async_wait<0>();
      sync_threads();  // K(t) (and Q) landed; every warp is done with V(t - 1)
      if (t == 0) load_q_fragments();
      load_keys_async(v_tile, current.v, current.v_stride, current.key0, current.end);
      cp_async_commit();
      float s[8][4];
      scores(s);
      sync_threads();  // every warp is done with K(t)
      const bool has_next = t + 1 < num_tiles;
      if (has_next) {
        const KeyTile<T> next = tile(t + 1);
        load_keys_async(k_tile, next.k, next.k_stride, next.key0, next.end);
      }
      cp_async_commit();
      scale_and_mask(s, scale_log2, current, visible);
      softmax(s);
      cp_async_wait<1>();  // V(t) landed; K(t + 1) may still be in flight
      sync_threads();
      accumulate_pv(s);
    }
    cp_async_wait<0>();
  }

  // Normalized output of row half h is acc[.][2h..2h+1] * inv[h]; lse[h] natural log, -inf for a row that saw
  // nothing (its output is then zeros, never NaN).
  PK_DEVICE void finish(float (&inv)[2], float (&lse)[2]) const {
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[h];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      const bool seen = sum > 0.f;
      inv[h] = seen ? 1.f / sum : 0.f;
      lse[h] = seen ? (row_max[h] + fast_log2(sum)) * kLn2 : -INFINITY;
    }
  }

  // store(h, column, value0, value1): this lane's two adjacent output columns of row half h.
  template <class Store>
  PK_DEVICE void for_each_output(const float (&inv)[2], Store store) const {
    for (int h = 0; h < 2; ++h)
      for (int d = 0; d < kDTiles; ++d)
        store(h, d * 8 + (lane % 4) * 2, acc[d][2 * h] * inv[h], acc[d][2 * h + 1] * inv[h]);
  }
};

PK_DEVICE int imin(int a, int b) { return a < b ? a : b; }

// prefix_index / prefix_lens entries are int32 or int64.
PK_DEVICE int64_t load_index(const void* data, bool is_int32, int64_t i) {
  return is_int32 ? static_cast<const int32_t*>(data)[i] : static_cast<const int64_t*>(data)[i];
}

}  // namespace pk
