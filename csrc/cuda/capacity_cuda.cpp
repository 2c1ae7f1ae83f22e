// Torch glue of the CUDA capacity_reroute kernel (capacity.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "../common/checks.h"
#include "glue_utils.h"
#include "launchers.h"

namespace moe_ext {
namespace {

at::Tensor capacity_reroute_cuda(const at::Tensor& expert_ids, const at::Tensor& keys_in, int64_t capacity) {
  check_capacity_reroute(expert_ids, keys_in, capacity);
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  auto ids = expert_ids.contiguous().clone();
  const auto keys = keys_in.to(at::kFloat).contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = keys.size(1);
  // Expert ids and per-expert loads are int inside the kernel.
  TORCH_CHECK(E < INT_MAX && T * k < INT_MAX, "moe_ext.capacity_reroute: E = ", E, " and T * k = ", T * k,
              " must stay below 2^31 on CUDA");
  if (T == 0 || k == 0) return ids;
  auto load = at::empty({E}, keys.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::launch_capacity_reroute(ids.data_ptr(), ids.scalar_type() == at::kInt, keys.data_ptr<float>(),
                                               T, k, E, capacity, load.data_ptr<int>(),
                                               c10::cuda::getCurrentCUDAStream()));
  return ids;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) { m.impl("capacity_reroute", &capacity_reroute_cuda); }

}  // namespace moe_ext
