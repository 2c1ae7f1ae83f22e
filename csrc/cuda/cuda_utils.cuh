// Device helpers shared by the routing .cu files: dtype dispatch over launchers.h's DType, warp
// reductions whose order matches common/routing.h, and the launch-error check of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/routing.h"
#include "launchers.h"

// Every launch is followed by this: the first launch error is returned to the glue, which raises it.
#define MOE_CUDA_LAUNCH_CHECK()                       \
  do {                                                \
    const cudaError_t moe_err_ = cudaGetLastError();  \
    if (moe_err_ != cudaSuccess) return moe_err_;     \
  } while (0)

namespace moe_ext::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with the device type of `dt` (__half / __nv_bfloat16 for the 16-bit types).
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(TypeTag<float>{});
    case DType::kFloat64: return f(TypeTag<double>{});
    case DType::kFloat16: return f(TypeTag<__half>{});
    case DType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

// Conversions round to nearest even, as c10::Half / c10::BFloat16 do on the CPU.
template <typename Out, typename Acc>
__device__ __forceinline__ Out from_acc(Acc v) { return static_cast<Out>(v); }
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// The xor butterfly: lane l + 16 first, then + 8, ... + 1; the same tree as routing.h lane_tree.
template <typename T>
__device__ __forceinline__ T warp_tree_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = v + __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// sm_80 and newer reduce a warp's 32-bit integers in one instruction (redux.sync) where a butterfly
// takes five shuffle rounds. Integer max/min are exact, so either way gives the same answer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MOE_WARP_REDUX 1
#else
#define MOE_WARP_REDUX 0
#endif

__device__ __forceinline__ unsigned warp_umax(unsigned v) {
#if MOE_WARP_REDUX
  return __reduce_max_sync(kFullMask, v);
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
#endif
}

__device__ __forceinline__ unsigned warp_umin(unsigned v) {
#if MOE_WARP_REDUX
  return __reduce_min_sync(kFullMask, v);
#else
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
#endif
}

// Largest value; NaN lanes never win (as in row_softmax_stats' `l > m`). A zero maximum comes back
// as +0, whichever zero the lanes held: row_softmax_stats may keep -0 there, and x - (-0) and
// x - (+0) differ only for x = -0 (then exp gives 1 either way), so no result changes.
__device__ __forceinline__ float warp_max(float v) {
  return rank_value(warp_umax(rank_bits(v)));
}

// The id of the warp's best (key, id) under routing.h's ranks_before, on every lane: the largest
// rank_bits, then the lowest id among the lanes holding it (ids compared as signed ints, as
// ranks_before does, by flipping the sign bit). A lane with nothing to offer passes (NaN, INT_MAX).
__device__ __forceinline__ int warp_best_id(float key, int id) {
  const unsigned r = rank_bits(key);
  const unsigned top = warp_umax(r);
  constexpr unsigned kFlip = 0x80000000u;
  return static_cast<int>(warp_umin(r == top ? static_cast<unsigned>(id) ^ kFlip : ~0u) ^ kFlip);
}

// One token's softmax statistics from the lane's registers: the row max and the fixed-order sum of
// exp(l - max), exactly as routing.h row_softmax_stats computes them. ex (optional) receives each
// exp(l - max) (0 for padding), which softmax scoring reuses: score_of computes the same product.
template <int NPL>
__device__ __forceinline__ void warp_row_stats(const float (&lg)[NPL], int lane, int E, float* m_out,
                                               float* sum_out, float (*ex)[NPL] = nullptr) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < NPL; ++i)
    if (lane + 32 * i < E && lg[i] > m) m = lg[i];
  m = warp_max(m);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    // padding (lg = 0) takes the exp too and drops it: no branch around each exp, so they overlap
    const bool real = lane + 32 * i < E;
    const float x = moe_exp(lg[i] - m);
    if (ex) (*ex)[i] = real ? x : 0.f;
    if (real) s += x;
  }
  *m_out = m;
  *sum_out = warp_tree_sum(s);
}

// Whether the row holds a NaN (routing.h row_logsumexp); padding entries hold 0.
template <int NPL>
__device__ __forceinline__ bool warp_any_nan(const float (&lg)[NPL]) {
  bool nan = false;
#pragma unroll
  for (int i = 0; i < NPL; ++i) nan = nan || lg[i] != lg[i];
  return __any_sync(kFullMask, nan);
}

// routing.h score_of for the lane's experts, sc holding warp_row_stats' exp(l - max) on entry. Softmax
// multiplies them by 1/sum, as score_of does; sigmoid_ goes in two passes, every exp before any
// division, because each division branches to a slow path and would keep the exps from overlapping.
template <int NPL>
__device__ __forceinline__ void warp_scores(ScoreFunc f, const float (&lg)[NPL], float inv_sum, float (&sc)[NPL]) {
  if (f == ScoreFunc::kSigmoid) {
#pragma unroll
    for (int i = 0; i < NPL; ++i) sc[i] = sigmoid_denominator(lg[i]);
#pragma unroll
    for (int i = 0; i < NPL; ++i) sc[i] = 1.f / sc[i];
  } else {
#pragma unroll
    for (int i = 0; i < NPL; ++i) sc[i] *= inv_sum;
  }
}

inline unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

inline size_t align_up(size_t n, size_t a = 256) { return (n + a - 1) / a * a; }

}  // namespace moe_ext::cuda
