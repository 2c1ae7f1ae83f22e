// CUDA kernels of gated_activation and its backward: elementwise over the M x F (gate, up) pairs of
// h = [gate | up] (interleaved for swigluoai), maths from common/activation.h. Memory-bound: each thread
// moves packs of V elements (16 bytes) of gate, up (and grad) and writes V outputs (V gradient pairs);
// V = 1 when F or a pointer is not 16-byte aligned. Grid-stride with int64 indices, so any M * F fits.
#include "cuda_utils.cuh"

namespace moe_ext::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

// Gate and up of output columns col .. col + V - 1 of one row of h (2F columns at row_h): V-wide packs of
// each half, or for an interleaved layout two packs holding gate, up, gate, up, ...
template <Activation A, typename T, int V>
__device__ __forceinline__ void load_gate_up(const T* row_h, int64_t col, int64_t F, Pack<T, V>& g, Pack<T, V>& u) {
  if constexpr (interleaved(A)) {
    const auto a = load<T, V>(row_h + 2 * col), b = load<T, V>(row_h + 2 * col + V);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      g.v[i] = 2 * i < V ? a.v[2 * i] : b.v[2 * i - V];
      u.v[i] = 2 * i + 1 < V ? a.v[2 * i + 1] : b.v[2 * i + 1 - V];
    }
  } else {
    g = load<T, V>(row_h + col);
    u = load<T, V>(row_h + col + F);
  }
}

template <Activation A, typename T, int V>
__device__ __forceinline__ void store_gate_up(T* row_h, int64_t col, int64_t F, const Pack<T, V>& g,
                                              const Pack<T, V>& u) {
  if constexpr (interleaved(A)) {
    Pack<T, V> a, b;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      (2 * i < V ? a.v[2 * i] : b.v[2 * i - V]) = g.v[i];
      (2 * i + 1 < V ? a.v[2 * i + 1] : b.v[2 * i + 1 - V]) = u.v[i];
    }
    store<T, V>(row_h + 2 * col, a);
    store<T, V>(row_h + 2 * col + V, b);
  } else {
    store<T, V>(row_h + col, g);
    store<T, V>(row_h + col + F, u);
  }
}

template <Activation A, typename T, int V>
__global__ void __launch_bounds__(kThreads) gated_forward_kernel(const T* __restrict__ h, T* __restrict__ out,
                                                                 int64_t M, int64_t F) {
  using acc = typename AccOf<T>::type;
  const int64_t packs = F / V, total = M * packs;
  for (int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x; p < total; p += int64_t(gridDim.x) * kThreads) {
    const int64_t row = p / packs, col = (p - row * packs) * V;
    Pack<T, V> gv, uv, o;
    load_gate_up<A, T, V>(h + row * 2 * F, col, F, gv, uv);
#pragma unroll
    for (int i = 0; i < V; ++i)
      o.v[i] = from_acc<T>(gated_forward<A>(static_cast<acc>(gv.v[i]), static_cast<acc>(uv.v[i])));
    store<T, V>(out + row * F + col, o);
  }
}

template <Activation A, typename T, int V>
__global__ void __launch_bounds__(kThreads) gated_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h,
                                                                  T* __restrict__ grad_h, int64_t M, int64_t F) {
  using acc = typename AccOf<T>::type;
  const int64_t packs = F / V, total = M * packs;
  for (int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x; p < total; p += int64_t(gridDim.x) * kThreads) {
    const int64_t row = p / packs, col = (p - row * packs) * V;
    const auto rv = load<T, V>(grad + row * F + col);
    Pack<T, V> gv, uv, dg, du;
    load_gate_up<A, T, V>(h + row * 2 * F, col, F, gv, uv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      acc d_g, d_u;
      gated_backward<A>(static_cast<acc>(rv.v[i]), static_cast<acc>(gv.v[i]), static_cast<acc>(uv.v[i]), d_g, d_u);
      dg.v[i] = from_acc<T>(d_g);
      du.v[i] = from_acc<T>(d_u);
    }
    store_gate_up<A, T, V>(grad_h + row * 2 * F, col, F, dg, du);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned blocks_for(int64_t packs) {
  const int64_t b = (packs + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

// Calls f(TypeTag<T>{}, Activation constant, vector width) with V = 16 / sizeof(T) when every pointer
// is 16-byte aligned and F is a multiple of V, else V = 1.
template <typename Fn>
cudaError_t dispatch(DType dt, Activation act, int64_t F, std::initializer_list<const void*> ptrs, Fn&& fn) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int V = 16 / sizeof(T);
    bool vec = F % V == 0;
    for (const void* p : ptrs) vec = vec && aligned16(p);
    return dispatch_activation(act, [&](auto a) -> cudaError_t {
      return vec ? fn(tag, a, std::integral_constant<int, V>{}) : fn(tag, a, std::integral_constant<int, 1>{});
    });
  });
}

}  // namespace

cudaError_t launch_gated_activation(DType dt, Activation act, const void* h, void* out, int64_t M, int64_t F,
                                    cudaStream_t stream) {
  return dispatch(dt, act, F, {h, out}, [&](auto tag, auto a, auto v) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(v)::value;
    gated_forward_kernel<decltype(a)::value, T, V><<<blocks_for(M * (F / V)), kThreads, 0, stream>>>(
        static_cast<const T*>(h), static_cast<T*>(out), M, F);
    MOE_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

cudaError_t launch_gated_activation_backward(DType dt, Activation act, const void* grad, const void* h,
                                             void* grad_h, int64_t M, int64_t F, cudaStream_t stream) {
  return dispatch(dt, act, F, {grad, h, grad_h}, [&](auto tag, auto a, auto v) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(v)::value;
    gated_backward_kernel<decltype(a)::value, T, V><<<blocks_for(M * (F / V)), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(h), static_cast<T*>(grad_h), M, F);
    MOE_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace moe_ext::cuda
