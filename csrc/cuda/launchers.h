// Launchers of the routing kernels (topk_gating, permute, unpermute): raw pointers, sizes and a
// cudaStream_t, no torch types, so the .cu files that define them compile without torch headers.
// The torch glue (topk_gating_cuda.cpp, permute_cuda.cpp) validates, allocates and calls these.
//
// Each launcher returns the first cudaGetLastError() after its launches (the .cu files cannot use
// C10_CUDA_KERNEL_LAUNCH_CHECK); the glue wraps every call in C10_CUDA_CHECK. None synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/activation.h"
#include "../common/routing.h"

namespace moe_ext::cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// ---- topk_gating ----
// logits [T, E] contiguous, of dtype `in`. "acc" below is float, or double when in == kFloat64.
// bias [E] acc or null; weights [T, k] acc; ids [T, k] int32; lse [T] acc;
// tokens_per_expert [E] int32; score_sum [E] acc. workspace: topk_gating_workspace_bytes(p, in) bytes.
// Requires p.num_tokens > 0.
size_t topk_gating_workspace_bytes(const GatingParams& p, DType in);
cudaError_t launch_topk_gating(const GatingParams& p, DType in, const void* logits, const void* bias,
                               void* weights, int* ids, void* lse, int* tokens_per_expert,
                               void* score_sum, void* workspace, cudaStream_t stream);

// grad_weights [T, k] acc; grad_score_sum [E] acc or null; grad_lse [T] acc or null;
// grad_logits [T, E] of dtype `in`. workspace: topk_gating_backward_workspace_bytes(p, in) bytes.
size_t topk_gating_backward_workspace_bytes(const GatingParams& p, DType in);
cudaError_t launch_topk_gating_backward(const GatingParams& p, DType in, const void* logits,
                                        const int* ids, const void* grad_weights,
                                        const void* grad_score_sum, const void* grad_lse,
                                        void* grad_logits, void* workspace, cudaStream_t stream);

// ---- permute ----
// ids [slots] (int32 if ids_int32 else int64), slots = T * k > 0, slots < 2^31.
// Writes expert_offsets [E + 1] int64 (clamped to max_rows), row_map [slots] int64 (-1: dropped),
// and x_sorted [max_rows, H] (rows past expert_offsets[E] zeroed) from x [T, H] (elem_size bytes
// per element, any dtype). workspace: permute_workspace_bytes(...) bytes.
size_t permute_workspace_bytes(int64_t slots, int64_t num_experts);
cudaError_t launch_permute(const void* x, size_t elem_size, int64_t T, int64_t H, const void* ids,
                           bool ids_int32, int64_t k, int64_t num_experts, int64_t max_rows,
                           void* x_sorted, int64_t* expert_offsets, int64_t* row_map, void* workspace,
                           cudaStream_t stream);

// ---- unpermute ----
// y[t] = sum_j w[t, j] * y_sorted[row_map[t, j]] over j = 0..k-1 in order (rows < 0 skipped), acc
// accumulation. y_sorted [R, H], y [T, H] of dtype `dt`; weights [T, k] acc or null. T > 0.
cudaError_t launch_unpermute(DType dt, const void* y_sorted, const int64_t* row_map, const void* weights,
                             void* y, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream);

// grad_y [T, H] and y_sorted [R, H] of dtype `dt`; weights [T, k] acc or null.
// Writes grad_y_sorted [R, H] (rows no slot references: zero) and, when weights is given,
// grad_weights_acc [T, k] acc. workspace: unpermute_backward_workspace_bytes(R) bytes.
size_t unpermute_backward_workspace_bytes(int64_t R);
cudaError_t launch_unpermute_backward(DType dt, const void* grad_y, const void* y_sorted,
                                      const int64_t* row_map, const void* weights, void* grad_y_sorted,
                                      void* grad_weights_acc, void* workspace, int64_t T, int64_t k,
                                      int64_t H, int64_t R, cudaStream_t stream);

// ---- gated_activation ----
// h [M, 2F] (gate columns, then up columns), out [M, F], grad [M, F], grad_h [M, 2F], all contiguous
// and of dtype `dt`; M * F > 0. Elementwise (common/activation.h), 16-byte accesses when F and the
// pointers allow.
cudaError_t launch_gated_activation(DType dt, Activation act, const void* h, void* out, int64_t M, int64_t F,
                                    cudaStream_t stream);
cudaError_t launch_gated_activation_backward(DType dt, Activation act, const void* grad, const void* h,
                                             void* grad_h, int64_t M, int64_t F, cudaStream_t stream);

// ---- capacity_reroute ----
// ids [T, k] (int32 if ids_int32 else int64), rewritten in place; keys [T, E] fp32; load: E ints of
// scratch (zeroed by the kernel; used only when E is too large for shared memory). One warp makes the
// sequential greedy pass of common/routing.h reroute_capacity, slot by slot in the same order.
cudaError_t launch_capacity_reroute(void* ids, bool ids_int32, const float* keys, int64_t T, int64_t k, int64_t E,
                                    int64_t capacity, int* load, cudaStream_t stream);

}  // namespace moe_ext::cuda
