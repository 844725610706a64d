// The Hopper (sm_90a) block attention loop: BlockAttention's schedule with wgmma instead of mma.sync. kWarpGroups
// warpgroups of 64 query rows each (two: 8 warps, 256 threads, one block per SM at 128-key tiles; one: 64 rows,
// which with 64-key tiles takes 112 KB at head dim 128, so that two blocks share an SM as the Triton forward's
// 64 x 64 tiles do), kKeys-key tiles:
//   S = Q K^T   wgmma, A (Q) and B (K) both read from shared memory by descriptor, D/16 k-steps;
//   O += P V    wgmma, A (P) from registers (the score accumulators re-packed, as on sm_80), B (V) from shared
//               memory, MN-major (V's [keys][D] tile used as B^T without a transpose in shared memory).
// Scores and O land in the m16n8 C layout per warp, so OnlineSoftmax (attend.h) does the masking and softmax.
// Q, K and V tiles sit in shared memory with the 128-byte swizzle wgmma reads (TileLayout128B); K/V tiles stream
// through a ring of kStages pairs, fed one of two ways:
//   cp.async (kTma = false): the consumer threads copy, each copy handed to the async proxy before the block barrier
//               that publishes it (TileRing);
//   TMA      (kTma = true, FlashAttention-3's warp specialization): a third, producer warpgroup (its registers given
//               to the two consumers by setmaxnreg) copies Q and each tile by TMA. K and V have their own
//               pipelines, as in FA3: per stage a "full" mbarrier each tells the consumers that K or V landed, and
//               an "empty" one each that every consumer warp is done with it (one arrival per warp). K is handed
//               back as soon as its scores are computed, V once its P.V is, so the producer refills K a step early.
//               Q has its own full and empty barriers too: a persistent block (forward.cu) works through several
//               query blocks, and the producer copies the next one's Q once the consumers' last S = QK^T of the
//               current one completed, while they finish its P.V and store its output. No block barrier in the loop.
// run_overlapped (the default) overlaps one tile's softmax with the previous tile's P.V, as FlashAttention-3 does
// within a warpgroup; with kPingPong the two warpgroups also take turns issuing their wgmmas (FA3's ping-pong, two
// named barriers), so that one's softmax runs while the other's matrix products occupy the tensor cores.
#pragma once

#include "attend.h"
#include "tma.h"
#include "wgmma.h"

namespace pk {

// A [kRows][D] tile of 16-bit elements as wgmma's 128-byte-swizzle operands: panels of 64 columns (128-byte rows),
// panel p holding columns [64p, 64p + 64) of every row; chunk c of row r at chunk (c % 8) ^ (r % 8) of its row. The
// panels, and the tiles, start 1024-byte aligned.
template <int kRows, int D>
struct TileLayout128B {
  static_assert(D % 64 == 0 && kRows % 8 == 0, "whole panels of whole atoms");
  static constexpr int kChunks = D / 8;
  static constexpr int kRowPitch = 64;  // elements from a row to the next in its panel (same swizzle 8 rows on)
  static constexpr int kPanelElements = kRows * 64;
  static PK_DEVICE int offset(int row, int chunk) {
    return (chunk / 8) * kPanelElements + row * 64 + (((chunk % 8) ^ (row % 8)) << 3);
  }
};

// A [kRows][D] tile in TileLayout128B by TMA: one box of 64 columns x kRows rows per panel, from rows
// [row0, row0 + kRows) of (c2, c3) in a tensor map of dims (D, rows, c2's, c3's).
template <typename T, int D, int kRows>
PK_DEVICE void tma_load_tile(T* dst, const TensorMap& map, uint64_t* bar, int row0, int c2, int c3) {
  PK_UNROLL
  for (int panel = 0; panel < D / 64; ++panel)
    tma_load_4d(dst + panel * TileLayout128B<kRows, D>::kPanelElements, map, bar, 64 * panel, row0, c2, c3);
}

template <typename T, int D, int kKeys = 128, int kStages = 3, bool kOverlap = true, bool kTma = false,
          bool kPingPong = false, int kWarpGroups = 2>
struct HopperAttention : OnlineSoftmax<T, 1, kKeys / 8, D / 8> {
  static_assert(kStages >= 2, "a ring of at least two tile pairs");
  static_assert(kOverlap || !kPingPong, "the warpgroups take turns in the overlapped loop only");
  static_assert(kKeys == 64 || kKeys == 128, "wgmma_ss is instantiated for 64 and 128 columns");
  static_assert(kWarpGroups == 1 || kWarpGroups == 2, "one or two consumer warpgroups");
  static_assert(kWarpGroups == 2 || !(kPingPong || kTma),
                "the ping-pong needs two warpgroups to take turns; the TMA feed's setmaxnreg counts are for two");
  using Softmax = OnlineSoftmax<T, 1, kKeys / 8, D / 8>;
  using Softmax::acc;
  using Softmax::kRows;
  using Softmax::probabilities;
  using Softmax::rescale;
  using Softmax::mask;
  using Softmax::softmax;
  using Softmax::warp;
  static constexpr bool kTmaFeed = kTma;  // what forward_kernel asks (BlockAttention's is false)
  static constexpr int kConsumerThreads = 128 * kWarpGroups;
  static constexpr int kProducerThreads = kTma ? 128 : 0;  // warpgroup 0 when there is one
  static constexpr int kBlockThreads = kProducerThreads + kConsumerThreads;
  // setmaxnreg's counts (FlashAttention-3's for two consumer warpgroups). They redistribute what the launch gave
  // the block, 64K / threads rounded down to a multiple of 8 per thread (168 x 384 = 64512 here, not 65536): more
  // than that and the consumers' setmaxnreg.inc waits forever.
  static constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
  static_assert(!kTma || kProducerThreads * kProducerRegisters + kConsumerThreads * kConsumerRegisters <=
                             65536 / kBlockThreads / 8 * 8 * kBlockThreads,
                "setmaxnreg counts beyond the block's registers");
  static constexpr int kBlockM = 64 * kWarpGroups;  // query rows per block
  static constexpr int kBlockN = kKeys;
  static constexpr int kNTiles = kKeys / 8;
  using QLayout = TileLayout128B<kBlockM, D>;
  using KeyLayout = TileLayout128B<kBlockN, D>;
  static constexpr int kStageElements = 2 * kBlockN * D;  // one K and one V tile
  static constexpr size_t kTileBytes = (kBlockM + 2 * kBlockN * kStages) * D * 2;
  // TMA's mbarriers after the tiles: full keys, full values, empty keys, empty values (kStages each), then Q's full
  // and empty ones
  static constexpr int kBarriers = kTma ? 4 * kStages + 2 : 0;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;  // the arrivals an empty barrier's phase takes
  static constexpr size_t kSharedBytes = kTileBytes + 8 * kBarriers;

  T* q_tile;
  T* k_tile;  // stage s: K at k_tile + s * kStageElements, V right after it
  int thread;  // among the consumer threads

  PK_DEVICE explicit HopperAttention(char* shared)
      : Softmax(static_cast<int>(thread_index()) - kProducerThreads) {
    q_tile = reinterpret_cast<T*>(shared);
    k_tile = q_tile + kBlockM * D;
    thread = static_cast<int>(thread_index()) - kProducerThreads;
    // Every tile's swizzle atoms must start 1024-byte aligned, or wgmma reads the wrong elements: stop loudly.
    if ((matrix_descriptor(shared, 0, 0) & 0x3F) != 0) trap();
  }

  PK_DEVICE int warp_group() const { return warp / 4; }
  // The K and V tiles of stage s of the ring
  PK_DEVICE const T* keys_in(int s) const { return k_tile + s * kStageElements; }
  PK_DEVICE const T* values_in(int s) const { return k_tile + s * kStageElements + kBlockN * D; }

  // The cp.async feed copies Q with the consumers' threads; the TMA feed's producer copies it (produce).
  template <class QRow>
  PK_DEVICE void load_q_async(QRow q_row, const T* any_q) {
    if constexpr (!kTma) load_rows_async<T, QLayout, kConsumerThreads, kBlockM>(q_tile, q_row, any_q, thread);
  }

  PK_DEVICE void load_tile_async(int stage, const KeyTile<T>& t) const {
    T* keys = k_tile + stage * kStageElements;
    constexpr auto load = load_keys_async<T, KeyLayout, kConsumerThreads, kBlockN, true>;
    load(keys, t.k, t.k_stride, t.key0, t.end, thread);
    load(keys + kBlockN * D, t.v, t.v_stride, t.key0, t.end, thread);
  }

  // ---- ping-pong: warpgroup g issues its wgmmas after waiting on named barrier kTurnBarrier + g, then lets the
  // other go by arriving on its barrier; warpgroup 1 lets warpgroup 0 start. Each warpgroup takes num_tiles + 1
  // turns (the last P.V is a turn of its own), and warpgroup 1's last turn hands nothing on, so that every phase
  // of both barriers completes.
  static constexpr unsigned kTurnBarrier = 1;  // and 2 (0 is sync_threads')
  PK_DEVICE void let_warp_group_0_start(int num_tiles) const {
    if constexpr (kPingPong)
      if (warp_group() == 1 && num_tiles > 0) named_barrier_arrive<kTurnBarrier, kConsumerThreads>();
  }
  PK_DEVICE void take_turn() const {
    if constexpr (kPingPong) {
      if (warp_group() == 0)
        named_barrier_sync<kTurnBarrier, kConsumerThreads>();
      else
        named_barrier_sync<kTurnBarrier + 1, kConsumerThreads>();
    }
  }
  PK_DEVICE void pass_turn(bool last_turn) const {
    if constexpr (kPingPong) {
      if (warp_group() == 0)
        named_barrier_arrive<kTurnBarrier + 1, kConsumerThreads>();
      else if (!last_turn)
        named_barrier_arrive<kTurnBarrier, kConsumerThreads>();
    }
  }
  // An idle warpgroup (all its rows padding) still takes its turns, so that the other's barriers complete.
  PK_DEVICE void skip_turn(bool last_turn) const {
    take_turn();
    pass_turn(last_turn);
  }

  // ---- the TMA feed: the producer's side (the kernel calls these before constructing the consumers' object)

  // The TMA feed's barrier of stage s: full (a copy landed) or empty (the consumers are done with it), of K or V.
  static PK_DEVICE uint64_t* barriers(char* shared) { return reinterpret_cast<uint64_t*>(shared + kTileBytes); }
  static PK_DEVICE uint64_t* barrier(uint64_t* bars, bool full, bool values, int s) {
    return bars + ((full ? 0 : 2) + (values ? 1 : 0)) * kStages + s;
  }
  static PK_DEVICE uint64_t* q_barrier(uint64_t* bars, bool full = true) { return bars + 4 * kStages + (full ? 0 : 1); }
  static PK_DEVICE bool is_producer() { return static_cast<int>(thread_index()) < kProducerThreads; }

  // Every thread of the block calls it: one initializes the barriers, the block barrier publishes them.
  static PK_DEVICE void init_barriers(char* shared) {
    static_assert(kTma, "the cp.async feed has no mbarriers");
    if (thread_index() == 0) {
      uint64_t* bars = barriers(shared);
      for (int s = 0; s < kStages; ++s)
        for (bool values : {false, true}) {
          mbarrier_init(barrier(bars, true, values, s), 1);                // the producer's arrive_expect_tx + bytes
          mbarrier_init(barrier(bars, false, values, s), kConsumerWarps);  // every consumer warp is done with it
        }
      mbarrier_init(q_barrier(bars, true), 1);
      mbarrier_init(q_barrier(bars, false), kConsumerWarps);
      fence_barrier_init();
    }
    sync_threads();
  }

  // Where a block's consumers stand in the TMA pipelines when a work (one query block) starts: the works and the
  // (K, V) tiles that went through them before it. A persistent block's works share the pipelines, so a stage's
  // phase runs on across works; a block with one work starts at zero.
  struct PipelinePosition {
    int works = 0, tiles = 0;
  };

  // The producer warpgroup: gives its registers away, then three threads, each the first lane of its own warp,
  // copy Q, every tile's K and every tile's V of the block's works in turn. for_each_work(visit) calls
  // visit(num_tiles, copy_q, copy_keys, copy_values) per work: copy_q(dst, bar) copies its Q, copy_keys(t, dst, bar)
  // and copy_values(t, dst, bar) its tile t's K and V. A copy goes into its pipeline's next stage (Q: its one
  // buffer) once the consumers released that stage's previous content (the first use of each finds the fresh
  // barrier's parity-1 phase completed). One thread per pipeline, so that none waits behind another's stage: K,
  // released once its scores are computed, is refilled then, not after a V copy that waited for its P.V; the next
  // work's K and V are copied while its Q still waits for the current work's last scores.
  template <class ForEachWork>
  static PK_DEVICE void produce(char* shared, ForEachWork for_each_work) {
    lower_registers_to<kProducerRegisters>();
    enum Pipeline { kKeyPipeline, kValuePipeline, kQueryPipeline };
    const int pipeline = static_cast<int>(thread_index()) / 32;
    if (thread_index() % 32 != 0 || pipeline > kQueryPipeline) return;
    T* q = reinterpret_cast<T*>(shared);
    T* stages = q + kBlockM * D;
    uint64_t* bars = barriers(shared);
    // Each thread walks the works with only its own pipeline's state live: the producer runs on 24 registers.
    if (pipeline == kQueryPipeline) {
      int works = 0;
      for_each_work([&](int, auto copy_q, auto, auto) {
        mbarrier_wait(q_barrier(bars, false), (works & 1) ^ 1);
        mbarrier_arrive_expect_tx(q_barrier(bars, true), kBlockM * D * 2);
        copy_q(q, q_barrier(bars, true));
        ++works;
      });
      return;
    }
    int used = 0;  // tiles through this pipeline so far
    auto copy_tiles = [&](bool values, int num_tiles, auto copy) {
      PK_NO_UNROLL  // (unrolled, the loop's copies of its state outgrew the 24 registers: spills)
      for (int t = 0; t < num_tiles; ++t, ++used) {
        const int s = used % kStages;
        mbarrier_wait(barrier(bars, false, values, s), ((used / kStages) & 1) ^ 1);
        uint64_t* full = barrier(bars, true, values, s);
        mbarrier_arrive_expect_tx(full, kBlockN * D * 2);
        copy(t, stages + s * kStageElements + (values ? kBlockN * D : 0), full);
      }
    };
    if (pipeline == kKeyPipeline)
      for_each_work([&](int num_tiles, auto, auto copy_keys, auto) { copy_tiles(false, num_tiles, copy_keys); });
    else
      for_each_work([&](int num_tiles, auto, auto, auto copy_values) { copy_tiles(true, num_tiles, copy_values); });
  }

  // The consumer warpgroups take the registers the producer gave away (once per block, before their first work).
  static PK_DEVICE void begin_consuming() {
    if constexpr (kTma) raise_registers_to<kConsumerRegisters>();
  }

  // How the consumers' loops get tile t into shared memory and hand it back: acquire_keys(t) / acquire_values(t)
  // return once its K / V is there and visible to wgmma (every thread calls them); refill(t), called once per step
  // after acquire_keys(t), starts the copy of a later tile where the consumers copy; release_keys(t) /
  // release_values(t), by every thread of a warp, once the warp's wgmmas that read it completed; release_q() once
  // every S = QK^T wgmma of the work completed (the prologue waited for Q).
  template <int kAhead, class Load>
  struct CpAsyncFeed {  // TileRing: each step's block barrier publishes a tile and frees the one kAhead + 1 back
    int num_tiles;
    Load load;
    PK_DEVICE void prologue() { TileRing<kAhead, true>::prologue(num_tiles, load); }
    PK_DEVICE void acquire_keys(int) { TileRing<kAhead, true>::wait_for_tile(); }  // K and V together
    PK_DEVICE void acquire_values(int) {}
    PK_DEVICE void refill(int t) { TileRing<kAhead, true>::load_ahead(t, num_tiles, load); }
    PK_DEVICE void release_keys(int) {}
    PK_DEVICE void release_values(int) {}
    PK_DEVICE void release_q() {}
    PK_DEVICE int stage(int t) const { return t % kStages; }
    PK_DEVICE void finish() { cp_async_wait<0>(); }
  };
  struct TmaFeed {
    uint64_t* bars;
    bool first_lane;
    PipelinePosition position;  // tile t of this work is the pipelines' tile position.tiles + t
    PK_DEVICE int stage(int t) const { return (position.tiles + t) % kStages; }
    PK_DEVICE void prologue() { mbarrier_wait(q_barrier(bars, true), position.works & 1); }  // every work has a Q
    PK_DEVICE void acquire(int t, bool values) {
      mbarrier_wait(barrier(bars, true, values, stage(t)), ((position.tiles + t) / kStages) & 1);
    }
    PK_DEVICE void acquire_keys(int t) { acquire(t, false); }
    PK_DEVICE void acquire_values(int t) { acquire(t, true); }
    PK_DEVICE void refill(int) {}  // the producer warpgroup copies
    // One arrival per warp, once all its lanes are past their wgmma_wait (CUTLASS's pipelines arrive once per
    // warpgroup; per warp needs no more than the warp's own wait)
    PK_DEVICE void arrive(uint64_t* empty) {
      sync_warp();
      mbarrier_arrive_if(empty, first_lane);
    }
    PK_DEVICE void release(int t, bool values) {
      arrive(barrier(bars, false, values, stage(t)));
    }
    PK_DEVICE void release_keys(int t) { release(t, false); }
    PK_DEVICE void release_values(int t) { release(t, true); }
    PK_DEVICE void release_q() { arrive(q_barrier(bars, false)); }
    PK_DEVICE void finish() {}
  };

  // Issues S = Q K^T for this warpgroup's 64 rows and the tile's kKeys keys as one wgmma group (the caller fences
  // before, waits after). k-step kk reads columns [16 kk, 16 kk + 16): 32 bytes into the rows of panel kk / 4 (the
  // swizzle applies to the address, so stepping the start by 32 bytes stays inside the atom's rows); 8-row groups
  // are 1024 bytes apart.
  PK_DEVICE void issue_scores(float (&s)[kKeys / 2], const T* keys) const {
    const uint64_t q_rows = matrix_descriptor(q_tile + warp_group() * 64 * 64, 16, 1024);  // this warpgroup's rows
    const uint64_t key_rows = matrix_descriptor(keys, 16, 1024);
    PK_UNROLL
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t a = descriptor_plus(q_rows, 2 * ((kk / 4) * QLayout::kPanelElements + (kk % 4) * 16));
      const uint64_t b = descriptor_plus(key_rows, 2 * ((kk / 4) * KeyLayout::kPanelElements + (kk % 4) * 16));
      wgmma_ss<T, kKeys>(s, a, b, kk > 0);
    }
    wgmma_commit();
  }

  // The probabilities as P.V's A operand: the C layout of two 8-key tiles is the A layout of one 16-key step.
  static PK_DEVICE void pack_probabilities(const float (&s)[1][kNTiles][4], uint32_t (&p)[kKeys / 16][4]) {
    PK_UNROLL
    for (int ks = 0; ks < kKeys / 16; ++ks) {
      p[ks][0] = pack2<T>(s[0][2 * ks][0], s[0][2 * ks][1]);
      p[ks][1] = pack2<T>(s[0][2 * ks][2], s[0][2 * ks][3]);
      p[ks][2] = pack2<T>(s[0][2 * ks + 1][0], s[0][2 * ks + 1][1]);
      p[ks][3] = pack2<T>(s[0][2 * ks + 1][2], s[0][2 * ks + 1][3]);
    }
  }

  // Issues O += P V as one wgmma group: k-step ks takes keys [16 ks, 16 ks + 16), two 8-key groups (1024 bytes
  // apart) of every panel; the panels (64 columns of V each) are kBlockN * 128 bytes apart. p and O must not be
  // touched until the group is waited for.
  PK_DEVICE void issue_pv(const uint32_t (&p)[kKeys / 16][4], const T* values) {
    const uint64_t value_rows = matrix_descriptor(values, kBlockN * 128, 1024);
    PK_UNROLL
    for (int ks = 0; ks < kKeys / 16; ++ks)
      wgmma_rs_mn_major_b<T, D>(output(), p[ks], descriptor_plus(value_rows, 2 * ks * 16 * 64), true);
    wgmma_commit();
  }

  PK_DEVICE float (&output())[D / 2] { return *reinterpret_cast<float(*)[D / 2]>(&acc[0][0][0]); }

  // Swaps in the wgmma loop (kOverlap: FA3's intra-warpgroup overlap, else one tile after another) and the feed.
  // `position`: where this work starts in the TMA pipelines (the cp.async feed starts afresh each work).
  template <class Tiles, class Visible>
  PK_DEVICE void run(int num_tiles, Tiles tile, float scale_log2, Visible visible, int rows_in_use,
                     PipelinePosition position = {}) {
    auto load = [&](int t) { load_tile_async(t % kStages, tile(t)); };
    if constexpr (kTma) {
      TmaFeed feed{barriers(reinterpret_cast<char*>(q_tile)), this->lane == 0, position};
      if constexpr (kOverlap)
        run_overlapped(num_tiles, feed, tile, scale_log2, visible, rows_in_use);
      else
        run_in_turn(num_tiles, feed, tile, scale_log2, visible, rows_in_use);
    } else if constexpr (kOverlap) {
      // step t reads K(t) and V(t - 1) while tile t + 1 loads: after step t's barrier every warp is done with t - 2
      static_assert(kStages >= 3, "steps read two tiles while a third loads");
      run_overlapped(num_tiles, CpAsyncFeed<kStages - 2, decltype(load)>{num_tiles, load}, tile, scale_log2,
                     visible, rows_in_use);
    } else {  // after step t's barrier every warp is done with tile t - 1
      run_in_turn(num_tiles, CpAsyncFeed<kStages - 1, decltype(load)>{num_tiles, load}, tile, scale_log2, visible,
                  rows_in_use);
    }
  }

  // BlockAttention::run_ring with these tiles: scores, softmax, P.V, one tile after another. A warpgroup whose 64
  // rows are all padding skips the math (wgmma is issued by whole warpgroups), not the feed's steps.
  template <class Feed, class Tiles, class Visible>
  PK_DEVICE void run_in_turn(int num_tiles, Feed feed, Tiles tile, float scale_log2, Visible visible,
                             int rows_in_use) {
    const bool busy = warp_group() * 64 < rows_in_use;  // the same in the whole warpgroup
    feed.prologue();
    for (int t = 0; t < num_tiles; ++t) {
      feed.acquire_keys(t);
      feed.refill(t);
      if (busy) {
        const T* keys = keys_in(feed.stage(t));
        float s[1][kNTiles][4];
        float(&scores)[kKeys / 2] = *reinterpret_cast<float(*)[kKeys / 2]>(&s[0][0][0]);
        fence_operand(scores);
        wgmma_fence();
        issue_scores(scores, keys);
        wgmma_wait<0>();
        fence_operand(scores);
        feed.release_keys(t);
        mask(s, tile(t), visible);
        softmax(s, scale_log2);
        uint32_t p[kKeys / 16][4];
        pack_probabilities(s, p);
        feed.acquire_values(t);
        fence_operand(output());
        fence_operand(p);
        wgmma_fence();
        issue_pv(p, values_in(feed.stage(t)));
        wgmma_wait<0>();
        fence_operand(output());
        fence_operand(p);
      } else {
        feed.release_keys(t);
        feed.acquire_values(t);
      }
      feed.release_values(t);
    }
    feed.release_q();
    feed.finish();
  }

  // FlashAttention-3's intra-warpgroup overlap: tile t's scores are issued together with tile t - 1's P.V, and
  // tile t's softmax runs while that P.V is still on the tensor cores; only the rescaling of O waits for it.
  // Step t reads K(t) and V(t - 1), so a ring needs a third stage for the tile loaded ahead (t + 1); tile t - 1 is
  // released once its P.V completed in step t.
  template <class Feed, class Tiles, class Visible>
  PK_DEVICE void run_overlapped(int num_tiles, Feed feed, Tiles tile, float scale_log2, Visible visible,
                                int rows_in_use) {
    const bool busy = warp_group() * 64 < rows_in_use;  // the same in the whole warpgroup
    feed.prologue();
    let_warp_group_0_start(num_tiles);
    float s[1][kNTiles][4];
    float(&scores)[kKeys / 2] = *reinterpret_cast<float(*)[kKeys / 2]>(&s[0][0][0]);
    uint32_t p[kKeys / 16][4];  // tile t - 1's probabilities: the A operand of its P.V
    // Each step's branches stay outside the wgmma sequence (ptxas serializes wgmma in divergent paths, C7520): the
    // first step, which has no P.V to overlap, is peeled off.
    if (num_tiles > 0) {
      feed.acquire_keys(0);
      if (busy) {
        fence_operand(scores);
        wgmma_fence();
        take_turn();
        issue_scores(scores, keys_in(feed.stage(0)));
        pass_turn(false);
        feed.refill(0);
        wgmma_wait<0>();
        fence_operand(scores);
        feed.release_keys(0);
        mask(s, tile(0), visible);
        float alpha[kRows];
        probabilities(s, scale_log2, alpha);
        pack_probabilities(s, p);  // (O is still zero: nothing to rescale)
      } else {
        skip_turn(false);
        feed.refill(0);
        feed.release_keys(0);
      }
    }
    for (int t = 1; t < num_tiles; ++t) {
      feed.acquire_keys(t);
      // (a wait between the two wgmma issues, as FA3 has it, made ptxas serialize them: C7520)
      feed.acquire_values(t - 1);
      if (busy) {
        // the last step's register writes (O rescaled, p packed, s read) stay above the fence
        fence_operand(scores);
        fence_operand(output());
        fence_operand(p);
        wgmma_fence();
        take_turn();
        issue_scores(scores, keys_in(feed.stage(t)));
        issue_pv(p, values_in(feed.stage(t - 1)));
        pass_turn(false);
        feed.refill(t);  // the copies start while the tensor cores run
        wgmma_wait<1>();  // the scores landed (groups complete in order); the P.V may still run
        fence_operand(scores);
        feed.release_keys(t);
        mask(s, tile(t), visible);
        float alpha[kRows];
        probabilities(s, scale_log2, alpha);
        wgmma_wait<0>();  // tile t - 1's P.V landed: O may be rescaled, p rewritten
        fence_operand(output());
        fence_operand(p);
        feed.release_values(t - 1);
        rescale(alpha);
        pack_probabilities(s, p);
      } else {
        skip_turn(false);
        feed.refill(t);
        feed.release_keys(t);
        feed.release_values(t - 1);
      }
    }
    feed.release_q();  // every S = QK^T wgmma was waited for (the last in the last step)
    if (num_tiles > 0) {  // the last tile's P.V
      feed.acquire_values(num_tiles - 1);
      if (busy) {
        fence_operand(output());
        fence_operand(p);
        wgmma_fence();
        take_turn();
        issue_pv(p, values_in(feed.stage(num_tiles - 1)));
        pass_turn(true);
        wgmma_wait<0>();
        fence_operand(output());
        fence_operand(p);
      } else {
        skip_turn(true);
      }
      feed.release_values(num_tiles - 1);
    }
    feed.finish();
  }
};

}  // namespace pk
