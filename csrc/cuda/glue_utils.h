// Small helpers shared by the CUDA torch glue (.cpp): the launcher dtype of a tensor, and a byte
// workspace from the caching allocator (stream-ordered, so CUDA-graph capture is fine).
#pragma once

#include <ATen/ATen.h>

#include "launchers.h"

namespace moe_ext::cuda {

inline DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "moe_ext: unsupported dtype ", t);
  }
}

// float for fp32/fp16/bf16 tensors, double for fp64: the dtype of the routing maths (dispatch.h acc_t).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

}  // namespace moe_ext::cuda
