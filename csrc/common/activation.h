// Gated activations of the expert FFN, act(gate) * up, and their derivatives: the per-element maths
// of the CPU (cpu/activation.cpp) and CUDA (cuda/activation.cu) kernels of gated_activation.
//
// h holds 2F columns per row (transformers' gate_up_proj, vLLM's w1); the output has F.
//   forward:  out = act(g) * u
//   backward: d_g = grad * u * act'(g),   d_u = grad * act(g)
// Gate and up are the two halves of a row, [gate | up], except for kSwigluOai (GPT-OSS's activation, vLLM's
// "swigluoai"), whose checkpoints interleave them (gate j at column 2j, up j at 2j + 1) and which clamps both:
//   out = gc * sigmoid(alpha gc) * (uc + 1),   gc = min(g, limit),  uc = clamp(u, -limit, limit)
// with GPT-OSS's alpha = 1.702 and limit = 7.0. Its backward is torch's (2.14): no gradient reaches a
// clamped input, one at a limit or a NaN one, so d_g = 0 where g >= limit and d_u = 0 where |u| >= limit.
// 16-bit inputs are computed in fp32 and rounded once, fp32 in fp32, fp64 in fp64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "exp_core.h"
#include "macros.h"

namespace moe_ext {

enum class Activation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kSwigluOai = 3 };

// Where gate j and up j of a row of h live: gate at j * stride, up at up_offset + j * stride.
MOE_HD constexpr bool interleaved(Activation a) { return a == Activation::kSwigluOai; }
MOE_HD constexpr int64_t gate_up_stride(Activation a) { return interleaved(a) ? 2 : 1; }
MOE_HD constexpr int64_t up_offset(Activation a, int64_t F) { return interleaved(a) ? 1 : F; }

// exp for the activation kernels. On the host it is branch-free (selects, integer ops, one
// polynomial) so that the CPU row loops vectorise; a few ulp off std::exp, which an activation does
// not notice. NaN stays NaN, exp(x > 88.72) is inf as in libm, and results below 2^-126 flush to 0
// (libm returns subnormals there), which moves silu/gelu only where their value is below 1e-36. The
// device uses expf.
MOE_HD float act_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float x0 = x;
  x = x > 88.37626f ? 88.37626f : x;  // NaN compares false and passes through both clamps
  x = x < -87.33654f ? -87.33654f : x;
  // Adding 1.5 * 2^23 rounds x / ln2 to the nearest integer n and leaves n in the low mantissa bits.
  const float m = x * 1.44269504088896341f + 12582912.0f;
  const float nf = m - 12582912.0f;
  const float y = exp_of_reduced(x, nf);
  uint32_t m_bits;
  std::memcpy(&m_bits, &m, sizeof(m_bits));
  const uint32_t bits = (m_bits + (127u - 0x4B400000u)) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = y * scale;
  return x0 > 88.7228f ? INFINITY : (x0 < -87.33654f ? 0.0f : e);  // overflow to inf, flush below 2^-126
#endif
}
MOE_HD double act_exp(double x) { return exp(x); }

// erf for the activation kernels: on the host Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, the
// size of an fp32 rounding of 1 + erf), branch-free like act_exp; the device uses erff.
MOE_HD float act_erf(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float r = 1.0f - p * t * act_exp(-ax * ax);
  return x < 0.0f ? -r : r;
#endif
}
MOE_HD double act_erf(double x) { return erf(x); }

// tanh(u) = 1 - 2 / (1 + exp(2u)): one exp, and saturates to +-1 without overflow.
MOE_HD float act_tanh(float u) { return 1.0f - 2.0f / (1.0f + act_exp(2.0f * u)); }
MOE_HD double act_tanh(double u) { return tanh(u); }

template <typename T>
struct ActConst {
  static constexpr T kInvSqrt2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);  // 1 / sqrt(2 pi)
  static constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  static constexpr T kTanhCubic = T(0.044715);
  static constexpr T kOaiAlpha = T(1.702);  // GPT-OSS (transformers' GptOssExperts.alpha / .limit)
  static constexpr T kOaiLimit = T(7.0);
};

// GPT-OSS: with gc = min(g, limit) and uc = clamp(u, -limit, limit), value = gc * sigmoid(alpha gc), dvalue = its
// derivative in gc, and up = uc + 1. NaN passes both clamps (torch's clamp keeps it).
template <typename T>
MOE_HD void oai_parts(T g, T u, T& value, T& dvalue, T& up) {
  using C = ActConst<T>;
  const T gc = g > C::kOaiLimit ? C::kOaiLimit : g;
  const T s = T(1) / (T(1) + act_exp(-C::kOaiAlpha * gc));
  value = gc * s;
  dvalue = s * (T(1) + C::kOaiAlpha * gc * (T(1) - s));
  up = (u > C::kOaiLimit ? C::kOaiLimit : (u < -C::kOaiLimit ? -C::kOaiLimit : u)) + T(1);
}

// act(x).
template <Activation A, typename T>
MOE_HD T act_value(T x) {
  using C = ActConst<T>;
  if constexpr (A == Activation::kSilu) {
    return x / (T(1) + act_exp(-x));
  } else if constexpr (A == Activation::kGelu) {
    return T(0.5) * x * (T(1) + act_erf(x * C::kInvSqrt2));
  } else {
    const T u = C::kSqrt2OverPi * (x + C::kTanhCubic * x * x * x);
    return T(0.5) * x * (T(1) + act_tanh(u));
  }
}

// act(x) and act'(x) together (the backward needs both).
template <Activation A, typename T>
MOE_HD void act_value_and_grad(T x, T& value, T& grad) {
  using C = ActConst<T>;
  if constexpr (A == Activation::kSilu) {
    const T s = T(1) / (T(1) + act_exp(-x));
    value = x * s;
    grad = s * (T(1) + x * (T(1) - s));
  } else if constexpr (A == Activation::kGelu) {
    const T cdf = T(0.5) * (T(1) + act_erf(x * C::kInvSqrt2));
    value = x * cdf;
    grad = cdf + x * C::kInvSqrt2Pi * act_exp(T(-0.5) * x * x);
  } else {
    const T x2 = x * x;
    const T t = act_tanh(C::kSqrt2OverPi * (x + C::kTanhCubic * x2 * x));
    value = T(0.5) * x * (T(1) + t);
    grad = T(0.5) * (T(1) + t) +
           T(0.5) * x * (T(1) - t * t) * C::kSqrt2OverPi * (T(1) + T(3) * C::kTanhCubic * x2);
  }
}

// One output element of the forward, and one (gate, up) gradient pair of the backward.
template <Activation A, typename T>
MOE_HD T gated_forward(T g, T u) {
  if constexpr (A == Activation::kSwigluOai) {
    T value, dvalue, up;
    oai_parts(g, u, value, dvalue, up);
    return value * up;
  } else {
    return act_value<A>(g) * u;
  }
}

template <Activation A, typename T>
MOE_HD void gated_backward(T grad, T g, T u, T& d_g, T& d_u) {
  if constexpr (A == Activation::kSwigluOai) {
    using C = ActConst<T>;
    T value, dvalue, up;
    oai_parts(g, u, value, dvalue, up);
    // torch's clamp passes the gradient only strictly inside its bounds (NaN is not): since torch 2.14 the
    // minimum-norm subgradient, 0 at a bound itself (pytorch#191142; torch <= 2.13 passed it there)
    d_g = g < C::kOaiLimit ? grad * up * dvalue : T(0);
    d_u = u > -C::kOaiLimit && u < C::kOaiLimit ? grad * value : T(0);
  } else {
    T value, dact;
    act_value_and_grad<A>(g, value, dact);
    d_g = grad * u * dact;
    d_u = grad * value;
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime activation `a` (host code).
template <typename F>
inline decltype(auto) dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSwigluOai: return f(std::integral_constant<Activation, Activation::kSwigluOai>{});
    default: return f(std::integral_constant<Activation, Activation::kSilu>{});
  }
}

}  // namespace moe_ext
