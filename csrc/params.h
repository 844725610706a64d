// What a launch needs to know about one prefix_attention call: raw pointers, strides in elements, sizes.
// Filled by ops.cpp from validated tensors; read by the forward and decode kernels.
#pragma once

#include <cstdint>

namespace pk {

struct AttentionParams {
  // q [B, Hq, S, D]; k, v [B, Hkv, L, D]; prefix_k, prefix_v [N, Hkv, P, D]: any strides, head-dim stride 1.
  const void* q;
  const void* k;
  const void* v;
  const void* prefix_k;
  const void* prefix_v;
  int64_t q_stride[3];   // batch, head, position (the head dim is contiguous)
  int64_t k_stride[3];
  int64_t v_stride[3];
  int64_t pk_stride[3];  // prefix, head, position
  int64_t pv_stride[3];

  const uint8_t* key_padding_mask;  // [B, L] bools, 1 = a real key; null = every key is real
  int64_t mask_stride[2];
  const void* prefix_index;         // [B] which prefix each sequence uses; null = prefix 0 for all
  const void* prefix_lens;          // [N] valid length of each prefix; null = P
  bool prefix_index_int32;          // element types of prefix_index / prefix_lens: int32, else int64
  bool prefix_lens_int32;

  void* out;                        // [B, Hq, S, D] contiguous, q's dtype
  float* lse;                       // [B, Hq, S] natural log, -inf where nothing is visible

  int batch, heads_q, heads_kv, group, seq_q, seq_k, num_prefixes, prefix_len;
  int head_dim;                     // 64 or 128 (the kernels are instantiated for those)
  bool is_bf16;                     // element type of q, k, v, prefix_k, prefix_v, out: bf16, else fp16
  float scale_log2;                 // softmax scale * log2(e): the kernels work in base 2
  bool causal;                      // bottom-right aligned: query i sees own keys j <= L - S + i
  int sms;                          // the SMs to plan for: the device's, or $PK_CUDA_SMS / $PK_EMU_SMS (ops.cpp)
};

// The decode strategy's plan and fp32 workspace: slot s of row r = (b * Hq + hq) * S + s_q holds one partial
// attention (normalized out + LSE); the prefix splits come first, then the own splits.
struct DecodeParams {
  AttentionParams attention;
  float* work_out;                 // [slots, rows, D]
  float* work_lse;                 // [slots, rows]
  int rows;                        // B * Hq * S
  int prefix_row_blocks, prefix_splits, prefix_chunk;  // prefix programs: (row block, prefix * Hkv, split)
  int own_row_blocks, own_splits, own_chunk;           // own programs: (row block, sequence * Hkv, split)
  bool prefix_wgmma;  // the prefix programs run in a wgmma launch of their own (128 rows, 128-key tiles)
  bool own_keys_across_warps;  // own programs: 16-row blocks whose warps split each tile's keys (else 64 rows)
};

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace pk
