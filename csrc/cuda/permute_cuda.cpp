// Torch glue of the CUDA permute / unpermute kernels (permute.cu): validation shared with the CPU
// kernels (common/checks.h), allocation of the static upper bound (max_rows rows), and the launchers
// on the current stream. Sizes that depend on the routing stay on the device: no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"
#include "glue_utils.h"
#include "launchers.h"

namespace moe_ext {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                            int64_t num_experts, int64_t max_rows) {
  const int64_t R = check_permute(x_in, ids_in, num_experts, max_rows);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1), slots = T * k;
  // Slot and row indices are int32 inside the kernels; memory offsets are int64.
  TORCH_CHECK(slots <= kInt32Max && R <= kInt32Max, "moe_ext.permute: T * k = ", slots, " and max_rows = ", R,
              " must stay below 2^31 on CUDA");
  auto offsets = at::empty({num_experts + 1}, x.options().dtype(at::kLong));
  auto row_map = at::empty({T, k}, x.options().dtype(at::kLong));
  auto x_sorted = at::empty({R, H}, x.options());
  if (slots == 0) {
    offsets.zero_();
    x_sorted.zero_();
    return {x_sorted, offsets, row_map};
  }
  auto ws = cuda::workspace(cuda::permute_workspace_bytes(slots, num_experts), x);
  C10_CUDA_CHECK(cuda::launch_permute(x.data_ptr(), x.element_size(), T, H, ids.data_ptr(),
                                      ids.scalar_type() == at::kInt, k, num_experts, R, x_sorted.data_ptr(),
                                      offsets.data_ptr<int64_t>(), row_map.data_ptr<int64_t>(), ws.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream()));
  return {x_sorted, offsets, row_map};
}

at::Tensor unpermute_cuda(const at::Tensor& ys_in, const at::Tensor& row_map_in,
                          const std::optional<at::Tensor>& weights_in) {
  check_unpermute("unpermute", ys_in, row_map_in, weights_in);
  const c10::cuda::CUDAGuard guard(ys_in.device());
  const auto ys = ys_in.contiguous();
  const auto rm = row_map_in.contiguous();
  const int64_t T = rm.size(0), k = rm.size(1), H = ys.size(1), R = ys.size(0);
  auto y = at::empty({T, H}, ys.options());
  if (T == 0 || H == 0) return y;
  const at::Tensor w =
      weights_in ? weights_in->to(cuda::acc_dtype(ys.scalar_type())).contiguous() : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_unpermute(cuda::launcher_dtype(ys.scalar_type()), ys.data_ptr(),
                                        rm.data_ptr<int64_t>(), w.defined() ? w.data_ptr() : nullptr,
                                        y.data_ptr(), T, k, H, R, c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& ys_in,
                                                           const at::Tensor& row_map_in,
                                                           const std::optional<at::Tensor>& weights_in) {
  check_unpermute_backward(grad_y_in, ys_in, row_map_in, weights_in);
  const c10::cuda::CUDAGuard guard(ys_in.device());
  const auto gy = grad_y_in.to(ys_in.scalar_type()).contiguous();
  const auto ys = ys_in.contiguous();
  const auto rm = row_map_in.contiguous();
  const int64_t T = rm.size(0), k = rm.size(1), H = ys.size(1), R = ys.size(0);
  auto grad_ys = at::empty({R, H}, ys.options());
  auto grad_w = weights_in ? at::empty({T, k}, weights_in->options()) : at::empty({0}, ys.options());
  if (T * k == 0) {
    grad_ys.zero_();
    return {grad_ys, grad_w};
  }
  const auto acc = cuda::acc_dtype(ys.scalar_type());
  const at::Tensor w = weights_in ? weights_in->to(acc).contiguous() : at::Tensor();
  at::Tensor gw_acc;
  if (weights_in) gw_acc = grad_w.scalar_type() == acc ? grad_w : at::empty({T, k}, ys.options().dtype(acc));
  auto ws = cuda::workspace(cuda::unpermute_backward_workspace_bytes(R), ys);
  C10_CUDA_CHECK(cuda::launch_unpermute_backward(
      cuda::launcher_dtype(ys.scalar_type()), gy.data_ptr(), ys.data_ptr(), rm.data_ptr<int64_t>(),
      w.defined() ? w.data_ptr() : nullptr, grad_ys.data_ptr(), gw_acc.defined() ? gw_acc.data_ptr() : nullptr,
      ws.data_ptr(), T, k, H, R, c10::cuda::getCurrentCUDAStream()));
  if (gw_acc.defined() && !gw_acc.is_same(grad_w)) grad_w.copy_(gw_acc);
  return {grad_ys, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moe_ext
