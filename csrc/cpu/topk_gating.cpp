// CPU kernels of topk_gating and its backward: at::parallel_for over tokens, the per-token maths of
// common/routing.h, and fixed-size token blocks (kGateTokenBlock) for the per-expert sums so that
// results depend neither on the number of threads nor on the back end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "../common/routing.h"

namespace moe_ext {
namespace {

at::ScalarType routing_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_gating_cpu(
    const at::Tensor& logits_in, int64_t k, c10::string_view score_func, c10::string_view order,
    bool renormalize, const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
    int64_t topk_groups, double routed_scaling, c10::string_view group_score) {
  const GatingParams p = check_topk_gating(logits_in, k, score_func, order, renormalize, expert_bias,
                                           num_groups, topk_groups, routed_scaling, group_score);
  const auto logits = logits_in.contiguous();
  const int64_t T = p.num_tokens;
  const int64_t E = p.num_experts;
  const auto fopt = logits.options().dtype(routing_dtype(logits));
  auto weights = at::empty({T, k}, fopt);
  auto ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  auto tokens_per_expert = at::empty({E}, logits.options().dtype(at::kInt));  // every entry written below
  auto score_sum = at::empty({E}, fopt);
  auto lse = at::empty({T}, fopt);
  const int64_t nblocks = (T + kGateTokenBlock - 1) / kGateTokenBlock;

  MOE_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "topk_gating", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor bias = expert_bias ? expert_bias->to(fopt.dtype()).contiguous() : at::Tensor();
    const acc* bias_p = bias.defined() ? bias.data_ptr<acc>() : nullptr;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    acc* wp = weights.data_ptr<acc>();
    int* ip = ids.data_ptr<int>();
    acc* lsep = lse.data_ptr<acc>();
    // Per-block partial sums: scratch, not tensors (a decode-sized call is mostly allocation cost).
    std::vector<acc> partial_sum(static_cast<size_t>(nblocks * E), acc(0));
    std::vector<int> partial_cnt(static_cast<size_t>(nblocks * E), 0);
    acc* psum = partial_sum.data();
    int* pcnt = partial_cnt.data();
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc> score(E), group_scores(64);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t_end = std::min(T, (b + 1) * kGateTokenBlock);
        for (int64_t t = b * kGateTokenBlock; t < t_end; ++t) {
          gate_token<acc>(p, lp + t * E, bias_p, score.data(), ip + t * k, wp + t * k, lsep + t,
                          group_scores.data());
          for (int64_t e = 0; e < E; ++e) psum[b * E + e] += score[e];
          for (int64_t j = 0; j < k; ++j) pcnt[b * E + ip[t * k + j]] += 1;
        }
      }
    });
    // Blocks combine in fixed_order_sum order: the same answer for any thread count, and the CUDA
    // kernel's answer.
    acc* ssp = score_sum.data_ptr<acc>();
    int* tpe = tokens_per_expert.data_ptr<int>();
    at::parallel_for(0, E, 64, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        int c = 0;
        for (int64_t b = 0; b < nblocks; ++b) c += pcnt[b * E + e];
        ssp[e] = fixed_order_sum<acc>(nblocks, [&](int64_t b) { return psum[b * E + e]; });
        tpe[e] = c;
      }
    });
  });
  return {weights, ids, tokens_per_expert, score_sum, lse};
}

at::Tensor topk_gating_backward_cpu(const at::Tensor& grad_weights_in,
                                    const std::optional<at::Tensor>& grad_score_sum_in,
                                    const std::optional<at::Tensor>& grad_lse_in,
                                    const at::Tensor& logits_in, const at::Tensor& expert_ids_in,
                                    c10::string_view score_func, c10::string_view order, bool renormalize,
                                    double routed_scaling) {
  const GatingParams p = check_topk_gating_backward(grad_weights_in, grad_score_sum_in, grad_lse_in, logits_in,
                                                    expert_ids_in, score_func, order, renormalize,
                                                    routed_scaling);
  const auto logits = logits_in.contiguous();
  const auto ids = expert_ids_in.contiguous();
  const int64_t T = p.num_tokens, E = p.num_experts, k = p.k;
  const auto fdtype = routing_dtype(logits);
  const auto grad_w = grad_weights_in.to(fdtype).contiguous();
  const auto grad_ss = grad_score_sum_in ? grad_score_sum_in->to(fdtype).contiguous() : at::Tensor();
  const auto grad_lse = grad_lse_in ? grad_lse_in->to(fdtype).contiguous() : at::Tensor();
  auto grad_logits = at::empty_like(logits);

  MOE_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "topk_gating_backward", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const int* ip = ids.data_ptr<int>();
    const acc* gwp = grad_w.data_ptr<acc>();
    const acc* gssp = grad_ss.defined() ? grad_ss.data_ptr<acc>() : nullptr;
    const acc* glp = grad_lse.defined() ? grad_lse.data_ptr<acc>() : nullptr;
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<acc> dscore(E);
      for (int64_t t = t0; t < t1; ++t) {
        gate_token_backward<acc>(p, lp + t * E, ip + t * k, gwp + t * k, gssp, glp ? glp[t] : acc(0),
                                 dscore.data(), out + t * E);
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("topk_gating", &topk_gating_cpu);
  m.impl("topk_gating_backward", &topk_gating_backward_cpu);
}

}  // namespace moe_ext
