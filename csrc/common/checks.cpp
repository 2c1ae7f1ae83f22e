#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <charconv>
#include <cstdlib>
#include <limits>
#include <sstream>

namespace moe_ext {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "moe_ext.", op, ": ", name, " must be ", dim, "-D ", layout,
              ", got a ", t.dim(), "-D tensor of shape ", shape_str(t.sizes()));
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "moe_ext.", op, ": ", name, ".size(", dim, ") must equal ", what,
              " = ", expected, ", got shape ", shape_str(t.sizes()));
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble, "moe_ext.",
              op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", d);
}

void check_index_dtype(const char* op, const char* name, const at::Tensor& t, bool allow_int32,
                       bool allow_int64) {
  const auto d = t.scalar_type();
  const bool ok = (allow_int32 && d == at::kInt) || (allow_int64 && d == at::kLong);
  TORCH_CHECK(ok, "moe_ext.", op, ": ", name, " must be ",
              allow_int32 && allow_int64 ? "int32 or int64" : (allow_int32 ? "int32" : "int64"),
              ", got ", d);
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "moe_ext.", op, ": ", name,
              " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "moe_ext.", op, ": ", name, " must be on ", ref_name,
              "'s device (", ref.device(), "), got ", t.device());
}

bool value_checks_enabled(const at::Tensor& t) {
  if (t.is_cpu()) return true;
  static const bool debug = [] {
    const char* v = std::getenv("MOE_EXT_DEBUG_CHECKS");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return debug;
}

ScoreFunc parse_score_func(const char* op, c10::string_view s) {
  if (s == "softmax") return ScoreFunc::kSoftmax;
  if (s == "sigmoid") return ScoreFunc::kSigmoid;
  TORCH_CHECK(false, "moe_ext.", op, ": score_func must be \"softmax\" or \"sigmoid\", got \"",
              std::string(s.data(), s.size()), "\"");
}

GateOrder parse_order(const char* op, c10::string_view s) {
  if (s == "softmax_topk") return GateOrder::kSoftmaxThenTopk;
  if (s == "topk_softmax") return GateOrder::kTopkThenSoftmax;
  TORCH_CHECK(false, "moe_ext.", op, ": order must be \"softmax_topk\" or \"topk_softmax\", got \"",
              std::string(s.data(), s.size()), "\"");
}

namespace {

static_assert(std::numeric_limits<float>::is_iec559, "double -> float conversion must round, overflowing to inf");

// Shortest text that reads back as v: the default 6 digits print 3.40282e+38 for values on both
// sides of FLT_MAX, one accepted and one refused.
std::string double_str(double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// The kernels apply routed_scaling in the compute type (float unless the logits are fp64), so it
// must be finite and > 0 there: 1e300 would make every fp32 weight inf and 1e-46 every one 0.
void check_routed_scaling(const char* op, double routed_scaling, at::ScalarType logits_dtype) {
  const bool fp64 = logits_dtype == at::kDouble;
  const double s = fp64 ? routed_scaling : static_cast<double>(static_cast<float>(routed_scaling));
  TORCH_CHECK(std::isfinite(s) && s > 0, "moe_ext.", op, ": routed_scaling must be a positive finite number in ",
              fp64 ? "float64" : "float32", " (the compute type of ", logits_dtype, " logits), got ",
              double_str(routed_scaling));
}

GatingParams make_gating_params(const char* op, int64_t T, int64_t E, int64_t k, c10::string_view score_func,
                                c10::string_view order, bool renormalize, int64_t num_groups,
                                int64_t topk_groups, double routed_scaling, at::ScalarType logits_dtype,
                                bool has_bias, int group_top = 2) {
  GatingParams p{};
  p.num_tokens = T;
  p.num_experts = static_cast<int>(E);
  p.k = static_cast<int>(k);
  p.score = parse_score_func(op, score_func);
  p.order = parse_order(op, order);
  TORCH_CHECK(!(p.score == ScoreFunc::kSigmoid && p.order == GateOrder::kTopkThenSoftmax), "moe_ext.", op,
              ": order=\"topk_softmax\" applies to score_func=\"softmax\" only");
  p.renormalize = renormalize;
  p.num_groups = static_cast<int>(num_groups);
  p.topk_groups = static_cast<int>(topk_groups);
  p.group_top = group_top;
  check_routed_scaling(op, routed_scaling, logits_dtype);
  p.routed_scaling = routed_scaling;
  p.has_bias = has_bias;
  return p;
}

}  // namespace

GatingParams check_topk_gating(const at::Tensor& logits, int64_t k, c10::string_view score_func,
                               c10::string_view order, bool renormalize,
                               const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
                               int64_t topk_groups, double routed_scaling, c10::string_view group_score) {
  const char* op = "topk_gating";
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_float_dtype(op, "logits", logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= (1 << 20), "moe_ext.", op, ": logits.size(1) (experts) must be in [1, 2^20], got ", E);
  TORCH_CHECK(k >= 1 && k <= E, "moe_ext.", op, ": k must be in [1, E] = [1, ", E, "], got ", k);
  TORCH_CHECK(num_groups >= 1 && num_groups <= 64 && E % num_groups == 0, "moe_ext.", op,
              ": num_groups must be in [1, 64] and divide E = ", E, ", got ", num_groups);
  if (num_groups > 1) {
    TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, "moe_ext.", op,
                ": topk_groups must be in [1, num_groups] = [1, ", num_groups, "], got ", topk_groups);
    TORCH_CHECK(k <= topk_groups * (E / num_groups), "moe_ext.", op, ": k = ", k,
                " exceeds the experts in the kept groups (topk_groups * E / num_groups = ",
                topk_groups * (E / num_groups), ")");
  }
  if (expert_bias.has_value()) {
    const auto& b = *expert_bias;
    check_dim(op, "expert_bias", b, 1, "[E]");
    check_size(op, "expert_bias", b, 0, E, "logits.size(1) (E)");
    check_float_dtype(op, "expert_bias", b);
    check_same_device(op, "expert_bias", b, "logits", logits);
  }
  TORCH_CHECK(group_score == "top2_sum" || group_score == "max", "moe_ext.", op,
              ": group_score must be \"top2_sum\" or \"max\", got \"", group_score, "\"");
  return make_gating_params(op, T, E, k, score_func, order, renormalize, num_groups,
                            num_groups > 1 ? topk_groups : 1, routed_scaling, logits.scalar_type(),
                            expert_bias.has_value(), group_score == "max" ? 1 : 2);
}

namespace {

// Expert ids must lie in [lo, E). Reads the data, so only where value checks are enabled.
void check_id_values(const char* op, const char* name, const at::Tensor& ids, int64_t lo, int64_t E) {
  if (!value_checks_enabled(ids) || ids.numel() == 0) return;
  const auto flat = ids.reshape(-1).to(at::kCPU, at::kLong).contiguous();
  const int64_t* d = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    TORCH_CHECK(d[i] >= lo && d[i] < E, "moe_ext.", op, ": ", name, " holds ", d[i], " at flat index ", i,
                ", expected ", lo < 0 ? "-1 (dropped) or " : "", "a value in [0, ", E, ")");
  }
}

}  // namespace

GatingParams check_topk_gating_backward(const at::Tensor& grad_weights,
                                        const std::optional<at::Tensor>& grad_score_sum,
                                        const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& logits, const at::Tensor& expert_ids,
                                        c10::string_view score_func, c10::string_view order,
                                        bool renormalize, double routed_scaling) {
  const char* op = "topk_gating_backward";
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_float_dtype(op, "logits", logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_dim(op, "expert_ids", expert_ids, 2, "[T, k]");
  check_index_dtype(op, "expert_ids", expert_ids, true, false);
  check_size(op, "expert_ids", expert_ids, 0, T, "logits.size(0) (T)");
  const int64_t k = expert_ids.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "moe_ext.", op, ": expert_ids.size(1) (k) must be in [1, ", E, "], got ", k);
  check_same_device(op, "expert_ids", expert_ids, "logits", logits);
  check_dim(op, "grad_weights", grad_weights, 2, "[T, k]");
  check_size(op, "grad_weights", grad_weights, 0, T, "T");
  check_size(op, "grad_weights", grad_weights, 1, k, "k");
  check_float_dtype(op, "grad_weights", grad_weights);
  check_same_device(op, "grad_weights", grad_weights, "logits", logits);
  if (grad_score_sum.has_value()) {
    check_dim(op, "grad_score_sum", *grad_score_sum, 1, "[E]");
    check_size(op, "grad_score_sum", *grad_score_sum, 0, E, "E");
    check_float_dtype(op, "grad_score_sum", *grad_score_sum);
    check_same_device(op, "grad_score_sum", *grad_score_sum, "logits", logits);
  }
  if (grad_lse.has_value()) {
    check_dim(op, "grad_lse", *grad_lse, 1, "[T]");
    check_size(op, "grad_lse", *grad_lse, 0, T, "T");
    check_float_dtype(op, "grad_lse", *grad_lse);
    check_same_device(op, "grad_lse", *grad_lse, "logits", logits);
  }
  check_id_values(op, "expert_ids", expert_ids, 0, E);
  return make_gating_params(op, T, E, k, score_func, order, renormalize, 1, 1, routed_scaling,
                            logits.scalar_type(), false);
}

namespace {

// expert_ids [T, k], int32 or int64, with T = ref.size(0), on ref's device.
void check_expert_ids(const char* op, const at::Tensor& ids, const char* ref_name, const at::Tensor& ref) {
  check_dim(op, "expert_ids", ids, 2, "[T, k]");
  check_index_dtype(op, "expert_ids", ids, true, true);
  const std::string what = std::string(ref_name) + ".size(0) (T)";
  check_size(op, "expert_ids", ids, 0, ref.size(0), what.c_str());
  check_same_device(op, "expert_ids", ids, ref_name, ref);
}

}  // namespace

int64_t check_permute(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts,
                      int64_t max_rows) {
  const char* op = "permute";
  check_dim(op, "x", x, 2, "[T, H]");
  check_float_dtype(op, "x", x);
  check_expert_ids(op, expert_ids, "x", x);
  TORCH_CHECK(num_experts >= 1 && num_experts <= (int64_t(1) << 30), "moe_ext.", op,
              ": num_experts must be in [1, 2^30], got ", num_experts);
  TORCH_CHECK(max_rows >= -1, "moe_ext.", op, ": max_rows must be -1 (T * k) or >= 0, got ", max_rows);
  check_id_values(op, "expert_ids", expert_ids, -1, num_experts);
  const int64_t slots = expert_ids.numel();
  return max_rows < 0 ? slots : max_rows;
}

void check_unpermute(const char* op, const at::Tensor& y_sorted, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights) {
  check_dim(op, "y_sorted", y_sorted, 2, "[rows, H]");
  check_float_dtype(op, "y_sorted", y_sorted);
  check_dim(op, "row_map", row_map, 2, "[T, k]");
  check_index_dtype(op, "row_map", row_map, false, true);
  check_same_device(op, "row_map", row_map, "y_sorted", y_sorted);
  if (weights.has_value()) {
    const auto& w = *weights;
    check_dim(op, "weights", w, 2, "[T, k]");
    check_size(op, "weights", w, 0, row_map.size(0), "row_map.size(0) (T)");
    check_size(op, "weights", w, 1, row_map.size(1), "row_map.size(1) (k)");
    check_float_dtype(op, "weights", w);
    check_same_device(op, "weights", w, "y_sorted", y_sorted);
  }
  check_id_values(op, "row_map", row_map, -1, y_sorted.size(0));
}

void check_unpermute_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                              const at::Tensor& row_map, const std::optional<at::Tensor>& weights) {
  const char* op = "unpermute_backward";
  check_unpermute(op, y_sorted, row_map, weights);
  check_dim(op, "grad_y", grad_y, 2, "[T, H]");
  check_size(op, "grad_y", grad_y, 0, row_map.size(0), "row_map.size(0) (T)");
  check_size(op, "grad_y", grad_y, 1, y_sorted.size(1), "y_sorted.size(1) (H)");
  check_float_dtype(op, "grad_y", grad_y);
  check_same_device(op, "grad_y", grad_y, "y_sorted", y_sorted);
}

namespace {

void check_offsets(const char* op, const at::Tensor& offsets, const char* ref_name, const at::Tensor& ref,
                   int64_t E, int64_t M) {
  check_dim(op, "expert_offsets", offsets, 1, "[E + 1]");
  check_index_dtype(op, "expert_offsets", offsets, false, true);
  check_size(op, "expert_offsets", offsets, 0, E + 1, "E + 1");
  check_same_device(op, "expert_offsets", offsets, ref_name, ref);
  if (!value_checks_enabled(offsets)) return;
  const auto o = offsets.to(at::kCPU).contiguous();
  const int64_t* d = o.data_ptr<int64_t>();
  TORCH_CHECK(d[0] >= 0 && d[E] <= M, "moe_ext.", op, ": expert_offsets must lie in [0, ", M,
              "] (the rows of ", ref_name, "), got offsets[0] = ", d[0], " and offsets[", E, "] = ", d[E]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(d[e] <= d[e + 1], "moe_ext.", op, ": expert_offsets must be non-decreasing, got offsets[",
                e, "] = ", d[e], " > offsets[", e + 1, "] = ", d[e + 1]);
  }
}

}  // namespace

void check_grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                        bool trans_b, const std::optional<at::Tensor>& bias) {
  const char* op = "grouped_gemm";
  check_dim(op, "a", a, 2, "[M, K]");
  check_float_dtype(op, "a", a);
  check_dim(op, "b", b, 3, trans_b ? "[E, N, K] (trans_b=True)" : "[E, K, N]");
  check_same_dtype(op, "b", b, "a", a);
  check_same_device(op, "b", b, "a", a);
  const int64_t E = b.size(0);
  const int64_t K = a.size(1);
  check_size(op, "b", b, trans_b ? 2 : 1, K, "a.size(1) (K)");
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  check_offsets(op, expert_offsets, "a", a, E, a.size(0));
  if (bias.has_value()) {
    const auto& bi = *bias;
    check_dim(op, "bias", bi, 2, "[E, N]");
    check_size(op, "bias", bi, 0, E, "b's experts (E)");
    check_size(op, "bias", bi, 1, N, "b's output columns (N)");
    check_same_dtype(op, "bias", bi, "a", a);
    check_same_device(op, "bias", bi, "a", a);
  }
}

void check_grouped_gemm_wgrad(const at::Tensor& x, const at::Tensor& y, const at::Tensor& expert_offsets) {
  const char* op = "grouped_gemm_wgrad";
  check_dim(op, "x", x, 2, "[M, P]");
  check_float_dtype(op, "x", x);
  check_dim(op, "y", y, 2, "[M, Q]");
  check_same_dtype(op, "y", y, "x", x);
  check_same_device(op, "y", y, "x", x);
  check_size(op, "y", y, 0, x.size(0), "x.size(0) (M)");
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) >= 2, "moe_ext.", op,
              ": expert_offsets must be 1-D [E + 1] with E >= 1, got shape ", shape_str(expert_offsets.sizes()));
  check_offsets(op, expert_offsets, "x", x, expert_offsets.size(0) - 1, x.size(0));
}

void check_capacity_reroute(const at::Tensor& expert_ids, const at::Tensor& keys, int64_t capacity) {
  const char* op = "capacity_reroute";
  check_dim(op, "keys", keys, 2, "[T, E]");
  check_float_dtype(op, "keys", keys);
  check_expert_ids(op, expert_ids, "keys", keys);
  TORCH_CHECK(capacity >= 0, "moe_ext.", op, ": capacity must be >= 0, got ", capacity);
  check_id_values(op, "expert_ids", expert_ids, -1, keys.size(1));
}

Activation check_gated_activation(const char* op, const at::Tensor& h, c10::string_view activation,
                                  const at::Tensor* grad) {
  Activation a;
  if (activation == "silu") {
    a = Activation::kSilu;
  } else if (activation == "gelu") {
    a = Activation::kGelu;
  } else if (activation == "gelu_tanh") {
    a = Activation::kGeluTanh;
  } else if (activation == "swigluoai") {
    a = Activation::kSwigluOai;
  } else {
    TORCH_CHECK(false, "moe_ext.", op, ": activation must be \"silu\", \"gelu\", \"gelu_tanh\" or \"swigluoai\", ",
                "got \"", std::string(activation.data(), activation.size()), "\"");
  }
  const char* layout =
      interleaved(a) ? "[M, 2F] (gate and up columns interleaved)" : "[M, 2F] (gate columns, then up columns)";
  check_dim(op, "h", h, 2, layout);
  check_float_dtype(op, "h", h);
  TORCH_CHECK(h.size(1) % 2 == 0, "moe_ext.", op, ": h must be ", layout, ", got shape ", shape_str(h.sizes()),
              " whose last dim is odd");
  if (grad != nullptr) {
    check_dim(op, "grad", *grad, 2, "[M, F]");
    check_size(op, "grad", *grad, 0, h.size(0), "h.size(0) (M)");
    check_size(op, "grad", *grad, 1, h.size(1) / 2, "h.size(1) / 2 (F)");
    check_same_dtype(op, "grad", *grad, "h", h);
    check_same_device(op, "grad", *grad, "h", h);
  }
  return a;
}

}  // namespace moe_ext
