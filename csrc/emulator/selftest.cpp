// Self-test of the CUDA emulator (csrc/emulator/emulator.cpp). Returns non-zero on failure, printing what failed.
// Build: g++ -std=c++17 -O1 -I/usr/local/cuda/include -I csrc csrc/emulator/selftest.cpp csrc/emulator/emulator.cpp
//
// The emulator computes the mma / ldmatrix fragment layouts from the PTX ISA text. This test distributes and gathers
// fragments with the layouts CUTLASS CuTe gives for the same instructions instead (a second, independent source):
//   include/cute/atom/mma_traits_sm80.hpp, SM80_16x8x16_F32F16F16F32_TN (and the BF16 one, same layouts):
//     ALayout = ((4,8),(2,2,2)) : ((32,1),(16,8,128))   (thread, value) -> m + 16*k   in the 16x16 A
//     BLayout = ((4,8),(2,2))   : ((16,1),(8,64))       (thread, value) -> n + 8*k    in the 8x16  B^T
//     CLayout = ((4,8),(2,2))   : ((32,1),(16,8))       (thread, value) -> m + 16*n   in the 16x8  C/D
//   include/cute/atom/copy_traits_sm75.hpp:
//     SM75_U32x4_LDSM_N  DstLayout = (32,(32,4)) : (32,(1,1024))                  (thread, bit, register) -> bit
//     SM75_U16x8_LDSM_T  DstLayout = ((4,8),(16,2,4)) : ((256,16),(1,128,1024))   (thread, (bit, half, register)) -> bit
//     SrcLayout = (32,128) : (128,1): thread s supplies bits [128 s, 128 s + 128), the 16-byte row at its address.
// Value v of a (thread, value) layout is half (v % 2) of 32-bit register v / 2 (values are stored in that order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulator.h"

#if __has_include("platform.h")
#define PK_EMULATE 1
#include "platform.h"
#define HAVE_PLATFORM_H 1
#endif

using pk_emu::Dim3;
using pk_emu::Element;

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    ++g_checks;                                                  \
    if (!(cond)) {                                               \
      ++g_failures;                                              \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                  \
      std::printf("\n");                                         \
    }                                                            \
  } while (0)

// Runs `fn`, which must throw std::runtime_error whose message contains every one of `needles`.
void expect_error(const char* what, const std::function<void()>& fn, std::vector<std::string> needles) {
  ++g_checks;
  try {
    fn();
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    for (const std::string& n : needles) {
      if (msg.find(n) == std::string::npos) {
        ++g_failures;
        std::printf("FAIL %s: message lacks \"%s\": %s\n", what, n.c_str(), msg.c_str());
        return;
      }
    }
    std::printf("  ok %s -> %s\n", what, msg.c_str());
    return;
  } catch (const std::exception& e) {
    ++g_failures;
    std::printf("FAIL %s: threw a non-runtime_error: %s\n", what, e.what());
    return;
  }
  ++g_failures;
  std::printf("FAIL %s: did not throw\n", what);
}

uint16_t f16_bits(float x) {
  __half h = __float2half_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
uint16_t bf16_bits(float x) {
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float f16_value(uint16_t u) {
  __half h;
  std::memcpy(static_cast<void*>(&h), &u, 2);
  return __half2float(h);
}
float bf16_value(uint16_t u) {
  __nv_bfloat16 h;
  std::memcpy(static_cast<void*>(&h), &u, 2);
  return __bfloat162float(h);
}
uint16_t to_bits(float x, Element t) { return t == Element::f16 ? f16_bits(x) : bf16_bits(x); }
float to_value(uint16_t u, Element t) { return t == Element::f16 ? f16_value(u) : bf16_value(u); }
const char* name(Element t) { return t == Element::f16 ? "f16" : "bf16"; }

void set_half(uint32_t& reg, unsigned which, uint16_t v) {
  reg = which ? (reg & 0x0000FFFFu) | (uint32_t(v) << 16) : (reg & 0xFFFF0000u) | v;
}
uint16_t get_half(uint32_t reg, unsigned which) { return static_cast<uint16_t>(reg >> (16 * which)); }

// CuTe layouts (see the header comment). t0 = lane % 4, t1 = lane / 4.
void cute_a(unsigned lane, unsigned v, unsigned& m, unsigned& k) {
  const unsigned idx = 32 * (lane % 4) + (lane / 4) + 16 * (v % 2) + 8 * ((v / 2) % 2) + 128 * (v / 4);
  m = idx % 16;
  k = idx / 16;
}
void cute_b(unsigned lane, unsigned v, unsigned& n, unsigned& k) {
  const unsigned idx = 16 * (lane % 4) + (lane / 4) + 8 * (v % 2) + 64 * (v / 2);
  n = idx % 8;
  k = idx / 8;
}
void cute_c(unsigned lane, unsigned v, unsigned& m, unsigned& n) {
  const unsigned idx = 32 * (lane % 4) + (lane / 4) + 16 * (v % 2) + 8 * (v / 2);
  m = idx % 16;
  n = idx / 16;
}
// ldmatrix: which lane's row and which b16 element of that row lands in half `h` of register `reg` of `lane`.
void cute_ldsm_n(unsigned lane, unsigned reg, unsigned h, unsigned& src_lane, unsigned& element) {
  const unsigned bit = 32 * lane + 16 * h + 1024 * reg;
  src_lane = bit / 128;
  element = (bit % 128) / 16;
}
void cute_ldsm_t(unsigned lane, unsigned reg, unsigned h, unsigned& src_lane, unsigned& element) {
  const unsigned bit = 256 * (lane % 4) + 16 * (lane / 4) + 128 * h + 1024 * reg;
  src_lane = bit / 128;
  element = (bit % 128) / 16;
}

void test_layout_coverage() {
  int a_seen[16][16] = {}, b_seen[8][16] = {}, c_seen[16][8] = {};
  for (unsigned l = 0; l < 32; ++l) {
    unsigned x, y;
    for (unsigned v = 0; v < 8; ++v) cute_a(l, v, x, y), ++a_seen[x][y];
    for (unsigned v = 0; v < 4; ++v) cute_b(l, v, x, y), ++b_seen[x][y];
    for (unsigned v = 0; v < 4; ++v) cute_c(l, v, x, y), ++c_seen[x][y];
  }
  bool ok = true;
  for (auto& r : a_seen) for (int s : r) ok &= s == 1;
  for (auto& r : b_seen) for (int s : r) ok &= s == 1;
  for (auto& r : c_seen) for (int s : r) ok &= s == 1;
  CHECK(ok, "the test's CuTe layouts do not cover each element exactly once");
}

// (0) Every f16 / bf16 bit pattern goes through the mma as cuda_fp16.h / cuda_bf16.h decode it:
// A[m][m] = pattern, B[k][0] = 1, so D[m][0] = pattern's value.
void test_conversions(Element type) {
  std::vector<float> got(65536);
  const uint16_t one = to_bits(1.0f, type);
  pk_emu::launch(Dim3{}, 32, 0, [&] {
    const unsigned lane = pk_emu::thread_index();
    for (unsigned base = 0; base < 65536; base += 16) {
      uint32_t a[4] = {}, b[2] = {};
      float c[4] = {}, d[4];
      for (unsigned v = 0; v < 8; ++v) {
        unsigned m, k;
        cute_a(lane, v, m, k);
        set_half(a[v / 2], v % 2, m == k ? static_cast<uint16_t>(base + m) : 0);
      }
      for (unsigned v = 0; v < 4; ++v) {
        unsigned n, k;
        cute_b(lane, v, n, k);
        set_half(b[v / 2], v % 2, n == 0 ? one : 0);
      }
      pk_emu::mma_m16n8k16(d, a, b, c, type);
      for (unsigned v = 0; v < 4; ++v) {
        unsigned m, n;
        cute_c(lane, v, m, n);
        if (n == 0) got[base + m] = d[v];
      }
    }
  });
  int bad = 0;
  for (unsigned u = 0; u < 65536; ++u) {
    const float want = to_value(static_cast<uint16_t>(u), type);
    const bool same = (std::isnan(want) && std::isnan(got[u])) || want == got[u];
    if (!same && bad++ < 5) std::printf("    %s 0x%04x: emulator %g, cuda header %g\n", name(type), u, got[u], want);
  }
  CHECK(bad == 0, "%s: %d of 65536 bit patterns decode differently from the CUDA headers", name(type), bad);
}

// (1) mma against a double matmul, fragments distributed with CuTe's layouts.
void test_mma_random(Element type, std::mt19937& rng, bool alias_c) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int trial = 0; trial < 8; ++trial) {
    uint16_t A[16][16], Bt[8][16];  // Bt = B^T, 8x16 row-major ("col" B)
    float C[16][8], D[16][8];
    for (auto& r : A) for (auto& x : r) x = to_bits(dist(rng) * (trial == 7 ? 100.0f : 1.0f), type);
    for (auto& r : Bt) for (auto& x : r) x = to_bits(dist(rng), type);
    for (auto& r : C) for (auto& x : r) x = trial == 0 ? 0.0f : dist(rng);
    for (auto& r : D) for (auto& x : r) x = std::nanf("");
    pk_emu::launch(Dim3{}, 32, 0, [&] {
      const unsigned lane = pk_emu::thread_index();
      uint32_t a[4] = {}, b[2] = {};
      float c[4], d[4];
      for (unsigned v = 0; v < 8; ++v) {
        unsigned m, k;
        cute_a(lane, v, m, k);
        set_half(a[v / 2], v % 2, A[m][k]);
      }
      for (unsigned v = 0; v < 4; ++v) {
        unsigned n, k;
        cute_b(lane, v, n, k);
        set_half(b[v / 2], v % 2, Bt[n][k]);
      }
      for (unsigned v = 0; v < 4; ++v) {
        unsigned m, n;
        cute_c(lane, v, m, n);
        c[v] = C[m][n];
      }
      if (alias_c) {
        pk_emu::mma_m16n8k16(c, a, b, c, type);
        for (int i = 0; i < 4; ++i) d[i] = c[i];
      } else {
        pk_emu::mma_m16n8k16(d, a, b, c, type);
      }
      for (unsigned v = 0; v < 4; ++v) {
        unsigned m, n;
        cute_c(lane, v, m, n);
        D[m][n] = d[v];
      }
    });
    double worst = 0;
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 8; ++n) {
        double ref = C[m][n], mag = std::fabs(C[m][n]);
        for (int k = 0; k < 16; ++k) {
          const double p = double(to_value(A[m][k], type)) * double(to_value(Bt[n][k], type));
          ref += p;
          mag += std::fabs(p);
        }
        worst = std::fmax(worst, std::fabs(D[m][n] - ref) / (mag + 1e-30));
        if (!(std::fabs(D[m][n] - ref) <= 1e-6 * mag + 1e-30)) worst = INFINITY;
      }
    }
    CHECK(worst <= 1e-6, "mma %s%s trial %d: relative error %g", name(type), alias_c ? " (d aliases c)" : "", trial,
          worst);
  }
}

// (2a) ldmatrix x4 / x4.trans from scattered row addresses against CuTe's distribution.
void test_ldmatrix(bool trans, std::mt19937& rng) {
  constexpr unsigned kRows = 64, kCols = 40;  // b16 elements; a row is 80 bytes, so every 8th element is 16B aligned
  constexpr size_t kBytes = kRows * kCols * 2;
  std::vector<unsigned> row_of(32), block_of(32);
  std::vector<unsigned> perm(kRows);
  for (unsigned i = 0; i < kRows; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  for (unsigned l = 0; l < 32; ++l) {
    row_of[l] = perm[l];
    block_of[l] = rng() % (kCols / 8);
  }
  uint32_t got[32][4];
  pk_emu::launch(Dim3{}, 32, kBytes, [&] {
    const unsigned lane = pk_emu::thread_index();
    uint16_t* s = reinterpret_cast<uint16_t*>(pk_emu::shared_memory());
    for (unsigned i = lane; i < kRows * kCols; i += 32) s[i] = static_cast<uint16_t>(i);
    pk_emu::sync_threads();
    pk_emu::ldmatrix_x4(got[lane], s + row_of[lane] * kCols + 8 * block_of[lane], trans);
  });
  int bad = 0;
  for (unsigned l = 0; l < 32; ++l) {
    for (unsigned reg = 0; reg < 4; ++reg) {
      for (unsigned h = 0; h < 2; ++h) {
        unsigned src, e;
        (trans ? cute_ldsm_t : cute_ldsm_n)(l, reg, h, src, e);
        const unsigned want = row_of[src] * kCols + 8 * block_of[src] + e;
        if (get_half(got[l][reg], h) != want && bad++ < 5)
          std::printf("    lane %u r[%u] half %u: got element %u, want %u\n", l, reg, h, get_half(got[l][reg], h), want);
      }
    }
  }
  CHECK(bad == 0, "ldmatrix_x4%s: %d halves differ from CuTe's SM75_%s layout", trans ? ".trans" : "", bad,
        trans ? "U16x8_LDSM_T" : "U32x4_LDSM_N");
}

// (2b) ldmatrix + mma as a flash-attention kernel composes them: S = Q K^T with Q [16][16] and K [16 n][16 k]
// (non-trans ldmatrix for B), and O = P V with V [16 k][16 n] (ldmatrix .trans for B). Both give a 16x16 product.
void test_ldmatrix_mma(Element type, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  constexpr unsigned kStride = 24;  // b16 elements per smem row (48 bytes: padded, still 16B aligned)
  uint16_t Q[16][16], K[16][16], V[16][16];
  for (auto& r : Q) for (auto& x : r) x = to_bits(dist(rng), type);
  for (auto& r : K) for (auto& x : r) x = to_bits(dist(rng), type);
  for (auto& r : V) for (auto& x : r) x = to_bits(dist(rng), type);
  float S[16][16], O[16][16];
  pk_emu::launch(Dim3{}, 32, 3 * 16 * kStride * 2, [&] {
    const unsigned lane = pk_emu::thread_index();
    uint16_t* sq = reinterpret_cast<uint16_t*>(pk_emu::shared_memory());
    uint16_t* sk = sq + 16 * kStride;
    uint16_t* sv = sk + 16 * kStride;
    for (unsigned i = lane; i < 256; i += 32) {
      sq[(i / 16) * kStride + i % 16] = Q[i / 16][i % 16];
      sk[(i / 16) * kStride + i % 16] = K[i / 16][i % 16];
      sv[(i / 16) * kStride + i % 16] = V[i / 16][i % 16];
    }
    pk_emu::sync_threads();
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3].
    uint32_t a[4];
    pk_emu::ldmatrix_x4(a, sq + (lane % 16) * kStride + (lane / 16) * 8, false);
    // B = K^T from K [n][k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
    uint32_t bk[4];
    pk_emu::ldmatrix_x4(bk, sk + ((lane % 8) + 8 * (lane / 16)) * kStride + 8 * ((lane / 8) % 2), false);
    // B = V from V [k][n] with .trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
    uint32_t bv[4];
    pk_emu::ldmatrix_x4(bv, sv + ((lane % 8) + 8 * ((lane / 8) % 2)) * kStride + 8 * (lane / 16), true);
    for (unsigned half = 0; half < 2; ++half) {  // n 0-7, then n 8-15
      const float zero[4] = {0, 0, 0, 0};
      float s[4], o[4];
      const uint32_t b1[2] = {bk[2 * half], bk[2 * half + 1]};
      const uint32_t b2[2] = {bv[2 * half], bv[2 * half + 1]};
      pk_emu::mma_m16n8k16(s, a, b1, zero, type);
      pk_emu::mma_m16n8k16(o, a, b2, zero, type);
      for (unsigned v = 0; v < 4; ++v) {
        unsigned m, n;
        cute_c(lane, v, m, n);
        S[m][8 * half + n] = s[v];
        O[m][8 * half + n] = o[v];
      }
    }
  });
  double worst_s = 0, worst_o = 0;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      double rs = 0, ro = 0, ms = 0, mo = 0;
      for (int k = 0; k < 16; ++k) {
        const double q = to_value(Q[m][k], type);
        rs += q * to_value(K[n][k], type);
        ms += std::fabs(q * to_value(K[n][k], type));
        ro += q * to_value(V[k][n], type);
        mo += std::fabs(q * to_value(V[k][n], type));
      }
      worst_s = std::fmax(worst_s, std::fabs(S[m][n] - rs) / (ms + 1e-30));
      worst_o = std::fmax(worst_o, std::fabs(O[m][n] - ro) / (mo + 1e-30));
      if (std::isnan(S[m][n])) worst_s = INFINITY;
      if (std::isnan(O[m][n])) worst_o = INFINITY;
    }
  }
  CHECK(worst_s <= 1e-6, "ldmatrix + mma %s, Q K^T (K [n][k], non-trans): relative error %g", name(type), worst_s);
  CHECK(worst_o <= 1e-6, "ldmatrix + mma %s, Q V (V [k][n], .trans): relative error %g", name(type), worst_o);
}

// (3) shfl_xor: butterfly sum over the warp, max over groups of 4 lanes, and masks outside the warp.
// (5) wgmma (sm_90a) against a double matmul, operands placed and fragments distributed with CuTe's layouts
// (include/cute/atom/mma_traits_sm90_gmma.hpp; the MN-major layout as CuTe's tile_to_shape(Layout_MN_SW128_Atom,
// (128, 64), Step<_2, _1>) prints it, FlashAttention-3's V^T, and make_gmma_desc's LBO / SBO for it):
//   CLayout_64xN = ((4,8,4),(2,2,N/8)) : ((128,1,16),(64,8,512))   (thread, value) -> m + 64 n;  ALayout_64x16 the same
//   Layout_K_SW128_Atom  = Swizzle<3,4,3> o (8,64):(64,1)   in bf16/f16 elements, the swizzle on byte addresses
//   MN-major, 64 keys x 128 columns: ((64,2),(8,8)) : ((1,4096),(64,512)), LBO = 8192 B, SBO = 1024 B
unsigned swizzle128(unsigned byte) { return byte ^ ((byte & 0x380u) >> 3); }
void cute_c64(unsigned thread, unsigned v, unsigned& m, unsigned& n) {
  m = 16 * (thread / 32) + (thread % 32) / 4 + 8 * ((v / 2) % 2);
  n = 2 * (thread % 4) + v % 2 + 8 * (v / 4);
}
uint64_t descriptor(unsigned offset, unsigned leading, unsigned stride) {
  return uint64_t(offset >> 4) | (uint64_t(leading >> 4) << 16) | (uint64_t(stride >> 4) << 32) | (uint64_t(1) << 62);
}

void test_wgmma(Element type, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  constexpr unsigned kA = 0, kB = 8192, kV = 24576, kBytes = 40960;  // A [64][64], B [128][64], V [64][128]
  std::vector<uint16_t> A(64 * 64), B(128 * 64), V(64 * 128);    // A[m][k], B[n][k] (K-major), V[key][n]
  std::vector<float> C(64 * 128), D_ss(64 * 128, NAN), D_rs(64 * 128, NAN);
  for (auto& x : A) x = to_bits(dist(rng), type);
  for (auto& x : B) x = to_bits(dist(rng), type);
  for (auto& x : V) x = to_bits(dist(rng), type);
  for (auto& x : C) x = dist(rng);
  int nan_before_wait = 0;
  pk_emu::launch(Dim3{}, 128, kBytes, [&] {
    const unsigned t = pk_emu::thread_index();
    char* smem = pk_emu::shared_memory();
    auto put = [&](unsigned byte, uint16_t v) { std::memcpy(smem + swizzle128(byte), &v, 2); };
    if (t == 0) {  // plain stores (the emulator tracks only cp.async copies for the async proxy)
      for (unsigned m = 0; m < 64; ++m)
        for (unsigned k = 0; k < 64; ++k) put(kA + 2 * (m * 64 + k), A[m * 64 + k]);
      for (unsigned n = 0; n < 128; ++n)
        for (unsigned k = 0; k < 64; ++k) put(kB + 2 * (n * 64 + k), B[n * 64 + k]);
      for (unsigned key = 0; key < 64; ++key)
        for (unsigned n = 0; n < 128; ++n)
          put(kV + 2 * (n % 64 + (n / 64) * 4096 + (key % 8) * 64 + (key / 8) * 512), V[key * 128 + n]);
    }
    pk_emu::sync_threads();
    float d[64];
    for (unsigned v = 0; v < 64; ++v) {
      unsigned m, n;
      cute_c64(t, v, m, n);
      d[v] = C[m * 128 + n];
    }
    // SS: D = C + A B^T over 4 k-steps, each 32 bytes further into the 128-byte rows.
    pk_emu::wgmma_fence();
    for (unsigned kk = 0; kk < 4; ++kk)
      pk_emu::wgmma_m64k16(d, 128, nullptr, descriptor(kA + 32 * kk, 16, 1024), descriptor(kB + 32 * kk, 16, 1024),
                           true, false, type);
    pk_emu::wgmma_commit();
    if (std::isnan(d[0])) ++nan_before_wait;
    pk_emu::wgmma_wait(0);
    for (unsigned v = 0; v < 64; ++v) {
      unsigned m, n;
      cute_c64(t, v, m, n);
      D_ss[m * 128 + n] = d[v];
    }
    // RS: D = A V, A from registers (ALayout_64x16), V MN-major, k-steps of 16 keys 2048 bytes apart.
    uint32_t a[4][4] = {};  // each k-step's own registers: wgmma reads them until the wait
    pk_emu::wgmma_fence();
    for (unsigned ks = 0; ks < 4; ++ks) {
      for (unsigned v = 0; v < 8; ++v) {
        unsigned m, k;
        cute_c64(t, v, m, k);  // the A layout is CLayout_64x16
        set_half(a[ks][v / 2], v % 2, A[m * 64 + 16 * ks + k]);
      }
      pk_emu::wgmma_m64k16(d, 128, a[ks], 0, descriptor(kV + 2048 * ks, 8192, 1024), ks > 0, true, type);
    }
    pk_emu::wgmma_commit();
    pk_emu::wgmma_wait(0);
    for (unsigned v = 0; v < 64; ++v) {
      unsigned m, n;
      cute_c64(t, v, m, n);
      D_rs[m * 128 + n] = d[v];
    }
  });
  double worst_ss = 0, worst_rs = 0;
  for (unsigned m = 0; m < 64; ++m)
    for (unsigned n = 0; n < 128; ++n) {
      double ss = C[m * 128 + n], ss_mag = std::fabs(ss), rs = 0, rs_mag = 0;
      for (unsigned k = 0; k < 64; ++k) {
        const double p = double(to_value(A[m * 64 + k], type)) * to_value(B[n * 64 + k], type);
        const double q = double(to_value(A[m * 64 + k], type)) * to_value(V[k * 128 + n], type);
        ss += p, ss_mag += std::fabs(p), rs += q, rs_mag += std::fabs(q);
      }
      const double e_ss = std::fabs(D_ss[m * 128 + n] - ss) / ss_mag, e_rs = std::fabs(D_rs[m * 128 + n] - rs) / rs_mag;
      worst_ss = e_ss <= worst_ss ? worst_ss : (std::isnan(e_ss) ? INFINITY : e_ss);
      worst_rs = e_rs <= worst_rs ? worst_rs : (std::isnan(e_rs) ? INFINITY : e_rs);
    }
  CHECK(worst_ss <= 1e-6, "wgmma %s, SS (K-major A and B): relative error %g", name(type), worst_ss);
  CHECK(worst_rs <= 1e-6, "wgmma %s, RS (MN-major B): relative error %g", name(type), worst_rs);
  CHECK(nan_before_wait == 128, "wgmma %s: %d of 128 threads saw NaN accumulators before the wait", name(type),
        nan_before_wait);
}

// wgmma's ordering rules: a fence before the first wgmma, and cp.async copies handed to the async proxy.
void test_wgmma_rules() {
  constexpr unsigned kBytes = 24576;
  alignas(16) static uint16_t source[kBytes / 2] = {};
  auto run = [&](bool fence, bool proxy_fence, bool refill_early = false, bool warp_skips = false,
                 bool write_a_early = false) {
    pk_emu::launch(Dim3{}, 128, kBytes, [&] {
      const unsigned t = pk_emu::thread_index();
      char* smem = pk_emu::shared_memory();
      for (unsigned c = t; c < kBytes / 16; c += 128) pk_emu::cp_async_16(smem + 16 * c, source + 8 * c, true);
      pk_emu::cp_async_commit();
      pk_emu::cp_async_wait(0);
      if (proxy_fence) pk_emu::fence_proxy_async();
      pk_emu::sync_threads();
      float d[64];
      uint32_t a[4] = {};
      if (fence) pk_emu::wgmma_fence();
      if (!(warp_skips && t / 32 == 2))
        pk_emu::wgmma_m64k16(d, 128, nullptr, descriptor(0, 16, 1024), descriptor(8192, 16, 1024), false, false,
                             Element::f16);
      pk_emu::wgmma_m64k16(d, 128, a, 0, descriptor(8192, 8192, 1024), true, true, Element::f16);
      if (write_a_early) a[1] = 7;
      pk_emu::wgmma_commit();
      if (refill_early && t == 64) pk_emu::cp_async_16(smem + 8192 + 1024, source, true);  // B, still being read
      pk_emu::wgmma_wait(0);
      pk_emu::sync_threads();
      if (t == 64) pk_emu::cp_async_16(smem + 8192 + 1024, source, true);  // every warp waited: free again
      pk_emu::cp_async_commit();
      pk_emu::cp_async_wait(0);
    });
  };
  run(true, true);
  expect_error("wgmma without wgmma_fence", [&] { run(false, true); }, {"without a wgmma_fence"});
  expect_error("wgmma of copies not handed to the async proxy", [&] { run(true, false); },
               {"no fence_proxy_async"});
  expect_error("cp.async into an operand of a wgmma not waited for", [&] { run(true, true, true); },
               {"thread 64", "cp_async_16 into shared offset 9216", "still reads"});
  expect_error("a warp of a warpgroup skips a wgmma", [&] { run(true, true, false, true); },
               {"warps 0-3 (a warpgroup) issued different wgmma sequences"});
  expect_error("A registers written before the wait", [&] { run(true, true, false, false, true); },
               {"A registers of a wgmma were overwritten"});
}

// (6) TMA + mbarrier (sm_90), as a producer warp feeds a consumer warpgroup: the producer (warp 4) copies A [64][64]
// (rows 10.. of a [70][64] tensor) and B [128][64] (the second [100][72] slice of a 3-d tensor: rows past 100 read as
// zeros, columns 64.. are never read) with the 128-byte swizzle; the consumers wait for the barrier and run wgmma SS
// on them: the TMA's swizzled placement must be the one wgmma's descriptors read.
void test_tma_wgmma(Element type, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  constexpr unsigned kA = 0, kB = 8192, kFull = 24576, kEmpty = 24584, kBytes = 24592;
  std::vector<uint16_t> A(70 * 64), B(2 * 100 * 72);
  for (auto& x : A) x = to_bits(dist(rng), type);
  for (auto& x : B) x = to_bits(dist(rng), type);
  pk_emu::TensorMap a_map, b_map;
  const uint64_t a_dims[2] = {64, 70}, a_strides[1] = {128}, b_dims[3] = {64, 100, 2}, b_strides[2] = {144, 14400};
  const uint32_t a_box[2] = {64, 64}, b_box[3] = {64, 128, 1};
  CHECK(pk_emu::encode_tensor_map(a_map, A.data(), 2, a_dims, a_strides, a_box, true).empty(), "encode A");
  CHECK(pk_emu::encode_tensor_map(b_map, B.data(), 3, b_dims, b_strides, b_box, true).empty(), "encode B");
  std::vector<float> D(64 * 128, NAN);
  bool fresh_parity_one_passed = false;
  pk_emu::launch(Dim3{}, 160, kBytes, [&] {
    const unsigned t = pk_emu::thread_index();
    char* smem = pk_emu::shared_memory();
    if (t == 0) {
      pk_emu::mbarrier_init(smem + kFull, 1);
      pk_emu::mbarrier_init(smem + kEmpty, 128);
    }
    pk_emu::sync_threads();
    if (t >= 128) {  // the producer warp: one thread issues, then waits until the consumers are done
      if (t == 128) {
        pk_emu::mbarrier_wait(smem + kEmpty, 1);  // a fresh barrier: the phase of parity 1 counts as completed
        fresh_parity_one_passed = true;
        pk_emu::mbarrier_arrive_expect_tx(smem + kFull, 8192 + 16384);
        const int32_t a_at[2] = {0, 6}, b_at[3] = {0, 0, 1};
        pk_emu::tma_load(smem + kA, a_map, smem + kFull, a_at);
        pk_emu::tma_load(smem + kB, b_map, smem + kFull, b_at);
        pk_emu::mbarrier_wait(smem + kEmpty, 0);
      }
      return;
    }
    pk_emu::mbarrier_wait(smem + kFull, 0);
    float d[64];
    pk_emu::wgmma_fence();
    for (unsigned kk = 0; kk < 4; ++kk)
      pk_emu::wgmma_m64k16(d, 128, nullptr, descriptor(kA + 32 * kk, 16, 1024), descriptor(kB + 32 * kk, 16, 1024),
                           kk > 0, false, type);
    pk_emu::wgmma_commit();
    pk_emu::wgmma_wait(0);
    pk_emu::mbarrier_arrive(smem + kEmpty);
    for (unsigned v = 0; v < 64; ++v) {
      unsigned m, n;
      cute_c64(t, v, m, n);
      D[m * 128 + n] = d[v];
    }
  });
  double worst = 0;
  for (unsigned m = 0; m < 64; ++m)
    for (unsigned n = 0; n < 128; ++n) {
      double sum = 0, magnitude = 1e-30;
      for (unsigned k = 0; k < 64 && n < 100; ++k) {
        const double p = double(to_value(A[(m + 6) * 64 + k], type)) * to_value(B[(100 + n) * 72 + k], type);
        sum += p, magnitude += std::fabs(p);
      }
      const double e = std::fabs(D[m * 128 + n] - sum) / magnitude;
      worst = e <= worst ? worst : (std::isnan(e) ? INFINITY : e);
    }
  CHECK(fresh_parity_one_passed, "TMA: a fresh mbarrier's wait for parity 1 returned");
  CHECK(worst <= 1e-6, "TMA + wgmma %s: relative error %g (rows past the tensor must read as zeros)", name(type),
        worst);
}

// The rules of the barriers and of TMA copies, each broken once.
void test_tma_rules() {
  alignas(16) static uint16_t source[64 * 64] = {};
  pk_emu::TensorMap map;
  const uint64_t dims[2] = {64, 64}, strides[1] = {128};
  const uint32_t box[2] = {64, 64};
  CHECK(pk_emu::encode_tensor_map(map, source, 2, dims, strides, box, true).empty(), "encode");
  const uint64_t odd_strides[1] = {120}, wide_dims[2] = {128, 64};
  const uint32_t wide_box[2] = {128, 64};
  CHECK(pk_emu::encode_tensor_map(map, source, 2, dims, odd_strides, box, true).find("multiple of 16") !=
            std::string::npos, "encode: a stride of 120 bytes is refused");
  CHECK(pk_emu::encode_tensor_map(map, source + 1, 2, dims, strides, box, true).find("16-byte aligned") !=
            std::string::npos, "encode: a misaligned base is refused");
  CHECK(pk_emu::encode_tensor_map(map, source, 2, wide_dims, strides, wide_box, true).find("over 128 bytes") !=
            std::string::npos, "encode: a 256-byte inner box under the 128-byte swizzle is refused");
  CHECK(pk_emu::encode_tensor_map(map, source, 2, dims, strides, box, true).empty(), "encode again");
  constexpr unsigned kFull = 16384, kOther = 16392, kBytes = 24576;
  // mode: 0 fine; 1 reads before any wait; 2 warp 1 never waits; 3 refills while a wgmma reads; 4 the producer
  // never arrives; 5 one arrival too many; 6 a copy on a barrier nobody waits for; 7 a copy over a barrier
  auto run = [&](int mode) {
    pk_emu::launch(Dim3{}, 160, kBytes, [&] {
      const unsigned t = pk_emu::thread_index();
      char* smem = pk_emu::shared_memory();
      if (t == 0) {
        pk_emu::mbarrier_init(smem + kFull, 1);
        pk_emu::mbarrier_init(smem + kOther, 1);
      }
      pk_emu::sync_threads();
      const int32_t at[2] = {0, 0};
      if (t == 128 && mode != 4) {  // the producer issues before the consumers run on (copies land lazily)
        pk_emu::mbarrier_arrive_expect_tx(smem + kFull, 8192);
        pk_emu::tma_load(smem, map, smem + kFull, at);
        if (mode == 5) pk_emu::mbarrier_arrive(smem + kFull);
        if (mode == 6) pk_emu::tma_load(smem + 8192, map, smem + kOther, at);
        if (mode == 7) pk_emu::tma_load(smem + 9216, map, smem + kOther, at);
      }
      pk_emu::sync_threads();
      if (t >= 128) return;
      if (mode != 1 && !(mode == 2 && t / 32 == 1)) pk_emu::mbarrier_wait(smem + kFull, 0);
      float d[32];
      pk_emu::wgmma_fence();
      pk_emu::wgmma_m64k16(d, 64, nullptr, descriptor(0, 16, 1024), descriptor(0, 16, 1024), false, false,
                           Element::f16);
      pk_emu::wgmma_commit();
      if (mode == 3 && t == 0) pk_emu::tma_load(smem, map, smem + kOther, at);
      pk_emu::wgmma_wait(0);
    });
  };
  run(0);
  expect_error("a wgmma reads a TMA box before the wait", [&] { run(1); }, {"while a copy (cp.async or TMA)"});
  expect_error("a warp reads a TMA box without waiting", [&] { run(2); },
               {"(warp 1, ", "completing phase 0 of the mbarrier at shared offset 16384", "has not waited"});
  expect_error("a TMA copy into an operand a wgmma still reads", [&] { run(3); },
               {"tma_load into shared offset 0", "still reads"});
  expect_error("the producer never arrives", [&] { run(4); },
               {"deadlock", "waiting at the mbarrier at shared offset 16384 for its phase of parity 0",
                "1 of 1 arrivals"});
  expect_error("one arrival too many", [&] { run(5); }, {"more arrivals", "than the 1 its phase expects"});
  expect_error("a TMA copy over an mbarrier", [&] { run(7); }, {"hold the mbarrier at offset 16384"});
  expect_error("a TMA copy on a barrier nobody waits for", [&] { run(6); }, {"1 TMA copies (tma_load) never landed"});
}

// (7) Named barriers as FlashAttention-3's ping-pong uses them: two warpgroups take turns (each waits on its own
// barrier, then lets the other go by arriving on the other's), so their turns alternate strictly whatever the
// schedule; counts that differ, a phase left incomplete, half a warp arriving and a missing arrival are errors.
void test_named_barriers() {
  std::vector<int> turns;
  pk_emu::launch(Dim3{}, 256, 0, [&] {
    const unsigned group = pk_emu::thread_index() / 128;
    if (group == 1) pk_emu::named_barrier_arrive(1, 256);  // group 0 goes first
    for (int step = 0; step < 3; ++step) {
      pk_emu::named_barrier_sync(1 + group, 256);
      if (pk_emu::thread_index() % 128 == 0) turns.push_back(static_cast<int>(group));
      if (!(group == 1 && step == 2)) pk_emu::named_barrier_arrive(2 - group, 256);  // the last turn hands nothing on
    }
  });
  CHECK((turns == std::vector<int>{0, 1, 0, 1, 0, 1}), "named barriers: the two groups' turns alternate");
  expect_error("named barrier arrivals with different counts", [] {
    pk_emu::launch(Dim3{}, 64, 0, [] { pk_emu::named_barrier_arrive(3, pk_emu::thread_index() < 32 ? 64 : 32); });
  }, {"named barrier 3 with 32 threads while this phase's earlier arrivals named 64"});
  expect_error("a named barrier phase left incomplete", [] {
    pk_emu::launch(Dim3{}, 64, 0, [] {
      if (pk_emu::thread_index() < 32) pk_emu::named_barrier_arrive(2, 64);
    });
  }, {"named barrier 2 ended with 32 of 64 threads arrived"});
  expect_error("half a warp arrives at a named barrier", [] {
    pk_emu::launch(Dim3{}, 64, 0, [] {
      if (pk_emu::thread_index() % 32 < 16) pk_emu::named_barrier_arrive(5, 64);
    });
  }, {"deadlock", "wait at named_barrier_arrive"});
  expect_error("a warp waits at a named barrier the other never reaches", [] {
    pk_emu::launch(Dim3{}, 64, 0, [] {
      if (pk_emu::thread_index() < 32) pk_emu::named_barrier_sync(4, 64);
    });
  }, {"deadlock", "waiting at named barrier 4 (32 of 64 threads arrived)"});
}

// (7b) sync_warp (__syncwarp): no lane of a warp goes past it before every lane reached it, whatever the schedule;
// a lane that skips it leaves the others waiting (a deadlock), as on the GPU.
void test_sync_warp() {
  std::vector<int> order;
  pk_emu::launch(Dim3{}, 64, 0, [&] {
    const unsigned lane = pk_emu::thread_index() % 32;
    if (pk_emu::thread_index() < 32) order.push_back(0);  // warp 0 before its sync_warp
    pk_emu::sync_warp();
    if (pk_emu::thread_index() < 32 && lane == 0) order.push_back(1);
  });
  const auto first_after = std::find(order.begin(), order.end(), 1);
  CHECK(first_after != order.end() && std::count(order.begin(), first_after, 0) == 32,
        "sync_warp: lane 0 goes on only after all 32 lanes of its warp arrived");
  expect_error("a lane skips sync_warp", [] {
    pk_emu::launch(Dim3{}, 32, 0, [] {
      if (pk_emu::thread_index() != 5) pk_emu::sync_warp();
    });
  }, {"deadlock"});
}

// (8) setmaxnreg: a producer warpgroup of a 384-thread block (168 registers each at launch) gives 144 per thread
// back, and the two consumer warpgroups take 72 each up to 240 (FlashAttention-3's 24 / 240): the pool balances to
// the register. 248 is 16 x 128 too many for the second consumer, which then waits forever; a warpgroup of which
// one thread alone lowers its count, and threads asking differently, are errors too.
void test_set_max_registers() {
  int passed = 0;
  auto run = [&](unsigned consumer_count, bool lone_producer, bool mixed) {
    passed = 0;
    pk_emu::launch(Dim3{}, 384, 0, [&] {
      const unsigned t = pk_emu::thread_index();
      if (t < 128) {
        if (!lone_producer || t == 0) pk_emu::set_max_registers(24, false);
      } else {
        pk_emu::set_max_registers(mixed && t == 200 ? 232 : consumer_count, true);
      }
      ++passed;
    });
  };
  run(240, false, false);
  CHECK(passed == 384, "setmaxnreg 24 / 240 in a 384-thread block: %d of 384 threads went on", passed);
  expect_error("consumers asking for more than the producer gave back", [&] { run(248, false, false); },
               {"deadlock", "waiting at setmaxnreg", "inc to 248"});
  expect_error("one producer thread alone lowers its registers", [&] { run(240, true, false); },
               {"deadlock", "1 of 128 threads arrived"});
  expect_error("threads of a warpgroup asking for different counts", [&] { run(240, false, true); },
               {"setmaxnreg.inc 232 while other threads of warpgroup 1 ask for setmaxnreg.inc 240"});
}

void test_shfl() {
  constexpr unsigned kThreads = 128;
  std::vector<float> sum(kThreads), quad_max(kThreads), own(kThreads), swapped(kThreads);
  pk_emu::launch(Dim3{}, kThreads, 0, [&] {
    const unsigned t = pk_emu::thread_index();
    float v = static_cast<float>(t);
    for (int m = 16; m >= 1; m /= 2) v += pk_emu::shfl_xor(v, m);
    sum[t] = v;
    float x = static_cast<float>((t * 7) % 13);
    x = std::fmax(x, pk_emu::shfl_xor(x, 1));
    x = std::fmax(x, pk_emu::shfl_xor(x, 2));
    quad_max[t] = x;
    own[t] = pk_emu::shfl_xor(static_cast<float>(t), 32);
    swapped[t] = pk_emu::shfl_xor(static_cast<float>(t), 31);
  });
  int bad = 0;
  for (unsigned t = 0; t < kThreads; ++t) {
    const unsigned w = t / 32;
    const float want_sum = static_cast<float>(32 * 32 * w + 31 * 32 / 2);
    float want_max = 0;
    for (unsigned u = t & ~3u; u < (t & ~3u) + 4; ++u) want_max = std::fmax(want_max, static_cast<float>((u * 7) % 13));
    bad += sum[t] != want_sum;
    bad += quad_max[t] != want_max;
    bad += own[t] != static_cast<float>(t);
    bad += swapped[t] != static_cast<float>(t ^ 31);
  }
  CHECK(bad == 0, "shfl_xor: %d wrong results", bad);
}

// (4) sync_threads and shared memory visibility across warps; the 0xFF fill; thread / block indices over a grid.
void test_sync(unsigned threads) {
  const size_t bytes = 2 * threads * sizeof(float);
  std::vector<int> errors(threads, 0);
  std::vector<uint32_t> unwritten(threads, 0);
  pk_emu::launch(Dim3{2, 1, 1}, threads, bytes, [&] {
    const unsigned t = pk_emu::thread_index();
    const unsigned n = pk_emu::block_dim();
    float* s = reinterpret_cast<float*>(pk_emu::shared_memory());
    std::memcpy(&unwritten[t], &s[(t + 1) % n], 4);  // nobody has written yet (every block starts refilled)
    pk_emu::sync_threads();
    for (unsigned round = 0; round < 6; ++round) {
      float* buf = s + (round % 2) * n;
      buf[t] = static_cast<float>(t * 10 + round + 1000 * pk_emu::block_index().x);
      pk_emu::sync_threads();
      for (unsigned k : {1u, 33u, 64u, n - 1}) {  // other warps' values
        const unsigned u = (t + k) % n;
        if (buf[u] != static_cast<float>(u * 10 + round + 1000 * pk_emu::block_index().x)) ++errors[t];
      }
    }
  });
  int bad = 0, fill = 0;
  for (unsigned t = 0; t < threads; ++t) bad += errors[t], fill += unwritten[t] != 0xFFFFFFFFu;
  CHECK(bad == 0, "sync_threads with %u threads: %d stale shared-memory reads", threads, bad);
  CHECK(fill == 0, "shared memory not 0xFF-filled at block start for %d threads", fill);
  float f;
  const uint32_t ones = 0xFFFFFFFFu;
  std::memcpy(&f, &ones, 4);
  CHECK(std::isnan(f) && std::isnan(f16_value(0xFFFF)) && std::isnan(bf16_value(0xFFFF)), "0xFF.. is not NaN");
}

void test_indices() {
  const Dim3 grid{3, 2, 2};
  constexpr unsigned kThreads = 64;
  std::vector<int> seen(3 * 2 * 2 * kThreads, 0);
  int bad = 0;
  pk_emu::launch(grid, kThreads, 256, [&] {
    const Dim3 b = pk_emu::block_index(), g = pk_emu::grid_dim();
    if (g.x != 3 || g.y != 2 || g.z != 2 || pk_emu::block_dim() != kThreads) ++bad;
    if (reinterpret_cast<uintptr_t>(pk_emu::shared_memory()) % 128 != 0) ++bad;
    ++seen[((b.z * 2 + b.y) * 3 + b.x) * kThreads + pk_emu::thread_index()];
  });
  int wrong = bad;
  for (int s : seen) wrong += s != 1;
  CHECK(wrong == 0, "thread / block indices: %d wrong", wrong);
}

// ldmatrix bank-conflict counting: rows 128 bytes apart share one bank group (8-way: 7 extra wavefronts per
// phase); consecutive 16-byte rows do not; a repeated address is a broadcast.
void test_bank_conflict_stats() {
  const unsigned strides[3] = {128, 16, 0};
  const uint64_t expected_extra[3] = {4 * 7, 0, 0};
  for (int c = 0; c < 3; ++c) {
    pk_emu::reset_shared_memory_stats();
    pk_emu::launch(Dim3{}, 32, 32 * 128, [&] {
      uint32_t r[4];
      pk_emu::ldmatrix_x4(r, pk_emu::shared_memory() + strides[c] * pk_emu::thread_index(), false);
    });
    const pk_emu::SharedMemoryStats stats = pk_emu::shared_memory_stats();
    CHECK(stats.ldmatrix_phases == 4 && stats.ldmatrix_extra_wavefronts == expected_extra[c],
          "ldmatrix rows %u bytes apart: %llu phases, %llu extra wavefronts (expected 4, %llu)", strides[c],
          static_cast<unsigned long long>(stats.ldmatrix_phases),
          static_cast<unsigned long long>(stats.ldmatrix_extra_wavefronts),
          static_cast<unsigned long long>(expected_extra[c]));
  }
}

// cp_async_16 copies or zero-fills, landing only when the issuing thread's wait covers its group.
void test_cp_async() {
  alignas(16) static float global[32 * 4];
  for (int i = 0; i < 32 * 4; ++i) global[i] = static_cast<float>(i + 1);
  std::vector<float> got(32 * 4);
  int landed_early = 0, newest_landed = 0;
  pk_emu::launch(Dim3{}, 32, 2 * 32 * 16, [&] {
    const unsigned t = pk_emu::thread_index();
    char* s = pk_emu::shared_memory();
    char* mine = s + 16 * ((t * 5) % 32);
    pk_emu::cp_async_16(mine, &global[4 * t], t % 3 != 0);
    pk_emu::cp_async_commit();
    landed_early += static_cast<unsigned char>(mine[0]) != 0xFF;  // still the 0xFF fill: nothing waited yet
    pk_emu::cp_async_16(s + 512 + 16 * t, &global[4 * t], true);  // a second group
    pk_emu::cp_async_commit();
    pk_emu::cp_async_wait(1);  // lands the first group only
    newest_landed += static_cast<unsigned char>(s[512 + 16 * t]) != 0xFF;
    pk_emu::cp_async_wait(0);
    pk_emu::sync_threads();
    std::memcpy(&got[4 * t], mine, 16);
  });
  int bad = 0;
  for (unsigned t = 0; t < 32; ++t)
    for (int i = 0; i < 4; ++i) bad += got[4 * t + i] != (t % 3 != 0 ? global[4 * t + i] : 0.0f);
  CHECK(bad == 0, "cp_async_16: %d wrong floats", bad);
  CHECK(landed_early == 0, "cp_async_16: %d copies landed before any wait", landed_early);
  CHECK(newest_landed == 0, "cp_async_wait(1): %d copies of the newest group landed", newest_landed);
}

// Sets $PK_EMU_SCHEDULE for a scope (the emulator reads it at each launch).
struct ScopedSchedule {
  std::string saved;
  bool had = false;
  explicit ScopedSchedule(const char* value) {
    if (const char* old = std::getenv("PK_EMU_SCHEDULE")) saved = old, had = true;
    setenv("PK_EMU_SCHEDULE", value, 1);
  }
  ~ScopedSchedule() {
    if (had)
      setenv("PK_EMU_SCHEDULE", saved.c_str(), 1);
    else
      unsetenv("PK_EMU_SCHEDULE");
  }
};

// The schedule decides which thread runs first: a missing sync_threads between warp 1's store and warp 0's load reads
// the 0xFF fill (NaN) when warp 0 runs first, and the stored value when warp 1 does.
void test_schedules() {
  auto racy = [] {
    float seen = 0;
    pk_emu::launch(Dim3{}, 64, 64, [&] {
      float* s = reinterpret_cast<float*>(pk_emu::shared_memory());
      const unsigned t = pk_emu::thread_index();
      if (t == 32) s[0] = 1.0f;
      // missing: pk_emu::sync_threads();
      if (t == 0) seen = s[0];
    });
    return seen;
  };
  {
    ScopedSchedule forward("forward");
    CHECK(std::isnan(racy()), "forward schedule: warp 0 should run before warp 1");
  }
  {
    ScopedSchedule reverse("reverse");
    CHECK(racy() == 1.0f, "reverse schedule: warp 1 should run before warp 0");
  }
  int nan = 0, one = 0;
  for (int seed = 0; seed < 20; ++seed) {
    ScopedSchedule random(("random:" + std::to_string(seed)).c_str());
    const float v = racy();
    nan += std::isnan(v);
    one += v == 1.0f;
  }
  CHECK(nan > 0 && one > 0 && nan + one == 20, "random schedules: %d NaN, %d ones of 20", nan, one);
  ScopedSchedule bad("sideways");
  expect_error("unknown PK_EMU_SCHEDULE", [] { pk_emu::launch(Dim3{}, 32, 0, [] {}); }, {"PK_EMU_SCHEDULE"});
}

// (5) deadlocks and other failures are errors, not hangs; the emulator works after them.
void test_failures() {
  expect_error("lane 0 skips sync_threads", [] {
    pk_emu::launch(Dim3{}, 128, 0, [] {
      if (pk_emu::thread_index() != 0) pk_emu::sync_threads();
    });
  }, {"deadlock", "sync_threads", "thread 0: finished"});
  expect_error("warp 1 skips the second sync_threads", [] {
    pk_emu::launch(Dim3{}, 128, 0, [] {
      pk_emu::sync_threads();
      if (pk_emu::thread_index() / 32 != 1) pk_emu::sync_threads();
    });
  }, {"deadlock", "threads 32-63: finished"});
  expect_error("lane 5 skips a shfl_xor", [] {
    pk_emu::launch(Dim3{}, 64, 0, [] {
      float v = 1;
      if (pk_emu::thread_index() != 37) v = pk_emu::shfl_xor(v, 1);
      pk_emu::sync_threads();
      (void)v;
    });
  }, {"deadlock", "warp 1: lanes 0-4, 6-31 wait at shfl_xor", "thread 37: waiting at sync_threads"});
  expect_error("lanes call different collectives", [] {
    pk_emu::launch(Dim3{}, 32, 64, [] {
      const unsigned t = pk_emu::thread_index();
      if (t < 16) {
        pk_emu::shfl_xor(1.0f, 1);
      } else {
        uint32_t r[4];
        pk_emu::ldmatrix_x4(r, pk_emu::shared_memory(), false);
      }
    });
  }, {"thread 16", "calls ldmatrix_x4", "wait at shfl_xor"});
  expect_error("lanes call mma with different element types", [] {
    pk_emu::launch(Dim3{}, 32, 0, [] {
      uint32_t a[4] = {}, b[2] = {};
      float c[4] = {}, d[4];
      pk_emu::mma_m16n8k16(d, a, b, c, pk_emu::thread_index() == 31 ? Element::bf16 : Element::f16);
    });
  }, {"thread 31", "mma_m16n8k16(bf16)", "mma_m16n8k16(f16)"});
  expect_error("an exception in thread 77", [] {
    pk_emu::launch(Dim3{2, 1, 1}, 128, 0, [] {
      pk_emu::sync_threads();
      if (pk_emu::block_index().x == 1 && pk_emu::thread_index() == 77) throw std::runtime_error("boom");
      pk_emu::sync_threads();
    });
  }, {"block (1,0,0), thread 77 (warp 2, lane 13)", "boom"});
  expect_error("bad thread count", [] { pk_emu::launch(Dim3{}, 48, 0, [] {}); }, {"multiple of 32"});

  // the emulator is usable again after failures
  int ran = 0;
  pk_emu::launch(Dim3{}, 64, 0, [&] {
    pk_emu::sync_threads();
    pk_emu::shfl_xor(1.0f, 1);
    ++ran;
  });
  CHECK(ran == 64, "launch after failures ran %d threads", ran);
}

// (6) addresses out of the block's shared memory, misaligned addresses, writes past the buffer.
void test_bad_addresses() {
  expect_error("ldmatrix row address past the end of shared memory", [] {
    pk_emu::launch(Dim3{}, 32, 256, [] {
      uint32_t r[4];
      const unsigned t = pk_emu::thread_index();
      pk_emu::ldmatrix_x4(r, pk_emu::shared_memory() + (t == 9 ? 256 : 16 * (t % 16)), false);
    });
  }, {"thread 9", "ldmatrix_x4", "outside", "offset 256"});
  expect_error("ldmatrix row address before shared memory", [] {
    pk_emu::launch(Dim3{}, 32, 256, [] {
      uint32_t r[4];
      const unsigned t = pk_emu::thread_index();
      pk_emu::ldmatrix_x4(r, pk_emu::shared_memory() - (t == 3 ? 16 : 0), true);
    });
  }, {"thread 3", "outside", "offset -16"});
  expect_error("ldmatrix row address not 16-byte aligned", [] {
    pk_emu::launch(Dim3{}, 32, 256, [] {
      uint32_t r[4];
      const unsigned t = pk_emu::thread_index();
      pk_emu::ldmatrix_x4(r, pk_emu::shared_memory() + 16 * (t % 8) + (t == 20 ? 8 : 0), false);
    });
  }, {"thread 20", "not 16-byte aligned"});
  expect_error("cp_async destination outside shared memory", [] {
    alignas(16) static char global[64];
    pk_emu::launch(Dim3{}, 32, 128, [] {
      pk_emu::cp_async_16(pk_emu::shared_memory() + 16 * pk_emu::thread_index(), global, true);
      pk_emu::cp_async_commit();
      pk_emu::cp_async_wait(0);
    });
  }, {"thread 8", "cp_async_16", "outside"});
  expect_error("cp_async source misaligned", [] {
    alignas(16) static char global[64];
    pk_emu::launch(Dim3{}, 32, 512, [] {
      pk_emu::cp_async_16(pk_emu::shared_memory(), global + 4, pk_emu::thread_index() != 0);
    });
  }, {"thread 0", "source", "not 16-byte aligned"});
  expect_error("ldmatrix of a chunk whose cp.async has not landed (no sync after the wait)", [] {
    alignas(16) static char global[32 * 16];
    pk_emu::launch(Dim3{}, 64, 64 * 16, [] {
      // Each warp loads its half and waits, then reads the other warp's half with no barrier in between:
      // whichever warp the schedule runs second reads a copy it has no right to see yet.
      const unsigned t = pk_emu::thread_index();
      char* s = pk_emu::shared_memory();
      pk_emu::cp_async_16(s + 16 * t, global + 16 * (t % 32), true);
      pk_emu::cp_async_commit();
      pk_emu::cp_async_wait(0);
      uint32_t r[4];
      pk_emu::ldmatrix_x4(r, s + 16 * ((t + 32) % 64), false);
    });
  }, {"ldmatrix_x4", "without a sync_threads"});
  expect_error("a thread finishing with copies in flight", [] {
    alignas(16) static char global[16];
    pk_emu::launch(Dim3{}, 32, 32 * 16, [] {
      pk_emu::cp_async_16(pk_emu::shared_memory() + 16 * pk_emu::thread_index(), global, true);
    });
  }, {"never waited"});
#ifndef __SANITIZE_ADDRESS__  // under AddressSanitizer these stores are reported (and abort) as they happen
  expect_error("plain store past the end of shared memory", [] {
    pk_emu::launch(Dim3{}, 32, 100, [] {
      if (pk_emu::thread_index() == 0) pk_emu::shared_memory()[100] = 1;
    });
  }, {"written past its 100 bytes", "offset 100"});
  expect_error("plain store before shared memory", [] {
    pk_emu::launch(Dim3{}, 32, 100, [] {
      if (pk_emu::thread_index() == 0) reinterpret_cast<float*>(pk_emu::shared_memory())[-2] = 1;
    });
  }, {"written before its start"});
#endif
  expect_error("thread_index outside a launch", [] {
    try {
      pk_emu::thread_index();
    } catch (const std::logic_error& e) {
      throw std::runtime_error(e.what());
    }
  }, {"outside a launched thread"});
}

// A thread may keep sizeable arrays in locals.
void test_stack() {
  double total = 0;
  pk_emu::launch(Dim3{}, 256, 0, [&] {
    volatile float big[8192];  // 32 KiB
    for (int i = 0; i < 8192; ++i) big[i] = static_cast<float>(i % 7);
    pk_emu::sync_threads();
    float s = 0;
    for (int i = 0; i < 8192; ++i) s += big[i];
    total += s;
  });
  CHECK(total == 256.0 * 24571.0, "32 KiB of locals per thread: sum %g", total);  // sum of i % 7, i < 8192
}

#ifdef HAVE_PLATFORM_H
PK_KERNEL(64) platform_kernel(float* PK_RESTRICT out, int scale) {
  const unsigned t = pk::thread_index();
  float* s = reinterpret_cast<float*>(pk::shared_memory());
  s[t] = static_cast<float>(t * scale);
  pk::sync_threads();
  out[pk::block_index_x() * 64 + t] = s[63 - t];
}

void test_platform() {
  std::vector<float> out(2 * 64, -1);
  pk::Dim3 grid{2, 1, 1};
  PK_LAUNCH(platform_kernel, grid, 64, 64 * sizeof(float), nullptr, out.data(), 3);
  int bad = 0;
  for (unsigned i = 0; i < 128; ++i) bad += out[i] != static_cast<float>((63 - i % 64) * 3);
  CHECK(bad == 0, "platform.h PK_LAUNCH / PK_KERNEL under PK_EMULATE: %d wrong", bad);
}
#endif

// Speed: warp collectives per second (each is 32 lane calls).
void bench() {
  using clock = std::chrono::steady_clock;
  constexpr unsigned kThreads = 128, kIters = 20000;
  float sink = 0;
  auto t0 = clock::now();
  pk_emu::launch(Dim3{}, kThreads, 0, [&] {
    float v = static_cast<float>(pk_emu::thread_index());
    for (unsigned i = 0; i < kIters; ++i) v = pk_emu::shfl_xor(v, 1 + i % 16) * 0.5f;
    sink += v;
  });
  const double shfl_s = std::chrono::duration<double>(clock::now() - t0).count();
  t0 = clock::now();
  constexpr unsigned kMma = 5000;
  pk_emu::launch(Dim3{}, kThreads, 0, [&] {
    uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u}, b[2] = {0x3c003c00u, 0x3c003c00u};
    float c[4] = {};
    for (unsigned i = 0; i < kMma; ++i) pk_emu::mma_m16n8k16(c, a, b, c, Element::f16);
    sink += c[0];
  });
  const double mma_s = std::chrono::duration<double>(clock::now() - t0).count();
  t0 = clock::now();
  constexpr unsigned kSync = 20000;
  pk_emu::launch(Dim3{}, kThreads, 0, [&] {
    for (unsigned i = 0; i < kSync; ++i) pk_emu::sync_threads();
  });
  const double sync_s = std::chrono::duration<double>(clock::now() - t0).count();
  const double warps = kThreads / 32;
  std::printf("speed (128 threads, 4 warps, one OS thread):\n");
  std::printf("  shfl_xor:     %.3g warp collectives/s (%.3g lane calls/s)\n", warps * kIters / shfl_s,
              32 * warps * kIters / shfl_s);
  std::printf("  mma_m16n8k16: %.3g warp collectives/s\n", warps * kMma / mma_s);
  std::printf("  sync_threads: %.3g block barriers/s\n", kSync / sync_s);
  if (sink == 12345.678f) std::printf(" ");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_layout_coverage();
  for (Element t : {Element::f16, Element::bf16}) {
    test_conversions(t);
    test_mma_random(t, rng, false);
    test_mma_random(t, rng, true);
    test_ldmatrix_mma(t, rng);
    test_wgmma(t, rng);
    test_tma_wgmma(t, rng);
  }
  for (int i = 0; i < 4; ++i) {
    test_ldmatrix(false, rng);
    test_ldmatrix(true, rng);
  }
  test_shfl();
  test_sync(128);
  test_sync(256);
  test_sync(1024);
  test_indices();
  test_cp_async();
  test_bank_conflict_stats();
  test_stack();
  std::printf("PK_EMU_SCHEDULE=%s\n", std::getenv("PK_EMU_SCHEDULE") ? std::getenv("PK_EMU_SCHEDULE") : "(unset)");
  {
    ScopedSchedule forward("forward");  // the messages below name the first offending thread of a forward schedule
    test_failures();
    test_bad_addresses();
    test_schedules();
    test_wgmma_rules();
    test_tma_rules();
    test_named_barriers();
    test_sync_warp();
    test_set_max_registers();
  }
#ifdef HAVE_PLATFORM_H
  test_platform();
#else
  std::printf("platform.h not found: its PK_EMULATE branch is not tested\n");
#endif
  bench();
  std::printf("%d checks, %d failed\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
