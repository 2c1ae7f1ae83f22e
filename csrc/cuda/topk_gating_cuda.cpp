// Torch glue of the CUDA topk_gating kernels: validation (common/checks.h, shared with the CPU
// kernels), allocation, and the launchers of topk_gating.cu / topk_gating_backward.cu on the
// current stream. No host synchronisation: nothing is read back.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gating_cuda(
    const at::Tensor& logits_in, int64_t k, c10::string_view score_func, c10::string_view order,
    bool renormalize, const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
    int64_t topk_groups, double routed_scaling, c10::string_view group_score) {
  const GatingParams p = check_topk_gating(logits_in, k, score_func, order, renormalize, expert_bias,
                                           num_groups, topk_groups, routed_scaling, group_score);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const int64_t T = p.num_tokens, E = p.num_experts;
  const auto fopt = logits.options().dtype(cuda::acc_dtype(logits.scalar_type()));
  auto weights = at::empty({T, k}, fopt);
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  auto lse = at::empty({T}, fopt);
  if (T == 0) {
    return {weights, ids, at::zeros({E}, logits.options().dtype(at::kInt)), at::zeros({E}, fopt), lse};
  }
  auto tokens_per_expert = at::empty({E}, logits.options().dtype(at::kInt));
  auto score_sum = at::empty({E}, fopt);
  const at::Tensor bias = expert_bias ? expert_bias->to(fopt.dtype()).contiguous() : at::Tensor();
  const auto dt = cuda::launcher_dtype(logits.scalar_type());
  auto ws = cuda::workspace(cuda::topk_gating_workspace_bytes(p, dt), logits);
  C10_CUDA_CHECK(cuda::launch_topk_gating(p, dt, logits.data_ptr(), bias.defined() ? bias.data_ptr() : nullptr,
                                          weights.data_ptr(), ids.data_ptr<int>(), lse.data_ptr(),
                                          tokens_per_expert.data_ptr<int>(), score_sum.data_ptr(), ws.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream()));
  return {weights, ids, tokens_per_expert, score_sum, lse};
}

at::Tensor topk_gating_backward_cuda(const at::Tensor& grad_weights_in,
                                     const std::optional<at::Tensor>& grad_score_sum_in,
                                     const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& logits_in,
                                     const at::Tensor& expert_ids_in, c10::string_view score_func,
                                     c10::string_view order, bool renormalize, double routed_scaling) {
  const GatingParams p = check_topk_gating_backward(grad_weights_in, grad_score_sum_in, grad_lse_in, logits_in,
                                                    expert_ids_in, score_func, order, renormalize,
                                                    routed_scaling);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  auto grad_logits = at::empty_like(logits);
  if (p.num_tokens == 0) return grad_logits;
  const auto ids = expert_ids_in.contiguous();
  const auto fdtype = cuda::acc_dtype(logits.scalar_type());
  const auto grad_w = grad_weights_in.to(fdtype).contiguous();
  const auto grad_ss = grad_score_sum_in ? grad_score_sum_in->to(fdtype).contiguous() : at::Tensor();
  const auto grad_lse = grad_lse_in ? grad_lse_in->to(fdtype).contiguous() : at::Tensor();
  const auto dt = cuda::launcher_dtype(logits.scalar_type());
  auto ws = cuda::workspace(cuda::topk_gating_backward_workspace_bytes(p, dt), logits);
  C10_CUDA_CHECK(cuda::launch_topk_gating_backward(
      p, dt, logits.data_ptr(), ids.data_ptr<int>(), grad_w.data_ptr(),
      grad_ss.defined() ? grad_ss.data_ptr() : nullptr, grad_lse.defined() ? grad_lse.data_ptr() : nullptr,
      grad_logits.data_ptr(), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("topk_gating", &topk_gating_cuda);
  m.impl("topk_gating_backward", &topk_gating_backward_cuda);
}

}  // namespace moe_ext
