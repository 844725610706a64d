// The extension's sources as one host translation unit under PK_EMULATE: tests/cuda_emulation.py builds this
// (with emulator.cpp) into torch.ops.prefix_kernels_emulated, the CUDA kernels running on CPU tensors.
#ifndef PK_EMULATE
#error "emulated_ops.cpp is the host-emulation build of csrc/; compile it with -DPK_EMULATE"
#endif
#include "../forward.cu"
#include "../decode.cu"
#include "../ops.cpp"

namespace {

// [ldmatrix phases, extra wavefronts from bank conflicts, the largest launch's shared bytes, blocks launched, works
// noted] since the last reset (csrc/emulator/emulator.h).
std::vector<int64_t> shared_memory_stats(bool reset) {
  const pk_emu::SharedMemoryStats stats = pk_emu::shared_memory_stats();
  if (reset) pk_emu::reset_shared_memory_stats();
  return {static_cast<int64_t>(stats.ldmatrix_phases), static_cast<int64_t>(stats.ldmatrix_extra_wavefronts),
          static_cast<int64_t>(stats.largest_launch_bytes), static_cast<int64_t>(stats.blocks_launched),
          static_cast<int64_t>(stats.works_noted)};
}

// The decode's plan (pk::plan_decode, with the mma prefix loop and the own layout $PK_CUDA_DECODE_OWN asks for) for
// one prefix and these sizes on `sms` SMs: [own_row_blocks, own_keys_across_warps, own_splits, prefix_row_blocks,
// prefix_splits]. For the tests of the plan's choices, which the kernels' results cannot show.
std::vector<int64_t> decode_plan(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seq_q, int64_t seq_k,
                                 int64_t prefix_len, int64_t sms) {
  pk::AttentionParams p{};
  set_sizes(p, batch, heads_q, heads_kv, seq_q, seq_k, 1, prefix_len);  // (ops.cpp: the same translation unit)
  const pk::DecodePlan plan =
      pk::plan_decode(p, static_cast<int>(sms), pk::DecodePrefixLoop::mma, pk::decode_own_layout());
  return {plan.own_row_blocks, plan.own_keys_across_warps, plan.own_splits, plan.prefix_row_blocks,
          plan.prefix_splits};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PK_OPS_NAMESPACE, m) {
  m.def("shared_memory_stats(bool reset) -> int[]", &shared_memory_stats);
  m.def("decode_plan(int batch, int heads_q, int heads_kv, int seq_q, int seq_k, int prefix_len, int sms) -> int[]",
        &decode_plan);
}
