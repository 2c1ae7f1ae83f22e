// Autocast kernels (DispatchKey::AutocastCPU, AutocastCUDA): the grouped GEMMs under torch.autocast.
//
// They follow torch's own policy for matmul and linear ("lower_precision_fp"): floating inputs other
// than fp64 on the autocast device are cast to the autocast dtype (bf16 or fp16), then the op runs
// below the autocast key. The casts go through at::autocast::cached_cast, so a weight that is a leaf
// requiring grad is cast once per autocast region, however many calls read it, and the cast is an
// ordinary differentiable op: fp32 parameters get fp32 gradients.
//
// The other ops keep their inputs' dtypes, as torch's elementwise and indexing ops do: gating computes
// in fp32 whatever its logits are; permute, unpermute and the activation move the rows they are given.
// Without these kernels, fp32 parameters would run the expert GEMMs in fp32 under autocast: a
// silently slow mixed-precision run (and on CUDA the exact SIMT mainloop, not tensor cores).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace moe_ext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <c10::DeviceType device>
Tensor lower(const Tensor& t) {
  return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(device), t, device);
}

template <c10::DeviceType device>
OptTensor lower(const OptTensor& t) {
  return t.has_value() ? OptTensor(lower<device>(*t)) : std::nullopt;
}

template <c10::DeviceType device>
Tensor grouped_gemm_autocast(const Tensor& a, const Tensor& b, const Tensor& expert_offsets, bool trans_b,
                             const OptTensor& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moe_ext::grouped_gemm", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, bool, const OptTensor&)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  return op.call(lower<device>(a), lower<device>(b), expert_offsets, trans_b, lower<device>(bias));
}

template <c10::DeviceType device>
Tensor grouped_gemm_wgrad_autocast(const Tensor& x, const Tensor& y, const Tensor& expert_offsets) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("moe_ext::grouped_gemm_wgrad", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  return op.call(lower<device>(x), lower<device>(y), expert_offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, AutocastCPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_autocast<c10::DeviceType::CPU>);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(moe_ext, AutocastCUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_autocast<c10::DeviceType::CUDA>);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_autocast<c10::DeviceType::CUDA>);
}

}  // namespace moe_ext
