// The extension's sources as one host translation unit under PK_EMULATE: tests/cuda_emulation.py builds this
// (with emulator.cpp) into torch.ops.prefix_kernels_emulated, the CUDA kernels running on CPU tensors.
#ifndef PK_EMULATE
#error "emulated_ops.cpp is the host-emulation build of csrc/; compile it with -DPK_EMULATE"
#endif
#include "../forward.cu"
#include "../decode.cu"
#include "../ops.cpp"

namespace {

// [ldmatrix phases, extra wavefronts from bank conflicts, the largest launch's shared bytes] since the last reset
// (csrc/emulator/emulator.h).
std::vector<int64_t> shared_memory_stats(bool reset) {
  const pk_emu::SharedMemoryStats stats = pk_emu::shared_memory_stats();
  if (reset) pk_emu::reset_shared_memory_stats();
  return {static_cast<int64_t>(stats.ldmatrix_phases), static_cast<int64_t>(stats.ldmatrix_extra_wavefronts),
          static_cast<int64_t>(stats.largest_launch_bytes)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PK_OPS_NAMESPACE, m) {
  m.def("shared_memory_stats(bool reset) -> int[]", &shared_memory_stats);
}
