// Autograd kernels of the differentiable ops (DispatchKey::Autograd, so CPU and CUDA alike).
//
// Registered in C++ on the ops themselves, not as Python autograd Functions around them, so that
//  - torch.ops.moe_ext.* are differentiable when called directly: from C++, from a torch.export
//    program run with parameters that require grad, from code that bypasses moe_ext.functional;
//  - a call whose inputs need no gradient (inference, torch.no_grad, frozen weights) goes straight to
//    the back end with no Python on the way (a Python autograd kernel costs ~4 us a call, as much as a
//    decode-sized kernel launch).
// Each backward is written with the registered ops only, so torch.compile / AOTAutograd trace it
// through the fake kernels. Double backward is not supported (the backward ops have no autograd
// rules): under create_graph=True the gradients carry a node that raises when differentiated, as
// Python's @once_differentiable does, instead of a silently incomplete second derivative.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

namespace moe_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A typed handle of op moe_ext::name, looked up once per call site.
#define MOE_OP(var, name, ...)                                                                \
  static const auto var = c10::Dispatcher::singleton().findSchemaOrThrow("moe_ext::" name, "") \
                              .typed<__VA_ARGS__>()

using GatingOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using GatingSig = GatingOut(const Tensor&, int64_t, c10::string_view, c10::string_view, bool, const OptTensor&,
                            int64_t, int64_t, double, c10::string_view);
using GatingBwdSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                            c10::string_view, c10::string_view, bool, double);
using PermuteOut = std::tuple<Tensor, Tensor, Tensor>;
using PermuteSig = PermuteOut(const Tensor&, const Tensor&, int64_t, int64_t);
using UnpermuteSig = Tensor(const Tensor&, const Tensor&, const OptTensor&);
using UnpermuteBwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&);
using GemmSig = Tensor(const Tensor&, const Tensor&, const Tensor&, bool, const OptTensor&);
using WgradSig = Tensor(const Tensor&, const Tensor&, const Tensor&);
using ActSig = Tensor(const Tensor&, c10::string_view);
using ActBwdSig = Tensor(const Tensor&, const Tensor&, c10::string_view);

bool needs_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t.has_value() && needs_grad(*t); }

template <typename... Ts>
bool recording(const Ts&... ts) {
  return at::GradMode::is_enabled() && (needs_grad(ts) || ...);
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// An Error node behind the pointer type of this torch's autograd graph: std::shared_ptr<Node> up to
// torch 2.11 at least (the GPU machines' version), c10::intrusive_ptr<Node> in 2.14.
template <typename NodePtr>
NodePtr make_error_node(const std::string& msg, torch::autograd::edge_list&& edges) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<torch::autograd::Error>(msg, std::move(edges));
  else
    return c10::make_intrusive<torch::autograd::Error>(msg, std::move(edges));
}

// Runs a backward without recording it. Under create_graph=True, with any input of the backward
// (incoming gradients, saved tensors) requiring grad, the gradients get an Error node whose edges lead
// to those inputs: a second differentiation reaches it and raises, as with Python's
// @once_differentiable, instead of returning a silently incomplete second derivative.
template <typename F>
variable_list once_differentiable(const char* name, const variable_list& grads, const variable_list& saved,
                                  F&& compute) {
  const bool create_graph = at::GradMode::is_enabled();
  variable_list outs;
  {
    at::NoGradGuard no_grad;
    outs = compute();
  }
  if (!create_graph) return outs;
  variable_list inputs;
  for (const auto* list : {&grads, &saved})
    for (const Tensor& t : *list)
      if (needs_grad(t)) inputs.push_back(t);
  if (inputs.empty()) return outs;
  const std::string msg = std::string("moe_ext::") + name +
                          ": double backward is not supported (the op's backward is not differentiable)";
  return torch::autograd::wrap_outputs(inputs, std::move(outs), [&](torch::autograd::edge_list&& edges) {
    return make_error_node<torch::autograd::function_constructor::result_type>(msg, std::move(edges));
  });
}

// ------------------------------------------------------------------------------------ topk_gating
struct TopkGating : torch::autograd::Function<TopkGating> {
  // The op's CPU / CUDA kernel (below the Autograd key): what forward runs, and the whole call when
  // nothing needs a gradient.
  static GatingOut below(const Tensor& logits, int64_t k, c10::string_view score_func, c10::string_view order,
                         bool renormalize, const OptTensor& expert_bias, int64_t num_groups, int64_t topk_groups,
                         double routed_scaling, c10::string_view group_score) {
    MOE_OP(gating, "topk_gating", GatingSig);
    at::AutoDispatchBelowADInplaceOrView guard;
    return gating.call(logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups, routed_scaling,
                       group_score);
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& logits, int64_t k, c10::string_view score_func,
                               c10::string_view order, bool renormalize, const OptTensor& expert_bias,
                               int64_t num_groups, int64_t topk_groups, double routed_scaling,
                               c10::string_view group_score) {
    auto [w, ids, tpe, score_sum, lse] = below(logits, k, score_func, order, renormalize, expert_bias, num_groups,
                                               topk_groups, routed_scaling, group_score);
    ctx->save_for_backward({logits, ids});
    ctx->saved_data["score_func"] = std::string(score_func);
    ctx->saved_data["order"] = std::string(order);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["routed_scaling"] = routed_scaling;
    ctx->mark_non_differentiable({ids, tpe});
    ctx->set_materialize_grads(false);
    return {w, ids, tpe, score_sum, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    MOE_OP(gating_bwd, "topk_gating_backward", GatingBwdSig);
    const auto saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &ids = saved[1];
    Tensor grad_w = grads[0];
    if (!grad_w.defined())
      grad_w = at::zeros(ids.sizes(), logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble
                                                                                                 : at::kFloat));
    const std::string score_func = ctx->saved_data["score_func"].toStringRef();
    const std::string order = ctx->saved_data["order"].toStringRef();
    return once_differentiable("topk_gating", grads, saved, [&]() -> variable_list {
      Tensor grad = gating_bwd.call(grad_w, opt(grads[3]), opt(grads[4]), logits, ids, score_func, order,
                                    ctx->saved_data["renormalize"].toBool(),
                                    ctx->saved_data["routed_scaling"].toDouble());
      return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    });
  }
};

GatingOut topk_gating_autograd(const Tensor& logits, int64_t k, c10::string_view score_func, c10::string_view order,
                               bool renormalize, const OptTensor& expert_bias, int64_t num_groups,
                               int64_t topk_groups, double routed_scaling, c10::string_view group_score) {
  if (!recording(logits))
    return TopkGating::below(logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups,
                             routed_scaling, group_score);
  auto out = TopkGating::apply(logits, k, score_func, order, renormalize, expert_bias, num_groups, topk_groups,
                               routed_scaling, group_score);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---------------------------------------------------------------------------------------- permute
struct Permute : torch::autograd::Function<Permute> {
  static PermuteOut below(const Tensor& x, const Tensor& expert_ids, int64_t num_experts, int64_t max_rows) {
    MOE_OP(permute, "permute", PermuteSig);
    at::AutoDispatchBelowADInplaceOrView guard;
    return permute.call(x, expert_ids, num_experts, max_rows);
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& expert_ids, int64_t num_experts,
                               int64_t max_rows) {
    auto [x_sorted, offsets, row_map] = below(x, expert_ids, num_experts, max_rows);
    ctx->save_for_backward({row_map});
    ctx->mark_non_differentiable({offsets, row_map});
    return {x_sorted, offsets, row_map};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    MOE_OP(unpermute, "unpermute", UnpermuteSig);
    const auto saved = ctx->get_saved_variables();
    // d x[t] = sum over t's kept slots of d x_sorted[row]: the unweighted unpermute.
    return once_differentiable("permute", grads, saved, [&]() -> variable_list {
      return {unpermute.call(grads[0], saved[0], std::nullopt), Tensor(), Tensor(), Tensor()};
    });
  }
};

PermuteOut permute_autograd(const Tensor& x, const Tensor& expert_ids, int64_t num_experts, int64_t max_rows) {
  if (!recording(x)) return Permute::below(x, expert_ids, num_experts, max_rows);
  auto out = Permute::apply(x, expert_ids, num_experts, max_rows);
  return {out[0], out[1], out[2]};
}

// -------------------------------------------------------------------------------------- unpermute
struct Unpermute : torch::autograd::Function<Unpermute> {
  static Tensor below(const Tensor& y_sorted, const Tensor& row_map, const OptTensor& weights) {
    MOE_OP(unpermute, "unpermute", UnpermuteSig);
    at::AutoDispatchBelowADInplaceOrView guard;
    return unpermute.call(y_sorted, row_map, weights);
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& y_sorted, const Tensor& row_map, const OptTensor& weights) {
    ctx->save_for_backward({y_sorted, row_map, weights.value_or(Tensor())});
    return below(y_sorted, row_map, weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    MOE_OP(unpermute_bwd, "unpermute_backward", UnpermuteBwdSig);
    const auto saved = ctx->get_saved_variables();
    const Tensor& weights = saved[2];
    return once_differentiable("unpermute", grads, saved, [&]() -> variable_list {
      auto [grad_ys, grad_w] = unpermute_bwd.call(grads[0], saved[0], saved[1], opt(weights));
      return {grad_ys, Tensor(), weights.defined() ? grad_w : Tensor()};
    });
  }
};

Tensor unpermute_autograd(const Tensor& y_sorted, const Tensor& row_map, const OptTensor& weights) {
  if (!recording(y_sorted, weights)) return Unpermute::below(y_sorted, row_map, weights);
  return Unpermute::apply(y_sorted, row_map, weights);
}

// ----------------------------------------------------------------------------------- grouped_gemm
struct GroupedGemm : torch::autograd::Function<GroupedGemm> {
  static Tensor below(const Tensor& a, const Tensor& b, const Tensor& expert_offsets, bool trans_b,
                      const OptTensor& bias) {
    MOE_OP(gemm, "grouped_gemm", GemmSig);
    at::AutoDispatchBelowADInplaceOrView guard;
    return gemm.call(a, b, expert_offsets, trans_b, bias);
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b, const Tensor& expert_offsets,
                        bool trans_b, const OptTensor& bias) {
    ctx->save_for_backward({a, b, expert_offsets});
    ctx->saved_data["trans_b"] = trans_b;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return below(a, b, expert_offsets, trans_b, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    MOE_OP(gemm, "grouped_gemm", GemmSig);
    MOE_OP(wgrad, "grouped_gemm_wgrad", WgradSig);
    const auto saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &b = saved[1], &offsets = saved[2];
    const bool trans_b = ctx->saved_data["trans_b"].toBool();
    return once_differentiable("grouped_gemm", grads, saved, [&]() -> variable_list {
      const Tensor grad_c = grads[0].contiguous();
      Tensor grad_a, grad_b, grad_bias;
      // Edges are the tensor arguments: a, b, expert_offsets, then bias when given. Only what this
      // backward pass asks for is computed (torch.autograd.grad(loss, x) skips the weight gradient).
      if (ctx->needs_input_grad(0)) grad_a = gemm.call(grad_c, b, offsets, !trans_b, std::nullopt);
      if (ctx->needs_input_grad(1))
        grad_b = trans_b ? wgrad.call(grad_c, a, offsets) : wgrad.call(a, grad_c, offsets);
      if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
        // Per-expert column sums of grad_c, as a K = 1 weight gradient: deterministic, no atomics.
        grad_bias = wgrad.call(at::ones({grad_c.size(0), 1}, grad_c.options()), grad_c, offsets).squeeze(1);
      }
      return {grad_a, grad_b, Tensor(), Tensor(), grad_bias};
    });
  }
};

Tensor grouped_gemm_autograd(const Tensor& a, const Tensor& b, const Tensor& expert_offsets, bool trans_b,
                             const OptTensor& bias) {
  if (!recording(a, b, bias)) return GroupedGemm::below(a, b, expert_offsets, trans_b, bias);
  return GroupedGemm::apply(a, b, expert_offsets, trans_b, bias);
}

// ------------------------------------------------------------------------------- gated_activation
struct GatedActivation : torch::autograd::Function<GatedActivation> {
  static Tensor below(const Tensor& h, c10::string_view activation) {
    MOE_OP(act, "gated_activation", ActSig);
    at::AutoDispatchBelowADInplaceOrView guard;
    return act.call(h, activation);
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& h, c10::string_view activation) {
    ctx->save_for_backward({h});
    ctx->saved_data["activation"] = std::string(activation);
    return below(h, activation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    MOE_OP(act_bwd, "gated_activation_backward", ActBwdSig);
    // act(gate) is recomputed from h: one [M, 2F] tensor saved instead of h and act(gate).
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const auto saved = ctx->get_saved_variables();
    return once_differentiable("gated_activation", grads, saved, [&]() -> variable_list {
      return {act_bwd.call(grads[0], saved[0], activation), Tensor()};
    });
  }
};

Tensor gated_activation_autograd(const Tensor& h, c10::string_view activation) {
  if (!recording(h)) return GatedActivation::below(h, activation);
  return GatedActivation::apply(h, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, Autograd, m) {
  m.impl("topk_gating", &topk_gating_autograd);
  m.impl("permute", &permute_autograd);
  m.impl("unpermute", &unpermute_autograd);
  m.impl("grouped_gemm", &grouped_gemm_autograd);
  m.impl("gated_activation", &gated_activation_autograd);
  // Integer output: nothing to differentiate, and no "autograd kernel not registered" warning when
  // its keys (router scores) require grad.
  m.impl("capacity_reroute", torch::CppFunction::makeFallthrough());
}

}  // namespace moe_ext
