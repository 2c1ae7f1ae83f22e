// C entry points over csrc/cuda/launchers.h and gemm/grouped_gemm_launch.h for the Python side of the
// CUDA emulation (emu_ops.py): plain integers and pointers, so ctypes can call them. Each returns the
// launcher's cudaError_t; emu_last_message() says what failed.
#include "cuda/gemm/grouped_gemm_launch.h"
#include "cuda/launchers.h"

using namespace moe_ext;
using namespace moe_ext::cuda;

namespace {
GatingParams gating_params(int64_t T, int E, int k, int score, int order, int renormalize, int groups,
                           int topk_groups, double scaling, int has_bias, int group_top = 2) {
  GatingParams p{};
  p.num_tokens = T;
  p.num_experts = E;
  p.k = k;
  p.score = static_cast<ScoreFunc>(score);
  p.order = static_cast<GateOrder>(order);
  p.renormalize = renormalize != 0;
  p.num_groups = groups;
  p.topk_groups = topk_groups;
  p.group_top = group_top;
  p.routed_scaling = scaling;
  p.has_bias = has_bias != 0;
  return p;
}
}  // namespace

extern "C" {

size_t emu_topk_gating_workspace_bytes(int64_t T, int E, int k, int score, int order, int renormalize, int groups,
                                        int topk_groups, double scaling, int group_top, int has_bias, int dtype) {
  return topk_gating_workspace_bytes(
      gating_params(T, E, k, score, order, renormalize, groups, topk_groups, scaling, has_bias, group_top),
      DType(dtype));
}

int emu_topk_gating(int64_t T, int E, int k, int score, int order, int renormalize, int groups, int topk_groups,
                     double scaling, int group_top, int dtype, const void* logits, const void* bias, void* weights,
                     int* ids, void* lse, int* tokens_per_expert, void* score_sum, void* workspace) {
  const GatingParams p =
      gating_params(T, E, k, score, order, renormalize, groups, topk_groups, scaling, bias != nullptr, group_top);
  return launch_topk_gating(p, DType(dtype), logits, bias, weights, ids, lse, tokens_per_expert, score_sum,
                            workspace, nullptr);
}

size_t emu_topk_gating_backward_workspace_bytes(int64_t T, int E, int k, int score, int order, int renormalize,
                                                 double scaling, int dtype) {
  return topk_gating_backward_workspace_bytes(gating_params(T, E, k, score, order, renormalize, 1, 1, scaling, 0),
                                              DType(dtype));
}

int emu_topk_gating_backward(int64_t T, int E, int k, int score, int order, int renormalize, double scaling,
                              int dtype, const void* logits, const int* ids, const void* grad_weights,
                              const void* grad_score_sum, const void* grad_lse, void* grad_logits,
                              void* workspace) {
  const GatingParams p = gating_params(T, E, k, score, order, renormalize, 1, 1, scaling, 0);
  return launch_topk_gating_backward(p, DType(dtype), logits, ids, grad_weights, grad_score_sum, grad_lse,
                                     grad_logits, workspace, nullptr);
}

size_t emu_permute_workspace_bytes(int64_t slots, int64_t E) { return permute_workspace_bytes(slots, E); }

int emu_permute(const void* x, size_t elem_size, int64_t T, int64_t H, const void* ids, int ids_int32, int64_t k,
                 int64_t E, int64_t max_rows, void* x_sorted, int64_t* expert_offsets, int64_t* row_map,
                 void* workspace) {
  return launch_permute(x, elem_size, T, H, ids, ids_int32 != 0, k, E, max_rows, x_sorted, expert_offsets, row_map,
                        workspace, nullptr);
}

int emu_unpermute(int dtype, const void* y_sorted, const int64_t* row_map, const void* weights, void* y, int64_t T,
                   int64_t k, int64_t H, int64_t R) {
  return launch_unpermute(DType(dtype), y_sorted, row_map, weights, y, T, k, H, R, nullptr);
}

size_t emu_unpermute_backward_workspace_bytes(int64_t R) { return unpermute_backward_workspace_bytes(R); }

int emu_unpermute_backward(int dtype, const void* grad_y, const void* y_sorted, const int64_t* row_map,
                            const void* weights, void* grad_y_sorted, void* grad_weights, void* workspace, int64_t T,
                            int64_t k, int64_t H, int64_t R) {
  return launch_unpermute_backward(DType(dtype), grad_y, y_sorted, row_map, weights, grad_y_sorted, grad_weights,
                                   workspace, T, k, H, R, nullptr);
}

int emu_gated_activation(int dtype, int act, const void* h, void* out, int64_t M, int64_t F) {
  return launch_gated_activation(DType(dtype), Activation(act), h, out, M, F, nullptr);
}

int emu_gated_activation_backward(int dtype, int act, const void* grad, const void* h, void* grad_h, int64_t M,
                                   int64_t F) {
  return launch_gated_activation_backward(DType(dtype), Activation(act), grad, h, grad_h, M, F, nullptr);
}

int emu_capacity_reroute(void* ids, int ids_int32, const float* keys, int64_t T, int64_t k, int64_t E,
                          int64_t capacity, int* load) {
  return launch_capacity_reroute(ids, ids_int32 != 0, keys, T, k, E, capacity, load, nullptr);
}

// The grouped GEMM's handwritten kernels (gemm/grouped_gemm_aux.cu); sm_count as an H100's.
constexpr int kSmCount = 132;

int emu_grouped_gemm_prefill(void* c, const void* bias, const int64_t* offsets, int64_t E, int64_t M, int64_t N,
                             int elem_size) {
  return gemm::grouped_gemm_prefill(c, bias, offsets, E, M, N, elem_size, kSmCount, nullptr);
}

int emu_grouped_gemm_zero_empty_experts(void* out, const int64_t* offsets, int64_t E, int64_t M, int64_t PQ,
                                        int elem_size) {
  return gemm::grouped_gemm_zero_empty_experts(out, offsets, E, M, PQ, elem_size, kSmCount, nullptr);
}

int emu_grouped_gemm_simt(int form, const void* a, const void* b, void* c, const int64_t* offsets, int64_t rows,
                          int64_t dim_in, int64_t dim_out, int64_t E, int accumulate, int dtype) {
  const gemm::GroupedGemmArgs args{.form = static_cast<gemm::Form>(form), .a = a, .b = b, .c = c, .offsets = offsets,
                                   .rows = rows, .dim_in = dim_in, .dim_out = dim_out, .num_experts = E,
                                   .accumulate = accumulate != 0, .sm_count = kSmCount, .device = 0};
  return gemm::grouped_gemm_simt(args, dtype, nullptr);
}

}  // extern "C"
