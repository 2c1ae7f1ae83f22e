// Torch glue of the CUDA gated_activation kernels (activation.cu): the validation shared with the
// CPU kernels (common/checks.h), contiguous inputs, outputs from the caching allocator, the launch
// on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "glue_utils.h"
#include "launchers.h"

namespace moe_ext {
namespace {

at::Tensor gated_activation_cuda(const at::Tensor& h_in, c10::string_view activation) {
  const Activation act = check_gated_activation("gated_activation", h_in, activation, nullptr);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const auto h = h_in.contiguous();
  const int64_t M = h.size(0), F = h.size(1) / 2;
  auto out = at::empty({M, F}, h.options());
  if (M == 0 || F == 0) return out;
  C10_CUDA_CHECK(cuda::launch_gated_activation(cuda::launcher_dtype(h.scalar_type()), act, h.data_ptr(),
                                               out.data_ptr(), M, F, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor gated_activation_backward_cuda(const at::Tensor& grad_in, const at::Tensor& h_in,
                                          c10::string_view activation) {
  const Activation act = check_gated_activation("gated_activation_backward", h_in, activation, &grad_in);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const auto h = h_in.contiguous();
  const auto grad = grad_in.contiguous();
  const int64_t M = h.size(0), F = h.size(1) / 2;
  auto grad_h = at::empty({M, 2 * F}, h.options());
  if (M == 0 || F == 0) return grad_h;
  C10_CUDA_CHECK(cuda::launch_gated_activation_backward(cuda::launcher_dtype(h.scalar_type()), act, grad.data_ptr(),
                                                        h.data_ptr(), grad_h.data_ptr(), M, F,
                                                        c10::cuda::getCurrentCUDAStream()));
  return grad_h;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("gated_activation", &gated_activation_cuda);
  m.impl("gated_activation_backward", &gated_activation_backward_cuda);
}

}  // namespace moe_ext
