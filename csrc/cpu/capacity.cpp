// CPU kernel of capacity_reroute: the sequential greedy pass of common/routing.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "../common/routing.h"

namespace moe_ext {
namespace {

at::Tensor capacity_reroute_cpu(const at::Tensor& expert_ids, const at::Tensor& keys_in, int64_t capacity) {
  check_capacity_reroute(expert_ids, keys_in, capacity);
  auto ids = expert_ids.contiguous().clone();
  const auto keys = keys_in.to(at::kFloat).contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), E = keys.size(1);
  std::vector<int> load(E, 0);
  if (ids.scalar_type() == at::kInt) {
    reroute_capacity(ids.data_ptr<int32_t>(), keys.data_ptr<float>(), T, k, E, capacity, load.data());
  } else {
    reroute_capacity(ids.data_ptr<int64_t>(), keys.data_ptr<float>(), T, k, E, capacity, load.data());
  }
  return ids;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) { m.impl("capacity_reroute", &capacity_reroute_cpu); }

}  // namespace moe_ext
