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

// Largest value; NaN lanes never win (as in row_softmax_stats' `l > m`).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// The best (key, id) of the warp under routing.h's ranks_before; every lane gets it. The order is
// total, so the butterfly's pairing does not change the winner.
__device__ __forceinline__ void warp_best(float& key, int& id) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ok = __shfl_xor_sync(kFullMask, key, off);
    const int oi = __shfl_xor_sync(kFullMask, id, off);
    if (ranks_before(ok, oi, key, id)) {
      key = ok;
      id = oi;
    }
  }
}

// One token's softmax statistics from the lane's registers: the row max and the fixed-order sum of
// exp(l - max), exactly as routing.h row_softmax_stats computes them.
template <int NPL>
__device__ __forceinline__ void warp_row_stats(const float (&lg)[NPL], int lane, int E, float* m_out,
                                               float* sum_out) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < NPL; ++i)
    if (lane + 32 * i < E && lg[i] > m) m = lg[i];
  m = warp_max(m);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NPL; ++i)
    if (lane + 32 * i < E) s += moe_exp(lg[i] - m);
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

inline unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

inline size_t align_up(size_t n, size_t a = 256) { return (n + a - 1) / a * a; }

}  // namespace moe_ext::cuda
