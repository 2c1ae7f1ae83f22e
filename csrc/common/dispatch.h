// The project's dtype switch: the four floating types the ops accept, and an error naming the op
// for anything else (AT_DISPATCH_* would name an internal kernel instead).
#pragma once

#include <ATen/Dispatch.h>

#define MOE_DISPATCH_FLOAT_TYPES(TYPE, OP_NAME, ...)                                         \
  [&] {                                                                                      \
    switch (TYPE) {                                                                          \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                     \
      case at::kDouble: { using scalar_t = double; return __VA_ARGS__(); }                   \
      case at::kHalf: { using scalar_t = at::Half; return __VA_ARGS__(); }                   \
      case at::kBFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); }           \
      default:                                                                               \
        TORCH_CHECK(false, "moe_ext.", OP_NAME, ": unsupported dtype ", TYPE,                \
                    " (expected float32, float16, bfloat16 or float64)");                    \
    }                                                                                        \
  }()

// Accumulation type: fp32 for the 16-bit types and fp32, fp64 for fp64 (so gradcheck is exact).
template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename T>
using acc_t = typename AccType<T>::type;
