// CUDA kernels of topk_gating_backward: d logits from d weights, d score_sum and d lse.
//
// Fast path (fp32/fp16/bf16, E <= 512, k <= 32): one warp per token, the layout of the forward
// warp kernel (lane l holds experts l, l + 32, ...; lane j holds chosen slot j). It is
// routing.h gate_token_backward step by step: the sums over chosen slots run in order j = 0..k-1
// (serial shuffles) and the sum over experts in fixed_order_sum order, so with --fmad=false the
// result matches the CPU kernel bit for bit. Generic path: gate_token_backward per thread.
#include "cuda_utils.cuh"

namespace moe_ext::cuda {
namespace {

constexpr int kWarps = 8;
constexpr size_t kScratchBytes = size_t(256) << 20;

bool use_warp_path(const GatingParams& p, DType in) {
  return in != DType::kFloat64 && p.num_experts <= 512 && p.k <= 32;
}

int64_t generic_chunk(const GatingParams& p, size_t acc_size) {
  int64_t c = static_cast<int64_t>(kScratchBytes / (acc_size * p.num_experts));
  if (c < 1) c = 1;
  return c < p.num_tokens ? c : p.num_tokens;
}

template <int NPL, typename In>
__global__ void __launch_bounds__(kWarps * 32)
gate_backward_warp_kernel(GatingParams p, const In* __restrict__ logits, const int* __restrict__ ids,
                          const float* __restrict__ grad_w, const float* __restrict__ grad_ss,
                          const float* __restrict__ grad_lse, In* __restrict__ grad_logits) {
  const int E = p.num_experts, k = p.k;
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= p.num_tokens) return;  // whole warps leave together
  const bool topk_softmax = p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax;
  const In* lrow = logits + t * E;

  float lg[NPL];
#pragma unroll
  for (int i = 0; i < NPL; ++i) lg[i] = lane + 32 * i < E ? to_float(lrow[lane + 32 * i]) : 0.f;
  float m, sum;
  float sc[NPL];  // exp(l - m), then the scores
  warp_row_stats(lg, lane, E, &m, &sum, &sc);
  const float inv_sum = 1.f / sum;
  // Scores first: a sigmoid divides, and float division may call a slow-path subroutine; keeping the
  // calls before d[] is live avoids register spills around them.
  warp_scores(p.score, lg, inv_sum, sc);

  int my_id = -1;
  float my_gw = 0.f, my_l = 0.f;
  if (lane < k) {
    my_id = ids[t * k + lane];
    my_gw = grad_w[t * k + lane];
    // an out-of-range id (caller error; checked only with MOE_EXT_DEBUG_CHECKS) must not read out of bounds
    my_l = valid_expert(my_id, E) ? to_float(lrow[my_id]) : NAN;
  }
  float chosen_max = -INFINITY;
  for (int j = 0; j < k; ++j) {
    const float l = __shfl_sync(kFullMask, my_l, j);
    if (l > chosen_max) chosen_max = l;
  }
  const float my_score = score_of(p.score, my_l, m, inv_sum);
  const float my_term = topk_softmax ? moe_exp(my_l - chosen_max) : my_score;
  float chosen_sum = 0.f;
  for (int j = 0; j < k; ++j) chosen_sum += __shfl_sync(kFullMask, my_term, j);
  const float my_u = slot_share(p, my_l, my_score, chosen_max, chosen_sum);
  const float my_gs = my_gw * static_cast<float>(p.routed_scaling);
  const float my_gsu = my_gs * my_u;
  float gs_dot_u = 0.f;
  for (int j = 0; j < k; ++j) gs_dot_u += __shfl_sync(kFullMask, my_gsu, j);
  const float my_cg = chosen_grad(p, my_gs, my_u, chosen_sum, gs_dot_u);

  float d[NPL];  // d score, then d logit
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int e = lane + 32 * i;
    d[i] = (grad_ss != nullptr && e < E) ? grad_ss[e] : 0.f;
  }
  // Each chosen slot's gradient goes to its expert's lane: into d score (softmax/sigmoid of all E),
  // or, for topk_softmax, into d logit after the score backward below.
  auto add_chosen = [&](float* dst) {
    for (int j = 0; j < k; ++j) {
      const int id = __shfl_sync(kFullMask, my_id, j);
      const float cg = __shfl_sync(kFullMask, my_cg, j);
#pragma unroll
      for (int i = 0; i < NPL; ++i)
        if (lane + 32 * i == id) dst[i] += cg;
    }
  };
  if (!topk_softmax) add_chosen(d);
  float dot = 0.f;
  if (p.score == ScoreFunc::kSoftmax) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NPL; ++i)
      if (lane + 32 * i < E) s += sc[i] * d[i];
    dot = warp_tree_sum(s);
  }
  // As gate_token_backward: a zero (or absent) lse gradient adds nothing, not 0 * a NaN probability.
  const float glse = grad_lse != nullptr ? grad_lse[t] : 0.f;
#pragma unroll
  for (int i = 0; i < NPL; ++i) d[i] = score_backward(p.score, sc[i], d[i], dot);
  if (glse != 0.f) {  // warp-uniform
#pragma unroll
    for (int i = 0; i < NPL; ++i)  // the softmax probability: softmax scoring's score already
      d[i] += glse * (p.score == ScoreFunc::kSoftmax ? sc[i] : moe_exp(lg[i] - m) * inv_sum);
  }
  if (topk_softmax) add_chosen(d);
#pragma unroll
  for (int i = 0; i < NPL; ++i)
    if (lane + 32 * i < E) grad_logits[t * E + lane + 32 * i] = from_acc<In>(d[i]);
}

template <typename In, typename Acc>
__global__ void gate_backward_generic_kernel(GatingParams p, int64_t t0, int64_t ntok,
                                             const In* __restrict__ logits, const int* __restrict__ ids,
                                             const Acc* __restrict__ grad_w, const Acc* __restrict__ grad_ss,
                                             const Acc* __restrict__ grad_lse, Acc* __restrict__ scratch,
                                             In* __restrict__ grad_logits) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= ntok) return;
  const int64_t t = t0 + i, E = p.num_experts, k = p.k;
  gate_token_backward<Acc>(p, logits + t * E, ids + t * k, grad_w + t * k, grad_ss,
                           grad_lse != nullptr ? grad_lse[t] : Acc(0), scratch + i * E, grad_logits + t * E);
}

template <int NPL, typename In>
cudaError_t launch_warp(const GatingParams& p, const In* logits, const int* ids, const void* grad_w,
                        const void* grad_ss, const void* grad_lse, void* grad_logits, cudaStream_t stream) {
  gate_backward_warp_kernel<NPL, In><<<blocks_for(p.num_tokens, kWarps), kWarps * 32, 0, stream>>>(
      p, logits, ids, static_cast<const float*>(grad_w), static_cast<const float*>(grad_ss),
      static_cast<const float*>(grad_lse), static_cast<In*>(grad_logits));
  MOE_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace

size_t topk_gating_backward_workspace_bytes(const GatingParams& p, DType in) {
  if (use_warp_path(p, in)) return 0;
  const size_t acc = in == DType::kFloat64 ? 8 : 4;
  return align_up(static_cast<size_t>(generic_chunk(p, acc)) * p.num_experts * acc);
}

cudaError_t launch_topk_gating_backward(const GatingParams& p, DType in, const void* logits,
                                        const int* ids, const void* grad_weights,
                                        const void* grad_score_sum, const void* grad_lse,
                                        void* grad_logits, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(in, [&](auto tag) -> cudaError_t {
    using In = typename decltype(tag)::type;
    using Acc = typename AccOf<In>::type;
    const In* lp = static_cast<const In*>(logits);
    if constexpr (sizeof(Acc) == sizeof(float)) {
      if (use_warp_path(p, in)) {
        if (p.num_experts <= 64) return launch_warp<2>(p, lp, ids, grad_weights, grad_score_sum, grad_lse, grad_logits, stream);
        if (p.num_experts <= 128) return launch_warp<4>(p, lp, ids, grad_weights, grad_score_sum, grad_lse, grad_logits, stream);
        if (p.num_experts <= 256) return launch_warp<8>(p, lp, ids, grad_weights, grad_score_sum, grad_lse, grad_logits, stream);
        return launch_warp<16>(p, lp, ids, grad_weights, grad_score_sum, grad_lse, grad_logits, stream);
      }
    }
    const int64_t chunk = generic_chunk(p, sizeof(Acc));
    for (int64_t t0 = 0; t0 < p.num_tokens; t0 += chunk) {
      const int64_t n = min(chunk, p.num_tokens - t0);
      gate_backward_generic_kernel<In, Acc><<<blocks_for(n, 128), 128, 0, stream>>>(
          p, t0, n, lp, ids, static_cast<const Acc*>(grad_weights), static_cast<const Acc*>(grad_score_sum),
          static_cast<const Acc*>(grad_lse), static_cast<Acc*>(workspace), static_cast<In*>(grad_logits));
      MOE_CUDA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  });
}

}  // namespace moe_ext::cuda
