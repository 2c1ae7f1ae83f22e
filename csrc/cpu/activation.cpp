// CPU kernels of gated_activation and its backward: one pass over each row of h ([gate | up], or gate
// and up interleaved for swigluoai).
//
// Replaces act(gate), the product and the saved act of a torch composition (three passes over
// [M, F] and an extra [M, F] tensor in forward; three more and a temporary in backward) with one read
// of h (and grad) and one write. fp32 rows run the branch-free maths of common/activation.h in loops
// the compiler vectorises; 16-bit rows convert in chunks of kChunk and reuse the fp32 loop; fp64 rows
// run the same maths in double with the libm functions (what gradcheck needs). Interleaved fp32 rows
// are split into chunks like 16-bit ones, so the vectorised loops only ever see unit strides.
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

// Element i of gate, up (and their gradients) at g[S * i], u[S * i].
template <Activation A, int64_t S = 1, typename T>
MOE_ALWAYS_INLINE void forward_span(const T* __restrict g, const T* __restrict u, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gated_forward<A>(g[S * i], u[S * i]);
}

template <Activation A, int64_t S = 1, typename T>
MOE_ALWAYS_INLINE void backward_span(const T* __restrict grad, const T* __restrict g, const T* __restrict u,
                                     T* __restrict dg, T* __restrict du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gated_backward<A>(grad[i], g[S * i], u[S * i], dg[S * i], du[S * i]);
}

// The fp32 loops are what every dtype but fp64 runs; compiled for AVX-512, AVX2 and baseline x86-64,
// the best one picked when the library loads (the 16-wide loop is several times the 4-wide one). They
// take a block of rows so that the dispatch is paid once per block, not once per (short) row:
// row r's gate at g + r * ld_in, up at u + r * ld_in, output at out + r * ld_out.
template <Activation A>
MOE_ALWAYS_INLINE void forward_block(const float* g, const float* u, float* out, int64_t rows, int64_t n,
                                     int64_t ld_in, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r) forward_span<A>(g + r * ld_in, u + r * ld_in, out + r * ld_out, n);
}

template <Activation A>
MOE_ALWAYS_INLINE void backward_block(const float* grad, const float* g, const float* u, float* dg, float* du,
                                      int64_t rows, int64_t n, int64_t ld_grad, int64_t ld_in) {
  for (int64_t r = 0; r < rows; ++r)
    backward_span<A>(grad + r * ld_grad, g + r * ld_in, u + r * ld_in, dg + r * ld_in, du + r * ld_in, n);
}

// (A switch, not dispatch_activation: a lambda's body would be compiled for the baseline target only.)
MOE_CPU_CLONES void forward_f32(Activation a, const float* g, const float* u, float* out, int64_t rows, int64_t n,
                                int64_t ld_in, int64_t ld_out) {
  switch (a) {
    case Activation::kGelu: return forward_block<Activation::kGelu>(g, u, out, rows, n, ld_in, ld_out);
    case Activation::kGeluTanh: return forward_block<Activation::kGeluTanh>(g, u, out, rows, n, ld_in, ld_out);
    case Activation::kSwigluOai: return forward_block<Activation::kSwigluOai>(g, u, out, rows, n, ld_in, ld_out);
    default: return forward_block<Activation::kSilu>(g, u, out, rows, n, ld_in, ld_out);
  }
}

// grad row r at grad + r * ld_grad; d gate and d up rows at dg / du + r * ld_in.
MOE_CPU_CLONES void backward_f32(Activation a, const float* grad, const float* g, const float* u, float* dg,
                                 float* du, int64_t rows, int64_t n, int64_t ld_grad, int64_t ld_in) {
  switch (a) {
    case Activation::kGelu:
      return backward_block<Activation::kGelu>(grad, g, u, dg, du, rows, n, ld_grad, ld_in);
    case Activation::kGeluTanh:
      return backward_block<Activation::kGeluTanh>(grad, g, u, dg, du, rows, n, ld_grad, ld_in);
    case Activation::kSwigluOai:
      return backward_block<Activation::kSwigluOai>(grad, g, u, dg, du, rows, n, ld_grad, ld_in);
    default: return backward_block<Activation::kSilu>(grad, g, u, dg, du, rows, n, ld_grad, ld_in);
  }
}

// n elements at src[stride * i] -> dst[i], and back.
template <typename T>
void to_acc(const T* src, float* dst, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[stride * i]);
}

template <typename T>
void from_acc(const float* src, T* dst, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) dst[stride * i] = static_cast<T>(src[i]);
}

// `rows` rows of h (2F columns) -> out (F columns).
template <typename T>
void forward_rows(Activation a, const T* h, T* out, int64_t rows, int64_t F) {
  const int64_t S = gate_up_stride(a), U = up_offset(a, F);
  if constexpr (std::is_same_v<T, double>) {
    dispatch_activation(a, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      for (int64_t r = 0; r < rows; ++r)
        forward_span<kA, gate_up_stride(kA)>(h + r * 2 * F, h + r * 2 * F + U, out + r * F, F);
    });
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (S == 1) return forward_f32(a, h, h + F, out, rows, F, 2 * F, F);
  }
  float gf[kChunk], uf[kChunk], of[kChunk];
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = h + r * 2 * F;
    for (int64_t i = 0; i < F; i += kChunk) {
      const int64_t n = std::min(kChunk, F - i);
      to_acc(g + S * i, gf, n, S);
      to_acc(g + U + S * i, uf, n, S);
      forward_f32(a, gf, uf, of, 1, n, 0, 0);
      from_acc(of, out + r * F + i, n, 1);
    }
  }
}

// `rows` rows of grad (F columns) and h -> grad_h (2F columns, laid out as h).
template <typename T>
void backward_rows(Activation a, const T* grad, const T* h, T* grad_h, int64_t rows, int64_t F) {
  const int64_t S = gate_up_stride(a), U = up_offset(a, F);
  if constexpr (std::is_same_v<T, double>) {
    dispatch_activation(a, [&](auto A) {
      constexpr Activation kA = decltype(A)::value;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * 2 * F;
        backward_span<kA, gate_up_stride(kA)>(grad + r * F, h + o, h + o + U, grad_h + o, grad_h + o + U, F);
      }
    });
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (S == 1) return backward_f32(a, grad, h, h + F, grad_h, grad_h + F, rows, F, F, 2 * F);
  }
  float gr[kChunk], gf[kChunk], uf[kChunk], dgf[kChunk], duf[kChunk];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * 2 * F;
    for (int64_t i = 0; i < F; i += kChunk) {
      const int64_t n = std::min(kChunk, F - i);
      to_acc(grad + r * F + i, gr, n, 1);
      to_acc(h + o + S * i, gf, n, S);
      to_acc(h + o + U + S * i, uf, n, S);
      backward_f32(a, gr, gf, uf, dgf, duf, 1, n, 0, 0);
      from_acc(dgf, grad_h + o + S * i, n, S);
      from_acc(duf, grad_h + o + U + S * i, n, S);
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
      forward_rows(act, hp + r0 * 2 * F, op + r0 * F, r1 - r0, F);
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
      backward_rows(act, gp + r0 * F, hp + r0 * 2 * F, dp + r0 * 2 * F, r1 - r0, F);
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
