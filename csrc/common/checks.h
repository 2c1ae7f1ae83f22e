// Input validation shared by the CPU and CUDA entry points of every op.
//
// Each op has one check_* function; both back ends call it first, so a bad input fails with the same
// message on every device. Messages name the op, the argument, and the expected and actual
// shape/dtype/device. Value checks (ids in range, offsets monotonic) read the data, so they run where
// that is free (CPU tensors), and on CUDA only when MOE_EXT_DEBUG_CHECKS=1 (they synchronise).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "activation.h"
#include "routing.h"

namespace moe_ext {

std::string shape_str(at::IntArrayRef sizes);

// Tensor property checks, each throwing a c10::Error that names `op` and `name`.
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout);
void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                const char* what);
void check_float_dtype(const char* op, const char* name, const at::Tensor& t);
void check_index_dtype(const char* op, const char* name, const at::Tensor& t, bool allow_int32,
                       bool allow_int64);
void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref);
void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref);

// Whether value checks that read device data may run (always for CPU tensors).
bool value_checks_enabled(const at::Tensor& t);

ScoreFunc parse_score_func(const char* op, c10::string_view s);
GateOrder parse_order(const char* op, c10::string_view s);

// ---- per-op checks ----
GatingParams check_topk_gating(const at::Tensor& logits, int64_t k, c10::string_view score_func,
                               c10::string_view order, bool renormalize,
                               const std::optional<at::Tensor>& expert_bias, int64_t num_groups,
                               int64_t topk_groups, double routed_scaling, c10::string_view group_score);
GatingParams check_topk_gating_backward(const at::Tensor& grad_weights,
                                        const std::optional<at::Tensor>& grad_score_sum,
                                        const std::optional<at::Tensor>& grad_lse,
                                        const at::Tensor& logits, const at::Tensor& expert_ids,
                                        c10::string_view score_func, c10::string_view order,
                                        bool renormalize, double routed_scaling);
// Returns the number of rows of x_sorted.
int64_t check_permute(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts,
                      int64_t max_rows);
void check_unpermute(const char* op, const at::Tensor& y_sorted, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights);
void check_unpermute_backward(const at::Tensor& grad_y, const at::Tensor& y_sorted,
                              const at::Tensor& row_map, const std::optional<at::Tensor>& weights);
void check_grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                        bool trans_b, const std::optional<at::Tensor>& bias);
void check_grouped_gemm_wgrad(const at::Tensor& x, const at::Tensor& y,
                              const at::Tensor& expert_offsets);

// gated_activation (grad undefined) and gated_activation_backward: h [M, 2F], grad [M, F].
Activation check_gated_activation(const char* op, const at::Tensor& h, c10::string_view activation,
                                  const at::Tensor* grad);

void check_capacity_reroute(const at::Tensor& expert_ids, const at::Tensor& keys, int64_t capacity);

}  // namespace moe_ext
