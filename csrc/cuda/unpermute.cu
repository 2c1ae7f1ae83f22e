// CUDA kernels of unpermute and unpermute_backward.
//
// unpermute: one warp per token (per slice of its row when there are few tokens); unpermute_backward:
// one warp per slot. Fixed slot order j = 0..k-1, acc accumulation, no floating-point atomics. With
// --fmad=false, unpermute matches the CPU bit for bit.
#include <type_traits>

#include "rows.cuh"

namespace moe_ext::cuda {
namespace {

// Two kernels, both summing over j = 0..k-1 in order as the CPU kernel does (bit-identical results):
//  - unpermute_rows_kernel, one warp per token and whole row, when there are enough tokens to fill the
//    GPU (T >= kRowTargetWarps). Few registers, so many warps per SM keep the gathers in flight: 80-84%
//    of copy bandwidth at 4096 tokens on the H100.
//  - unpermute_sliced_kernel for fewer tokens (decode): each row split over several warps (below).
//    It took unpermute at 16 tokens from 28.6 to 5.0 us, but at 4096 tokens it reached only 69-73%
//    (80 registers: fewer warps per SM), hence the split (bench/NOTES.md, unpermute entries).
template <typename T, int N>
__global__ void __launch_bounds__(kRowWarps * 32)
unpermute_rows_kernel(const Pack<T, N>* __restrict__ ys, const int64_t* __restrict__ row_map,
                      const typename AccOf<T>::type* __restrict__ weights, Pack<T, N>* __restrict__ y,
                      int64_t T_, int64_t k, int64_t units, int64_t R) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (t >= T_) return;
  for (int64_t u = lane; u < units; u += 32) {
    Acc sum[N];
#pragma unroll
    for (int n = 0; n < N; ++n) sum[n] = Acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = row_map[t * k + j];
      if (row < 0 || row >= R) continue;  // dropped (an out-of-range row is a caller error: skip it)
      const Acc w = weights != nullptr ? weights[t * k + j] : Acc(1);
      const Pack<T, N> p = ys[row * units + u];
#pragma unroll
      for (int n = 0; n < N; ++n) sum[n] += w * static_cast<Acc>(p.v[n]);
    }
    Pack<T, N> o;
#pragma unroll
    for (int n = 0; n < N; ++n) o.v[n] = from_acc<T>(sum[n]);
    y[t * units + u] = o;
  }
}

// One warp per (token, slice of the row): the row's units [u0, u1) of token t, so that enough warps
// are in flight with few tokens. The token's k (row, weight) pairs are read once into shared memory
// (k <= 32) instead of once per unit, and the k gathered rows are loaded kGather at a time before they
// are summed, so a lane has several loads in flight.
// Minimum 1 block per SM in the launch bounds: without it ptxas held the 16-byte-pack kernels to 64
// registers on sm_90a and spilled (scripts/check_sass.py allows no local memory).
constexpr int kGather = 4;

template <typename T, int N>
__global__ void __launch_bounds__(kRowWarps * 32, 1)
unpermute_sliced_kernel(const Pack<T, N>* __restrict__ ys, const int64_t* __restrict__ row_map,
                        const typename AccOf<T>::type* __restrict__ weights, Pack<T, N>* __restrict__ y,
                        int64_t T_, int64_t k, int64_t units, int64_t R, int64_t slices, int64_t slice_units) {
  using Acc = typename AccOf<T>::type;
  __shared__ int64_t s_row[kRowWarps][kSharedSlots];
  __shared__ Acc s_w[kRowWarps][kSharedSlots];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gw = int64_t(blockIdx.x) * kRowWarps + warp;
  if (gw >= T_ * slices) return;  // warp-uniform
  const int64_t t = gw / slices, u0 = gw % slices * slice_units;
  const int64_t u1 = u0 + slice_units < units ? u0 + slice_units : units;
  const bool shared_slots = k <= kSharedSlots;
  if (shared_slots) {
    if (lane < k) {
      s_row[warp][lane] = row_map[t * k + lane];
      s_w[warp][lane] = weights != nullptr ? weights[t * k + lane] : Acc(1);
    }
    __syncwarp();
  }
  for (int64_t u = u0 + lane; u < u1; u += 32) {
    Acc sum[N];
#pragma unroll
    for (int n = 0; n < N; ++n) sum[n] = Acc(0);
    for (int64_t j0 = 0; j0 < k; j0 += kGather) {
      Pack<T, N> p[kGather];
      Acc w[kGather];
      bool use[kGather];
#pragma unroll
      for (int g = 0; g < kGather; ++g) {
        const int64_t j = j0 + g;
        int64_t row = -1;
        w[g] = Acc(0);
        if (j < k && shared_slots) {
          row = s_row[warp][j];
          w[g] = s_w[warp][j];
        } else if (j < k) {
          row = row_map[t * k + j];
          w[g] = weights != nullptr ? weights[t * k + j] : Acc(1);
        }
        use[g] = row >= 0 && row < R;  // dropped (-1); an out-of-range row is a caller error: skip it
        if (use[g]) p[g] = ys[row * units + u];
      }
#pragma unroll
      for (int g = 0; g < kGather; ++g) {
        if (!use[g]) continue;
#pragma unroll
        for (int n = 0; n < N; ++n) sum[n] += w[g] * static_cast<Acc>(p[g].v[n]);
      }
    }
    Pack<T, N> o;
#pragma unroll
    for (int n = 0; n < N; ++n) o.v[n] = from_acc<T>(sum[n]);
    y[t * units + u] = o;
  }
}

__global__ void mark_rows_kernel(const int64_t* __restrict__ row_map, int64_t slots, int64_t R,
                                 unsigned char* __restrict__ referenced) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= slots) return;
  const int64_t row = row_map[s];
  if (row >= 0 && row < R) referenced[row] = 1;
}

// One warp per slot: grad_y_sorted[row] = w * grad_y[t], grad_w[s] = <grad_y[t], y_sorted[row]>.
template <typename T, int N>
__global__ void __launch_bounds__(kRowWarps * 32)
unpermute_backward_kernel(const Pack<T, N>* __restrict__ gy, const Pack<T, N>* __restrict__ ys,
                          const int64_t* __restrict__ row_map, const typename AccOf<T>::type* __restrict__ weights,
                          Pack<T, N>* __restrict__ gys, typename AccOf<T>::type* __restrict__ gw, int64_t slots,
                          int64_t k, int64_t units, int64_t R) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t s = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (s >= slots) return;
  const int64_t row = row_map[s], t = s / k;
  Acc dot = Acc(0);
  if (row >= 0 && row < R) {
    const Acc w = weights != nullptr ? weights[s] : Acc(1);
    for (int64_t u = lane; u < units; u += 32) {
      const Pack<T, N> g = gy[t * units + u];
      const Pack<T, N> yv = ys[row * units + u];
      Pack<T, N> o;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const Acc gv = static_cast<Acc>(g.v[n]);
        o.v[n] = from_acc<T>(w * gv);
        dot += gv * static_cast<Acc>(yv.v[n]);
      }
      gys[row * units + u] = o;
    }
    dot = warp_tree_sum(dot);
  }
  if (gw != nullptr && lane == 0) gw[s] = dot;
}

template <typename V>
__global__ void __launch_bounds__(kRowWarps * 32)
zero_unreferenced_kernel(V* __restrict__ out, int64_t R, int64_t units, const unsigned char* __restrict__ referenced) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= R || referenced[r]) return;
  V zero;
  memset(&zero, 0, sizeof zero);
  for (int64_t u = lane; u < units; u += 32) out[r * units + u] = zero;
}

}  // namespace

cudaError_t launch_unpermute(DType dt, const void* y_sorted, const int64_t* row_map, const void* weights,
                             void* y, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using Tp = typename decltype(tag)::type;
    using Acc = typename AccOf<Tp>::type;
    constexpr int N = vec16<Tp>();
    const Acc* w = static_cast<const Acc*>(weights);
    const bool vec = H % N == 0 && aligned16(y_sorted) && aligned16(y);
    const int64_t units = vec ? H / N : H;
    const RowSlices sl = row_slices(T, units);
    const unsigned grid = blocks_for(T * sl.slices, kRowWarps);
    const auto launch = [&](auto pack) {
      constexpr int n = decltype(pack)::value;
      const auto* src = static_cast<const Pack<Tp, n>*>(y_sorted);
      auto* dst = static_cast<Pack<Tp, n>*>(y);
      if (T >= kRowTargetWarps) {
        unpermute_rows_kernel<Tp, n><<<grid, kRowWarps * 32, 0, stream>>>(src, row_map, w, dst, T, k, units, R);
      } else {
        unpermute_sliced_kernel<Tp, n><<<grid, kRowWarps * 32, 0, stream>>>(src, row_map, w, dst, T, k, units, R,
                                                                           sl.slices, sl.slice_units);
      }
    };
    if (vec) {
      launch(std::integral_constant<int, N>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    MOE_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

size_t unpermute_backward_workspace_bytes(int64_t R) { return align_up(std::max<int64_t>(R, 1)); }

cudaError_t launch_unpermute_backward(DType dt, const void* grad_y, const void* y_sorted,
                                      const int64_t* row_map, const void* weights, void* grad_y_sorted,
                                      void* grad_weights_acc, void* workspace, int64_t T, int64_t k,
                                      int64_t H, int64_t R, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using Tp = typename decltype(tag)::type;
    using Acc = typename AccOf<Tp>::type;
    constexpr int N = vec16<Tp>();
    const int64_t slots = T * k;
    auto* referenced = static_cast<unsigned char*>(workspace);
    if (R > 0) {
      const cudaError_t err = cudaMemsetAsync(referenced, 0, R, stream);
      if (err != cudaSuccess) return err;
      mark_rows_kernel<<<blocks_for(slots, 256), 256, 0, stream>>>(row_map, slots, R, referenced);
      MOE_CUDA_LAUNCH_CHECK();
    }
    const bool vec = H % N == 0 && aligned16(grad_y) && aligned16(y_sorted) && aligned16(grad_y_sorted);
    const Acc* w = static_cast<const Acc*>(weights);
    Acc* gw = static_cast<Acc*>(grad_weights_acc);
    const unsigned grid = blocks_for(slots, kRowWarps);
    if (vec) {
      unpermute_backward_kernel<Tp, N><<<grid, kRowWarps * 32, 0, stream>>>(
          static_cast<const Pack<Tp, N>*>(grad_y), static_cast<const Pack<Tp, N>*>(y_sorted), row_map, w,
          static_cast<Pack<Tp, N>*>(grad_y_sorted), gw, slots, k, H / N, R);
    } else {
      unpermute_backward_kernel<Tp, 1><<<grid, kRowWarps * 32, 0, stream>>>(
          static_cast<const Pack<Tp, 1>*>(grad_y), static_cast<const Pack<Tp, 1>*>(y_sorted), row_map, w,
          static_cast<Pack<Tp, 1>*>(grad_y_sorted), gw, slots, k, H, R);
    }
    MOE_CUDA_LAUNCH_CHECK();
    if (R > 0 && H > 0) {
      const unsigned zgrid = blocks_for(R, kRowWarps);
      if (vec) {
        zero_unreferenced_kernel<uint4><<<zgrid, kRowWarps * 32, 0, stream>>>(
            static_cast<uint4*>(grad_y_sorted), R, H * sizeof(Tp) / 16, referenced);
      } else {
        zero_unreferenced_kernel<Tp><<<zgrid, kRowWarps * 32, 0, stream>>>(
            static_cast<Tp*>(grad_y_sorted), R, H, referenced);
      }
      MOE_CUDA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  });
}

}  // namespace moe_ext::cuda
