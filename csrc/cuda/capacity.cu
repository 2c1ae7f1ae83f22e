// CUDA kernel of capacity_reroute. The greedy order (common/routing.h reroute_capacity) makes every
// slot depend on all earlier ones, so the decisions stay sequential; one warp makes them, which keeps
// the order exactly and takes the latency out of it:
//   - lane l reads token (t0 + l)'s choice ahead (no decision changes a later token's own choice);
//   - the slots are decided one at a time, against expert loads in shared memory (global memory
//     when E is too large for it);
//   - an overflowing slot's search over the E experts is split across the lanes and reduced under the
//     same total order (ranks_before), so it picks the expert the CPU loop picks.
// No host sync; ids identical to the CPU kernel's.
#include <climits>

#include "cuda_utils.cuh"

namespace moe_ext::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int64_t kSmemLoadMax = 12288;  // expert loads that fit in the default 48 KiB of shared memory

template <typename index_t>
__global__ void __launch_bounds__(kWarp) reroute_warp_kernel(index_t* ids, const float* keys, int64_t T, int64_t k,
                                                             int64_t E, int64_t capacity, int* load_global) {
  extern __shared__ int load_smem[];
  const int lane = threadIdx.x;
  int* load = E <= kSmemLoadMax ? load_smem : load_global;
  for (int64_t a = lane; a < E; a += kWarp) load[a] = 0;
  __syncwarp();
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t0 = 0; t0 < T; t0 += kWarp) {
      const long long mine = t0 + lane < T ? static_cast<long long>(ids[(t0 + lane) * k + j]) : -1;
      const int n = static_cast<int>(T - t0 < kWarp ? T - t0 : kWarp);
      for (int l = 0; l < n; ++l) {
        const int64_t e = __shfl_sync(kFullMask, mine, l);  // the same on every lane: uniform branches
        const int64_t t = t0 + l;
        index_t* row = ids + t * k;
        const bool valid = valid_expert(e, E);
        const bool fits = valid && load[e] < capacity;
        __syncwarp();  // every lane has read load[e] before lane 0 changes it
        if (!valid) {
          if (lane == 0) row[j] = -1;
        } else if (fits) {
          if (lane == 0) ++load[e];
        } else {
          // Sentinel: ranks after every real candidate, NaN keys and ties included.
          float best_key = __int_as_float(0x7fc00000);
          int best = INT_MAX;
          for (int64_t a = lane; a < E; a += kWarp) {
            if (load[a] >= capacity) continue;
            bool held = false;
            for (int64_t i = 0; i < k; ++i) held = held || row[i] == a;
            if (held) continue;
            const float key = keys[t * E + a];
            if (ranks_before(key, static_cast<int>(a), best_key, best)) {
              best_key = key;
              best = static_cast<int>(a);
            }
          }
          best = warp_best_id(best_key, best);
          __syncwarp();  // every lane's reads of load and row before lane 0 writes them
          if (lane == 0) {
            const bool found = best != INT_MAX;
            row[j] = static_cast<index_t>(found ? best : -1);
            if (found) ++load[best];
          }
        }
        __syncwarp();  // lane 0's writes (row, load) before any lane's next read
      }
    }
  }
}

}  // namespace

cudaError_t launch_capacity_reroute(void* ids, bool ids_int32, const float* keys, int64_t T, int64_t k, int64_t E,
                                    int64_t capacity, int* load, cudaStream_t stream) {
  const size_t smem = E <= kSmemLoadMax ? sizeof(int) * E : 0;
  if (ids_int32) {
    reroute_warp_kernel<<<1, kWarp, smem, stream>>>(static_cast<int32_t*>(ids), keys, T, k, E, capacity, load);
  } else {
    reroute_warp_kernel<<<1, kWarp, smem, stream>>>(static_cast<int64_t*>(ids), keys, T, k, E, capacity, load);
  }
  return cudaGetLastError();
}

}  // namespace moe_ext::cuda
