// Helpers of the grouped GEMM that need no CUTLASS: the forward prologue (zero rows outside the
// experts, bias prefill), zeroing the weight gradient of experts with no rows, and the simple
// CUDA-core kernels for fp32 / fp64 / misaligned 16-bit inputs. Compiled for every arch of the build.
// All of them read expert_offsets on the device: no host synchronisation, graph capturable.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "grouped_gemm_launch.h"
#include "workspace.cuh"

namespace moe_ext {
namespace gemm {
namespace {

// Offsets are not validated on CUDA (that would need a sync); clamp them so that a bad offsets
// tensor gives wrong numbers, never out-of-bounds accesses.
__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Expert owning `row`: the last e with offsets[e] <= row (empty experts are skipped).
__device__ __forceinline__ int64_t expert_of_row(const int64_t* offsets, int64_t E, int64_t row) {
  int64_t lo = 0, hi = E;  // answer in [0, E - 1]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void prefill_kernel(T* __restrict__ c, const T* __restrict__ bias, const int64_t* __restrict__ offsets,
                               int64_t E, int64_t M, int64_t N) {
  const int64_t first = clamp64(offsets[0], 0, M);
  const int64_t last = clamp64(offsets[E], first, M);
  // Without bias only the rows outside [first, last) are written; with bias every row is.
  const int64_t rows = bias ? M : first + (M - last);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t row = bias ? r : (r < first ? r : last + (r - first));
    T* out = c + row * N;
    if (bias && row >= first && row < last) {
      const T* src = bias + expert_of_row(offsets, E, row) * N;
      for (int64_t j = threadIdx.x; j < N; j += blockDim.x) out[j] = src[j];
    } else {
      for (int64_t j = threadIdx.x; j < N; j += blockDim.x) out[j] = T(0);
    }
  }
}

// Zeroes [base, base + bytes_per_expert) with the threads of gridDim.x: 16-byte stores for the
// aligned middle, bytes at the ends.
__device__ void zero_bytes(char* base, int64_t bytes_per_expert) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  const int64_t align_gap = int64_t((16 - (addr & 15)) & 15);
  const int64_t head = bytes_per_expert < align_gap ? bytes_per_expert : align_gap;
  const int64_t body = (bytes_per_expert - head) / 16;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  uint4* vec = reinterpret_cast<uint4*>(base + head);
  for (int64_t i = tid; i < body; i += nthreads) vec[i] = make_uint4(0, 0, 0, 0);
  for (int64_t i = tid; i < head; i += nthreads) base[i] = 0;
  for (int64_t i = head + body * 16 + tid; i < bytes_per_expert; i += nthreads) base[i] = 0;
}

// Experts are strided over gridDim.y (at most 65535 blocks there).
__global__ void zero_empty_kernel(char* __restrict__ out, const int64_t* __restrict__ offsets, int64_t E, int64_t M,
                                  int64_t bytes_per_expert) {
  for (int64_t e = blockIdx.y; e < E; e += gridDim.y) {
    // The same clamped emptiness test as the argument kernels: CUTLASS got 0x0x0 exactly for these.
    if (expert_rows(offsets, e, M).count == 0) zero_bytes(out + e * bytes_per_expert, bytes_per_expert);
  }
}

// ---- simple CUDA-core grouped GEMM (fallback) ----
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return T(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kTile = 16;

// Forward: block (n tile, row-tile lane, expert); the row tiles of an expert are strided over
// gridDim.y and the experts over gridDim.z (both loops are uniform per block, so the barriers are safe).
template <typename T, bool kTransB>
__global__ void simt_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ c,
                                const int64_t* __restrict__ offsets, int64_t E, int64_t M, int64_t K, int64_t N,
                                bool accumulate) {
  using A = typename Acc<T>::type;
  __shared__ A sa[kTile][kTile + 1];
  __shared__ A sb[kTile][kTile + 1];
  const int64_t n = int64_t(blockIdx.x) * kTile + threadIdx.x;
  for (int64_t e = blockIdx.z; e < E; e += gridDim.z) {
    const ExpertRows rows = expert_rows(offsets, e, M);
    const int64_t hi = rows.begin + rows.count;
    const T* be = b + e * K * N;
    for (int64_t r0 = rows.begin + int64_t(blockIdx.y) * kTile; r0 < hi; r0 += int64_t(gridDim.y) * kTile) {
      const int64_t row = r0 + threadIdx.y;
      A acc = 0;
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        // sa[y][x] = a[r0 + y, k0 + x]; sb[y][x] = B[k0 + y, n0 + x]
        const int64_t ka = k0 + threadIdx.x;
        sa[threadIdx.y][threadIdx.x] = (row < hi && ka < K) ? to_acc(a[row * K + ka]) : A(0);
        const int64_t kb = k0 + threadIdx.y;
        A bv = 0;
        if (kb < K && n < N) bv = to_acc(kTransB ? be[n * K + kb] : be[kb * N + n]);
        sb[threadIdx.y][threadIdx.x] = bv;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTile; ++kk) acc += sa[threadIdx.y][kk] * sb[kk][threadIdx.x];
        __syncthreads();
      }
      if (row < hi && n < N) {
        T* out = c + row * N + n;
        if (accumulate) acc += to_acc(*out);
        *out = from_acc<T>(acc);
      }
    }
  }
}

// Wgrad: block (q tile, p tile, expert), reduction over the expert's rows; zero rows give zeros. The
// p tiles are strided over gridDim.y and the experts over gridDim.z (block-uniform loops).
template <typename T>
__global__ void simt_wgrad_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                                  const int64_t* __restrict__ offsets, int64_t E, int64_t M, int64_t P,
                                  int64_t Q) {
  using A = typename Acc<T>::type;
  __shared__ A sx[kTile][kTile + 1];  // sx[r][p]
  __shared__ A sy[kTile][kTile + 1];  // sy[r][q]
  const int64_t q0 = int64_t(blockIdx.x) * kTile;
  for (int64_t e = blockIdx.z; e < E; e += gridDim.z) {
    const ExpertRows rows = expert_rows(offsets, e, M);
    const int64_t hi = rows.begin + rows.count;
    for (int64_t p0 = int64_t(blockIdx.y) * kTile; p0 < P; p0 += int64_t(gridDim.y) * kTile) {
      A acc = 0;
      for (int64_t r0 = rows.begin; r0 < hi; r0 += kTile) {
        const int64_t r = r0 + threadIdx.y;
        const int64_t pl = p0 + threadIdx.x, ql = q0 + threadIdx.x;
        sx[threadIdx.y][threadIdx.x] = (r < hi && pl < P) ? to_acc(x[r * P + pl]) : A(0);
        sy[threadIdx.y][threadIdx.x] = (r < hi && ql < Q) ? to_acc(y[r * Q + ql]) : A(0);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < kTile; ++rr) acc += sx[rr][threadIdx.y] * sy[rr][threadIdx.x];
        __syncthreads();
      }
      const int64_t p = p0 + threadIdx.y, q = q0 + threadIdx.x;
      if (p < P && q < Q) out[(e * P + p) * Q + q] = from_acc<T>(acc);
    }
  }
}

template <typename T>
cudaError_t launch_simt(const GroupedGemmArgs& g, cudaStream_t stream) {
  const dim3 block(kTile, kTile);
  const int64_t E = g.num_experts;
  if (E == 0) return cudaSuccess;
  const unsigned grid_e = unsigned(std::min<int64_t>(E, 65535));  // the kernels stride over the rest
  if (g.form == Form::kWgradTN) {
    const int64_t P = g.dim_in, Q = g.dim_out;
    const dim3 grid(unsigned((Q + kTile - 1) / kTile), unsigned(std::min<int64_t>((P + kTile - 1) / kTile, 65535)),
                    grid_e);
    simt_wgrad_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(g.a), static_cast<const T*>(g.b),
                                                     static_cast<T*>(g.c), g.offsets, E, g.rows, P, Q);
  } else {
    const int64_t K = g.dim_in, N = g.dim_out;
    const int64_t row_tiles = std::min<int64_t>((g.rows + kTile - 1) / kTile, 32);
    const dim3 grid(unsigned((N + kTile - 1) / kTile), unsigned(std::max<int64_t>(row_tiles, 1)), grid_e);
    if (g.form == Form::kFwdNT) {
      simt_fwd_kernel<T, true><<<grid, block, 0, stream>>>(static_cast<const T*>(g.a), static_cast<const T*>(g.b),
                                                           static_cast<T*>(g.c), g.offsets, E, g.rows, K, N,
                                                           g.accumulate);
    } else {
      simt_fwd_kernel<T, false><<<grid, block, 0, stream>>>(static_cast<const T*>(g.a), static_cast<const T*>(g.b),
                                                            static_cast<T*>(g.c), g.offsets, E, g.rows, K, N,
                                                           g.accumulate);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t grouped_gemm_prefill(void* c, const void* bias, const int64_t* offsets, int64_t E, int64_t M,
                                 int64_t N, int elem_size, int sm_count, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const unsigned grid = unsigned(std::max<int64_t>(1, std::min<int64_t>(M, int64_t(sm_count) * 16)));
  const unsigned block = N >= 256 ? 256 : 128;
  switch (elem_size) {
    case 2: prefill_kernel<uint16_t><<<grid, block, 0, stream>>>(static_cast<uint16_t*>(c), static_cast<const uint16_t*>(bias), offsets, E, M, N); break;
    case 4: prefill_kernel<uint32_t><<<grid, block, 0, stream>>>(static_cast<uint32_t*>(c), static_cast<const uint32_t*>(bias), offsets, E, M, N); break;
    case 8: prefill_kernel<uint64_t><<<grid, block, 0, stream>>>(static_cast<uint64_t*>(c), static_cast<const uint64_t*>(bias), offsets, E, M, N); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t grouped_gemm_zero_empty_experts(void* out, const int64_t* offsets, int64_t E, int64_t M, int64_t PQ,
                                            int elem_size, int sm_count, cudaStream_t stream) {
  const int64_t bytes = PQ * elem_size;
  if (E == 0 || bytes == 0) return cudaSuccess;
  // A few blocks per expert: enough to zero one large expert quickly, few enough that the blocks of
  // non-empty experts (which exit at once) cost little.
  const int64_t per_expert = std::max<int64_t>(1, std::min<int64_t>((bytes + 4095) / 4096,
                                                                     (int64_t(sm_count) * 4 + E - 1) / E));
  const dim3 grid{unsigned(per_expert), unsigned(std::min<int64_t>(E, 65535)), 1u};
  zero_empty_kernel<<<grid, 256, 0, stream>>>(static_cast<char*>(out), offsets, E, M, bytes);
  return cudaGetLastError();
}

cudaError_t grouped_gemm_simt(const GroupedGemmArgs& args, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_simt<float>(args, stream);
    case 1: return launch_simt<double>(args, stream);
    case 2: return launch_simt<__half>(args, stream);
    case 3: return launch_simt<__nv_bfloat16>(args, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gemm
}  // namespace moe_ext
