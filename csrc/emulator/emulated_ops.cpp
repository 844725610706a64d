// The extension's sources as one host translation unit under PK_EMULATE: tests/cuda_emulation.py builds this
// (with emulator.cpp) into torch.ops.prefix_kernels_emulated, the CUDA kernels running on CPU tensors.
#ifndef PK_EMULATE
#error "emulated_ops.cpp is the host-emulation build of csrc/; compile it with -DPK_EMULATE"
#endif
#include "../forward.cu"
#include "../decode.cu"
#include "../ops.cpp"
