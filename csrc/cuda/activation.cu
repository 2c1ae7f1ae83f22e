// CUDA kernels of gated_activation and its backward: elementwise over the M x F (gate, up) pairs of
// h = [gate | up], maths from common/activation.h. Memory-bound: each thread moves packs of V
// elements (16 bytes) of gate, up (and grad) and writes V outputs (V gradient pairs); V = 1 when F or
// a pointer is not 16-byte aligned. Grid-stride with int64 indices, so any M * F fits.
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

template <Activation A, typename T, int V>
__global__ void __launch_bounds__(kThreads) gated_forward_kernel(const T* __restrict__ h, T* __restrict__ out,
                                                                 int64_t M, int64_t F) {
  using acc = typename AccOf<T>::type;
  const int64_t packs = F / V, total = M * packs;
  for (int64_t p = blockIdx.x * int64_t(kThreads) + threadIdx.x; p < total; p += int64_t(gridDim.x) * kThreads) {
    const int64_t row = p / packs, col = (p - row * packs) * V;
    const T* g = h + row * 2 * F + col;
    const auto gv = load<T, V>(g), uv = load<T, V>(g + F);
    Pack<T, V> o;
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
    const int64_t in = row * 2 * F + col;
    const auto rv = load<T, V>(grad + row * F + col), gv = load<T, V>(h + in), uv = load<T, V>(h + in + F);
    Pack<T, V> dg, du;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      acc d_g, d_u;
      gated_backward<A>(static_cast<acc>(rv.v[i]), static_cast<acc>(gv.v[i]), static_cast<acc>(uv.v[i]), d_g, d_u);
      dg.v[i] = from_acc<T>(d_g);
      du.v[i] = from_acc<T>(d_u);
    }
    store<T, V>(grad_h + in, dg);
    store<T, V>(grad_h + in + F, du);
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
