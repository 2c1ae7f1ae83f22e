// CPU kernels of gated_activation and its backward: one pass over h = [gate | up] per row.
//
// Replaces act(gate), the product and the saved act of a torch composition (three passes over
// [M, F] and an extra [M, F] tensor in forward; three more and a temporary in backward) with one read
// of h (and grad) and one write. fp32 rows run the branch-free maths of common/activation.h in loops
// the compiler vectorises; 16-bit rows convert in chunks of kChunk and reuse the fp32 loop; fp64 rows
// run the same maths in double with the libm functions (what gradcheck needs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common/activation.h"
#include "../common/checks.h"
#include "../common/dispatch.h"
#include "memory.h"

namespace moe_ext {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MOE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_CPU_CLONES
#endif
#define MOE_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 256;

template <Activation A, typename T>
MOE_ALWAYS_INLINE void forward_span(const T* __restrict g, const T* __restrict u, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gated_forward<A>(g[i], u[i]);
}

template <Activation A, typename T>
MOE_ALWAYS_INLINE void backward_span(const T* __restrict grad, const T* __restrict g, const T* __restrict u,
                                     T* __restrict dg, T* __restrict du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gated_backward<A>(grad[i], g[i], u[i], dg[i], du[i]);
}

// The fp32 loops are what every dtype but fp64 runs; compiled for AVX-512, AVX2 and baseline x86-64,
// the best one picked when the library loads (16- and 8-wide vectors are 3-4x the 4-wide baseline).
MOE_CPU_CLONES void forward_f32(Activation a, const float* g, const float* u, float* out, int64_t n) {
  switch (a) {
    case Activation::kGelu: return forward_span<Activation::kGelu>(g, u, out, n);
    case Activation::kGeluTanh: return forward_span<Activation::kGeluTanh>(g, u, out, n);
    default: return forward_span<Activation::kSilu>(g, u, out, n);
  }
}

MOE_CPU_CLONES void backward_f32(Activation a, const float* grad, const float* g, const float* u, float* dg,
                                 float* du, int64_t n) {
  switch (a) {
    case Activation::kGelu: return backward_span<Activation::kGelu>(grad, g, u, dg, du, n);
    case Activation::kGeluTanh: return backward_span<Activation::kGeluTanh>(grad, g, u, dg, du, n);
    default: return backward_span<Activation::kSilu>(grad, g, u, dg, du, n);
  }
}

template <typename T>
void to_acc(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_acc(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// One row: gate g[0..F), up u[0..F) -> out[0..F).
template <typename T>
void forward_row(Activation a, const T* g, const T* u, T* out, int64_t F) {
  if constexpr (std::is_same_v<T, double>) {
    dispatch_activation(a, [&](auto A) { forward_span<decltype(A)::value>(g, u, out, F); });
  } else if constexpr (std::is_same_v<T, float>) {
    forward_f32(a, g, u, out, F);
  } else {
    float gf[kChunk], uf[kChunk], of[kChunk];
    for (int64_t i = 0; i < F; i += kChunk) {
      const int64_t n = std::min(kChunk, F - i);
      to_acc(g + i, gf, n);
      to_acc(u + i, uf, n);
      forward_f32(a, gf, uf, of, n);
      from_acc(of, out + i, n);
    }
  }
}

template <typename T>
void backward_row(Activation a, const T* grad, const T* g, const T* u, T* dg, T* du, int64_t F) {
  if constexpr (std::is_same_v<T, double>) {
    dispatch_activation(a, [&](auto A) { backward_span<decltype(A)::value>(grad, g, u, dg, du, F); });
  } else if constexpr (std::is_same_v<T, float>) {
    backward_f32(a, grad, g, u, dg, du, F);
  } else {
    float gr[kChunk], gf[kChunk], uf[kChunk], dgf[kChunk], duf[kChunk];
    for (int64_t i = 0; i < F; i += kChunk) {
      const int64_t n = std::min(kChunk, F - i);
      to_acc(grad + i, gr, n);
      to_acc(g + i, gf, n);
      to_acc(u + i, uf, n);
      backward_f32(a, gr, gf, uf, dgf, duf, n);
      from_acc(dgf, dg + i, n);
      from_acc(duf, du + i, n);
    }
  }
}

// Rows per parallel task: enough elements that a task outweighs its scheduling.
int64_t row_grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

at::Tensor gated_activation_cpu(const at::Tensor& h_in, c10::string_view activation) {
  const Activation act = check_gated_activation("gated_activation", h_in, activation, nullptr);
  const auto h = h_in.contiguous();
  const int64_t M = h.size(0), F = h.size(1) / 2;
  auto out = empty_output({M, F}, h.options());
  if (M == 0 || F == 0) return out;
  MOE_DISPATCH_FLOAT_TYPES(h.scalar_type(), "gated_activation", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) forward_row(act, hp + r * 2 * F, hp + r * 2 * F + F, op + r * F, F);
    });
  });
  return out;
}

at::Tensor gated_activation_backward_cpu(const at::Tensor& grad_in, const at::Tensor& h_in,
                                         c10::string_view activation) {
  const Activation act = check_gated_activation("gated_activation_backward", h_in, activation, &grad_in);
  const auto h = h_in.contiguous();
  const auto grad = grad_in.contiguous();
  const int64_t M = h.size(0), F = h.size(1) / 2;
  auto grad_h = empty_output({M, 2 * F}, h.options());
  if (M == 0 || F == 0) return grad_h;
  MOE_DISPATCH_FLOAT_TYPES(h.scalar_type(), "gated_activation_backward", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dp = grad_h.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(F), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        backward_row(act, gp + r * F, hp + r * 2 * F, hp + r * 2 * F + F, dp + r * 2 * F, dp + r * 2 * F + F, F);
      }
    });
  });
  return grad_h;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("gated_activation", &gated_activation_cpu);
  m.impl("gated_activation_backward", &gated_activation_backward_cpu);
}

}  // namespace moe_ext
