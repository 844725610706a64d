// The extension's torch ops: prefix_kernels_cuda::forward and ::decode (fake impls: prefix_kernels/cuda.py).
// Checks everything the kernels assume (raising before any launch), fills AttentionParams, launches on the
// current stream. Built twice: by setup.py for CUDA tensors, and under PK_EMULATE (tests) for CPU tensors as
// prefix_kernels_emulated::*, running the same kernels through csrc/emulator/.
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef PK_EMULATE
#ifndef PK_OPS_NAMESPACE  // the tests also build variants (other -D tile settings) under other names
#define PK_OPS_NAMESPACE prefix_kernels_emulated
#endif
#define PK_OPS_DEVICE CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <Python.h>
#define PK_OPS_NAMESPACE prefix_kernels_cuda
#define PK_OPS_DEVICE CUDA
#endif

#include "launch.h"

namespace {

using at::Tensor;

// The decode plan and the persistent forward's grid off a GPU: small, so that tests see several splits, and
// several works per block ($PK_EMU_SMS)
constexpr int kEmulatedSms = 2;

void check_operand(const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), ", q has ", q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), ", q is on ", q.device());
  TORCH_CHECK(t.size(3) == q.size(3), name, " has head dim ", t.size(3), ", q has ", q.size(3));
  // cp.async moves 16-byte chunks: rows must start 16-byte aligned and the head dim must be contiguous (TMA's
  // tensor maps need the same: a 16-byte aligned base, strides that are multiples of 16 bytes).
  TORCH_CHECK(t.numel() == 0 || t.stride(3) == 1, name, " must have a contiguous head dim (stride 1), got ",
              t.stride(3));
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(t.size(i) <= 1 || t.stride(i) % 8 == 0, name, " stride ", i, " = ", t.stride(i),
                " is not a multiple of 8 elements (16 bytes)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " data is not 16-byte aligned");
}

void check_index(const char* name, const c10::optional<Tensor>& t, int64_t length, const Tensor& q) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, name, " must be int32 or int64, got ",
              t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == length, name, " must have shape [", length, "], got ", t->sizes());
  TORCH_CHECK(t->device() == q.device(), name, " is on ", t->device(), ", q is on ", q.device());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
}

// The sizes of a call (the group G = Hq / Hkv derived), as make_params and the emulated build's decode_plan set them.
void set_sizes(pk::AttentionParams& p, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seq_q, int64_t seq_k,
               int64_t num_prefixes, int64_t prefix_len) {
  p.batch = static_cast<int>(batch);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.seq_q = static_cast<int>(seq_q);
  p.seq_k = static_cast<int>(seq_k);
  p.num_prefixes = static_cast<int>(num_prefixes);
  p.prefix_len = static_cast<int>(prefix_len);
}

pk::AttentionParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                const Tensor& prefix_v, const c10::optional<Tensor>& key_padding_mask,
                                const c10::optional<Tensor>& prefix_index, const c10::optional<Tensor>& prefix_lens,
                                bool causal, double scale, const Tensor& out, const Tensor& lse) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the CUDA kernels take float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.device().type() == c10::DeviceType::PK_OPS_DEVICE, "q is on ", q.device(), ", expected a ",
              c10::DeviceType::PK_OPS_DEVICE, " tensor");
  check_operand("q", q, q);
  check_operand("k", k, q);
  check_operand("v", v, q);
  check_operand("prefix_k", prefix_k, q);
  check_operand("prefix_v", prefix_v, q);
  const int64_t batch = q.size(0), heads_q = q.size(1), seq_q = q.size(2), head_dim = q.size(3);
  const int64_t heads_kv = k.size(1), seq_k = k.size(2), num_prefixes = prefix_k.size(0);
  const int64_t prefix_len = prefix_k.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "the CUDA kernels take head dim 64 or 128, got ", head_dim);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == batch, "k and v must both be [B, Hkv, L, D] with B = ", batch);
  TORCH_CHECK(prefix_k.sizes() == prefix_v.sizes() && prefix_k.size(1) == heads_kv,
              "prefix_k and prefix_v must both be [N, Hkv, P, D] with Hkv = ", heads_kv);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, "Hq = ", heads_q, " is not a multiple of Hkv = ", heads_kv);
  TORCH_CHECK(seq_k < (1 << 30) && prefix_len < (1 << 30) && batch * heads_q * seq_q < (int64_t(1) << 31),
              "sizes beyond the kernels' 32-bit row and key indices");
  TORCH_CHECK(num_prefixes == 1 || prefix_index, "prefix_index is required with ", num_prefixes, " prefixes");
  check_index("prefix_index", prefix_index, batch, q);
  check_index("prefix_lens", prefix_lens, num_prefixes, q);
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool, "key_padding_mask must be bool, got ",
                key_padding_mask->scalar_type());
    TORCH_CHECK(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == batch &&
                    key_padding_mask->size(1) == seq_k,
                "key_padding_mask must have shape [", batch, ", ", seq_k, "], got ", key_padding_mask->sizes());
    TORCH_CHECK(key_padding_mask->device() == q.device(), "key_padding_mask is on ", key_padding_mask->device());
  }
  // the kernels take it in base 2 as a float32 and flush denormals: 0 or inf would make masked scores NaN
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  TORCH_CHECK(std::isnormal(scale_log2) && scale_log2 > 0,
              "scale must be positive with scale * log2(e) a normal float32, got ", scale);

  pk::AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.prefix_k = prefix_k.data_ptr();
  p.prefix_v = prefix_v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
    p.pk_stride[i] = prefix_k.stride(i);
    p.pv_stride[i] = prefix_v.stride(i);
  }
  if (key_padding_mask) {
    p.key_padding_mask = static_cast<const uint8_t*>(key_padding_mask->data_ptr());
    p.mask_stride[0] = key_padding_mask->stride(0);
    p.mask_stride[1] = key_padding_mask->stride(1);
  }
  p.prefix_index = prefix_index ? prefix_index->data_ptr() : nullptr;
  p.prefix_index_int32 = prefix_index && prefix_index->scalar_type() == at::kInt;
  p.prefix_lens = prefix_lens ? prefix_lens->data_ptr() : nullptr;
  p.prefix_lens_int32 = prefix_lens && prefix_lens->scalar_type() == at::kInt;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_sizes(p, batch, heads_q, heads_kv, seq_q, seq_k, num_prefixes, prefix_len);
  p.head_dim = static_cast<int>(head_dim);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  p.scale_log2 = scale_log2;
  p.causal = causal;
  return p;
}

pk::Stream current_stream(const Tensor& q) {
#ifdef PK_EMULATE
  (void)q;
  return nullptr;
#else
  return at::cuda::getCurrentCUDAStream(q.device().index()).stream();
#endif
}

// The SMs the launchers plan for (the decode's splits, the persistent forward's grid): the device's, or in the tests
// and the sanitizer sweep another count, so that small shapes take the paths big ones do on a real card (several
// works per persistent block).
// A count in 1-4096 from $name, else 0 (unset, or not such a count: ignored).
int sms_from_environment(const char* name) {
  const char* text = std::getenv(name);
  if (!text || !*text) return 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  return *end == '\0' && value >= 1 && value <= 4096 ? static_cast<int>(value) : 0;
}

int sm_count() {
#ifdef PK_EMULATE
  const int sms = sms_from_environment("PK_EMU_SMS");  // a test's other card
  return sms ? sms : kEmulatedSms;
#else
  const int sms = sms_from_environment("PK_CUDA_SMS");
  return sms ? sms : at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// CUDA caps grid.y at 65535 and the forward's grid puts B * Hq there (forward.cu: launch_forward_with): larger
// batches are launched per chunk of whole sequences. The emulation takes a test's lower limit, which its launches
// enforce too ($PK_EMU_MAX_GRID_Y).
int64_t max_grid_y() {
#ifdef PK_EMULATE
  return pk_emu::max_grid_yz();
#else
  return 65535;
#endif
}

void check_launch() {
#ifndef PK_EMULATE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                   const Tensor& prefix_v, const c10::optional<Tensor>& key_padding_mask,
                                   const c10::optional<Tensor>& prefix_index,
                                   const c10::optional<Tensor>& prefix_lens, bool causal, double scale) {
#ifndef PK_EMULATE
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  pk::AttentionParams params = make_params(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens,
                                           causal, scale, out, lse);
  if (out.numel() == 0) return {out, lse};
  const auto launch = [&q](pk::AttentionParams& chunk) {
    chunk.sms = sm_count();
    pk::launch_forward(chunk, current_stream(q));
    check_launch();
  };
  const int64_t batch = q.size(0), per_chunk = std::max<int64_t>(1, max_grid_y() / q.size(1));
  if (batch <= per_chunk) {
    launch(params);
    return {out, lse};
  }
  for (int64_t start = 0; start < batch; start += per_chunk) {
    const auto rows = [&](const Tensor& t) { return t.slice(0, start, std::min(batch, start + per_chunk)); };
    const auto rows_of = [&](const c10::optional<Tensor>& t) { return t ? c10::optional<Tensor>(rows(*t)) : t; };
    pk::AttentionParams chunk = make_params(rows(q), rows(k), rows(v), prefix_k, prefix_v, rows_of(key_padding_mask),
                                            rows_of(prefix_index), prefix_lens, causal, scale, rows(out), rows(lse));
    launch(chunk);
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor> decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                                  const Tensor& prefix_v, const c10::optional<Tensor>& key_padding_mask,
                                  const c10::optional<Tensor>& prefix_index, const c10::optional<Tensor>& prefix_lens,
                                  bool causal, double scale) {
#ifndef PK_EMULATE
  const c10::cuda::CUDAGuard guard(q.device());
#endif
  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  pk::DecodeParams d{};
  d.attention = make_params(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, prefix_lens, causal, scale,
                            out, lse);
  if (out.numel() == 0) return {out, lse};
  d.attention.sms = sm_count();
  const pk::DecodePlan plan = pk::plan_decode(d.attention, d.attention.sms, pk::decode_prefix_loop(current_stream(q)),
                                              pk::decode_own_layout());
  d.rows = static_cast<int>(q.size(0) * q.size(1) * q.size(2));
  d.prefix_row_blocks = plan.prefix_row_blocks;
  d.prefix_splits = plan.prefix_splits;
  d.prefix_chunk = plan.prefix_chunk;
  d.own_row_blocks = plan.own_row_blocks;
  d.own_splits = plan.own_splits;
  d.own_chunk = plan.own_chunk;
  d.prefix_wgmma = plan.prefix_wgmma;
  d.own_keys_across_warps = plan.own_keys_across_warps;
  // Sized from shapes only (CUDA-graph safe); every slot of every row is written once by the partials.
  Tensor work_out = at::empty({plan.slots(), d.rows, q.size(3)}, q.options().dtype(at::kFloat));
  Tensor work_lse = at::empty({plan.slots(), d.rows}, q.options().dtype(at::kFloat));
  d.work_out = work_out.data_ptr<float>();
  d.work_lse = work_lse.data_ptr<float>();
  pk::launch_decode(d, current_stream(q));
  check_launch();
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(PK_OPS_NAMESPACE, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, "
        "Tensor? prefix_index, Tensor? prefix_lens, bool causal, float scale) -> (Tensor, Tensor)");
  m.def("decode(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, "
        "Tensor? prefix_index, Tensor? prefix_lens, bool causal, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(PK_OPS_NAMESPACE, PK_OPS_DEVICE, m) {
  m.impl("forward", &forward);
  m.impl("decode", &decode);
}

#ifndef PK_EMULATE
// `import prefix_kernels._C` loads the library (which registers the ops above); the module itself is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "prefix_kernels CUDA kernels (torch.ops.prefix_kernels_cuda)", -1, nullptr, nullptr,
                               nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
