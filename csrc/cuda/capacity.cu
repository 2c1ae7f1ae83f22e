// CUDA kernel of capacity_reroute. The greedy order makes every slot depend on all earlier ones, so
// one thread runs the shared sequential pass (common/routing.h) on the device: no host sync, the
// same ids as the CPU by construction. O(T*k + rerouted slots * E * k) steps in a single thread.
#include "launchers.h"

namespace moe_ext::cuda {
namespace {

template <typename index_t>
__global__ void reroute_kernel(index_t* ids, const float* keys, int64_t T, int64_t k, int64_t E, int64_t capacity,
                               int* load) {
  reroute_capacity(ids, keys, T, k, E, capacity, load);
}

}  // namespace

cudaError_t launch_capacity_reroute(void* ids, bool ids_int32, const float* keys, int64_t T, int64_t k, int64_t E,
                                    int64_t capacity, int* load, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(load, 0, sizeof(int) * E, stream);
  if (err != cudaSuccess) return err;
  if (ids_int32) {
    reroute_kernel<<<1, 1, 0, stream>>>(static_cast<int32_t*>(ids), keys, T, k, E, capacity, load);
  } else {
    reroute_kernel<<<1, 1, 0, stream>>>(static_cast<int64_t*>(ids), keys, T, k, E, capacity, load);
  }
  return cudaGetLastError();
}

}  // namespace moe_ext::cuda
