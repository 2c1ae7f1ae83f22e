// CUDA kernels of permute, unpermute and unpermute_backward.
//
// permute is the CPU kernel's stable counting sort (route_slots), done without a host sync (steps 1-3
// in one block, permute_route_block_kernel, for up to kBlockSlots slots):
//   1. count:  the S = T*k slots split into contiguous chunks, one per warp; each warp counts its
//              chunk per expert (integer atomics: exact in any order) -> hist[chunk][e]
//   2. scan:   per expert, an exclusive scan over chunks (-> base); then one warp scans the expert
//              totals into the expert starts and writes expert_offsets (clamped to max_rows)
//   3. rank:   each warp walks its chunk 32 slots at a time, in slot order; __match_any_sync groups
//              the lanes of one expert and a lane's rank among them is the popcount of its lower
//              peers; the expert's cursor then advances by the group size. So rows of one expert
//              keep slot order (s = t*k + j), exactly as route_slots assigns them.
//   4. copy:   one warp per token (per slice of its row when there are few tokens) reads the row
//              once and writes it to each of its k rows (16-byte vectors when aligned); the rows
//              past expert_offsets[E], which is read on the device, are zeroed.
// The per-warp cursors live in shared memory when E is small enough, else in the base rows.
// unpermute and its backward are in unpermute.cu.
#include <algorithm>

#include "rows.cuh"

namespace moe_ext::cuda {
namespace {

constexpr int kWarps = 4;                      // warps per block of the count and rank kernels
constexpr int64_t kSmemExperts = 3072;         // kWarps * E ints of cursors <= 48 KB
constexpr int64_t kHistCells = int64_t(4) << 20;  // bound on chunks * E (two int arrays of it)
constexpr int64_t kBlockSlots = 4096;          // up to this many slots, one block routes them all
constexpr int64_t kBlockSmemInts = 8192;       // its per-warp counts: warps * E <= this (32 KB)
constexpr int kBlockWarps = 16;                // its most warps (at 32, sm_80 spilled a register)

struct PermutePlan {
  int64_t chunk;    // slots per warp chunk, a multiple of 32
  int64_t nchunks;
  bool smem;
};

PermutePlan plan(int64_t slots, int64_t E) {
  int64_t n = (slots + 255) / 256;
  const int64_t cap = std::max<int64_t>(1, kHistCells / E);
  if (n > cap) n = cap;
  if (n < 1) n = 1;
  PermutePlan p;
  p.chunk = ((slots + n - 1) / n + 31) / 32 * 32;
  p.nchunks = (slots + p.chunk - 1) / p.chunk;
  p.smem = E <= kSmemExperts;
  return p;
}

template <typename Index>
__device__ __forceinline__ int expert_of(const Index* ids, int64_t s, int64_t E) {
  const int64_t e = static_cast<int64_t>(ids[s]);
  return valid_expert(e, E) ? static_cast<int>(e) : -1;
}

// Counts one warp's slots [begin, end) per expert into row[E] (integer atomics: exact in any order).
template <typename Index>
__device__ __forceinline__ void count_chunk(const Index* ids, int64_t begin, int64_t end, int64_t E, int* row,
                                            int lane) {
  for (int64_t s = begin + lane; s < end; s += 32) {
    const int e = expert_of(ids, s, E);
    if (e >= 0) atomicAdd(row + e, 1);
  }
}

// One warp ranks slots [begin, end), 32 at a time in slot order: a routed slot's row is its expert's
// cursor plus the popcount of its lower peers (lanes of the same expert), and the group's last lane
// advances the cursor. So rows of one expert keep slot order. Writes row_map (-1: dropped).
template <typename Index>
__device__ __forceinline__ void rank_chunk(const Index* ids, int64_t begin, int64_t end, int64_t E,
                                           int64_t max_rows, int* cursor, int64_t* row_map, int lane) {
  const unsigned lower = (1u << lane) - 1;
  for (int64_t tile = begin; tile < end; tile += 32) {
    const int64_t s = tile + lane;
    const int e = s < end ? expert_of(ids, s, E) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    int row = 0;
    if (e >= 0) row = cursor[e] + __popc(peers & lower);
    __syncwarp();  // every lane has read its cursor before the group's last lane advances it
    if (e >= 0 && lane == 31 - __clz(peers)) cursor[e] = row + 1;
    __syncwarp();
    if (s < end) row_map[s] = e >= 0 ? clamp_row(row, max_rows) : -1;
  }
}

template <typename Index>
__global__ void __launch_bounds__(kWarps * 32)
permute_count_kernel(const Index* __restrict__ ids, int64_t slots, int64_t E, PermutePlan pl, int* __restrict__ hist) {
  extern __shared__ int s_rows[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = int64_t(blockIdx.x) * kWarps + warp;
  if (c >= pl.nchunks) return;
  int* row = pl.smem ? s_rows + warp * E : hist + c * E;
  for (int64_t e = lane; e < E; e += 32) row[e] = 0;
  __syncwarp();
  count_chunk(ids, c * pl.chunk, min(slots, (c + 1) * pl.chunk), E, row, lane);
  __syncwarp();
  if (pl.smem)
    for (int64_t e = lane; e < E; e += 32) hist[c * E + e] = row[e];
}

// Per expert: exclusive scan of the chunk counts into base[chunk][e], and the expert's total.
// A 32 x 32 block takes 32 experts; its 32 y-threads split the chunks into contiguous ranges (sum,
// scan of the 32 range sums, then the range's prefixes), so no thread walks all chunks serially.
__global__ void __launch_bounds__(1024)
permute_scan_chunks_kernel(int64_t E, int64_t nchunks, const int* __restrict__ counts, int* __restrict__ base,
                           int* __restrict__ totals) {
  __shared__ int s_part[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t e = int64_t(blockIdx.x) * 32 + tx;
  const int64_t per = (nchunks + 31) / 32;
  const int64_t c0 = min(nchunks, ty * per), c1 = min(nchunks, c0 + per);
  int sum = 0;
  if (e < E)
    for (int64_t c = c0; c < c1; ++c) sum += counts[c * E + e];
  s_part[ty][tx] = sum;
  __syncthreads();
  if (ty == 0) {
    int run = 0;
    for (int y = 0; y < 32; ++y) {
      const int v = s_part[y][tx];
      s_part[y][tx] = run;
      run += v;
    }
    if (e < E) totals[e] = run;
  }
  __syncthreads();
  if (e >= E) return;
  int run = s_part[ty][tx];
  for (int64_t c = c0; c < c1; ++c) {
    base[c * E + e] = run;
    run += counts[c * E + e];
  }
}

// One warp: expert starts = exclusive scan of the per-expert totals (lane l takes a contiguous range
// of experts: its sum, a warp scan of the 32 sums, then the range's prefixes), and expert_offsets
// clamped to max_rows. totals and starts may be the same array.
__device__ __forceinline__ void warp_scan_expert_starts(const int* totals, int* starts, int64_t* offsets, int64_t E,
                                                        int64_t max_rows, int lane) {
  const int64_t per = (E + 31) / 32, e0 = min(E, lane * per), e1 = min(E, e0 + per);
  int sum = 0;
  for (int64_t e = e0; e < e1; ++e) sum += totals[e];
  int incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += o;
  }
  int run = incl - sum;
  for (int64_t e = e0; e < e1; ++e) {
    const int v = totals[e];
    starts[e] = run;
    offsets[e] = run < max_rows ? run : max_rows;
    run += v;
  }
  if (lane == 31) offsets[E] = incl < max_rows ? incl : max_rows;  // lane 31's prefix: every slot
}

__global__ void __launch_bounds__(32)
permute_scan_experts_kernel(int64_t E, int64_t max_rows, const int* __restrict__ totals,
                            int* __restrict__ starts, int64_t* __restrict__ offsets) {
  warp_scan_expert_starts(totals, starts, offsets, E, max_rows, threadIdx.x);
}

template <typename Index>
__global__ void __launch_bounds__(kWarps * 32)
permute_rank_kernel(const Index* __restrict__ ids, int64_t slots, int64_t E, int64_t max_rows, PermutePlan pl,
                    int* base, const int* __restrict__ starts, int64_t* __restrict__ row_map) {
  extern __shared__ int s_rows[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = int64_t(blockIdx.x) * kWarps + warp;
  if (c >= pl.nchunks) return;
  // base is not __restrict__: without shared memory the cursors are updated in place in it
  int* cursor = pl.smem ? s_rows + warp * E : base + c * E;
  for (int64_t e = lane; e < E; e += 32) cursor[e] = base[c * E + e] + starts[e];
  __syncwarp();
  rank_chunk(ids, c * pl.chunk, min(slots, (c + 1) * pl.chunk), E, max_rows, cursor, row_map, lane);
}

// Small problems (slots <= kBlockSlots, E <= kSmemExperts; decode): count, both scans and rank in
// one block, one launch instead of four. Warp w takes slots [w chunk, (w + 1) chunk); its counts
// hist[w][e] (shared memory) become its base, then its cursor. Rows come out as in the four-kernel
// path: any split into chunks ranks slots in the same global order.
template <typename Index>
__global__ void __launch_bounds__(kBlockWarps * 32)
permute_route_block_kernel(const Index* __restrict__ ids, int64_t slots, int64_t E, int64_t max_rows,
                           int64_t chunk, int64_t* __restrict__ offsets, int64_t* __restrict__ row_map) {
  extern __shared__ int s_mem[];
  const int W = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int* hist = s_mem;           // [W][E]
  int* start = s_mem + W * E;  // [E]: each expert's total, then its first row
  for (int64_t i = threadIdx.x; i < W * E; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const int64_t begin = min(slots, warp * chunk), end = min(slots, begin + chunk);
  count_chunk(ids, begin, end, E, hist + warp * E, lane);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {  // exclusive scan over the warps
    int run = 0;
    for (int w = 0; w < W; ++w) {
      const int v = hist[w * E + e];
      hist[w * E + e] = run;
      run += v;
    }
    start[e] = run;
  }
  __syncthreads();
  if (warp == 0) warp_scan_expert_starts(start, start, offsets, E, max_rows, lane);
  __syncthreads();
  int* cursor = hist + warp * E;
  for (int64_t e = lane; e < E; e += 32) cursor[e] += start[e];
  __syncwarp();
  rank_chunk(ids, begin, end, E, max_rows, cursor, row_map, lane);
}

// One warp per (token, slice of its row): the slice is read once and written to each of the
// token's kept rows. (Gathering one output row per warp read each token's row k times, from DRAM
// once x outgrows L2: DeepSeek-V3's 4096 tokens moved 940 MB for 530 MB of data.) Every row below
// expert_offsets[E] belongs to exactly one slot, so each is written once; then all the grid's warps
// zero the rows from there to R (rows of dropped slots' share of max_rows), read on the device.
constexpr int kScatterUnroll = 4;  // loads in flight per lane before the k stores

template <typename V>
__global__ void __launch_bounds__(kRowWarps * 32)
permute_scatter_kernel(const V* __restrict__ x, V* __restrict__ out, int64_t T, int64_t k, int64_t units,
                       int64_t R, RowSlices sl, const int64_t* __restrict__ row_map,
                       const int64_t* __restrict__ offsets, int64_t E) {
  __shared__ int64_t s_row[kRowWarps][kSharedSlots];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gw = int64_t(blockIdx.x) * kRowWarps + warp;
  if (gw < T * sl.slices) {  // warp-uniform
    const int64_t t = gw / sl.slices, u0 = gw % sl.slices * sl.slice_units;
    const int64_t u1 = u0 + sl.slice_units < units ? u0 + sl.slice_units : units;
    const bool shared_rows = k <= kSharedSlots;
    if (shared_rows) {
      if (lane < k) s_row[warp][lane] = row_map[t * k + lane];
      __syncwarp();
    }
    const V* src = x + t * units;
    for (int64_t u = u0 + lane; u < u1; u += 32 * kScatterUnroll) {
      V v[kScatterUnroll];
#pragma unroll
      for (int g = 0; g < kScatterUnroll; ++g)
        if (u + 32 * g < u1) v[g] = src[u + 32 * g];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = shared_rows ? s_row[warp][j] : row_map[t * k + j];
        if (row < 0 || row >= R) continue;  // dropped
        V* dst = out + row * units;
#pragma unroll
        for (int g = 0; g < kScatterUnroll; ++g)
          if (u + 32 * g < u1) dst[u + 32 * g] = v[g];
      }
    }
  }
  V zero;
  memset(&zero, 0, sizeof zero);
  const int64_t warps = int64_t(gridDim.x) * kRowWarps;
  for (int64_t r = offsets[E] + gw; r < R; r += warps)
    for (int64_t u = lane; u < units; u += 32) out[r * units + u] = zero;
}

}  // namespace

size_t permute_workspace_bytes(int64_t slots, int64_t num_experts) {
  const PermutePlan pl = plan(slots, num_experts);
  return 2 * align_up(sizeof(int) * pl.nchunks * num_experts) + 2 * align_up(sizeof(int) * num_experts);
}

cudaError_t launch_permute(const void* x, size_t elem_size, int64_t T, int64_t H, const void* ids,
                           bool ids_int32, int64_t k, int64_t num_experts, int64_t max_rows,
                           void* x_sorted, int64_t* expert_offsets, int64_t* row_map, void* workspace,
                           cudaStream_t stream) {
  const int64_t slots = T * k, E = num_experts, R = max_rows;
  const auto route = [&](auto tag) -> cudaError_t {
    using Index = typename decltype(tag)::type;
    const Index* idp = static_cast<const Index*>(ids);
    if (slots <= kBlockSlots && E <= kSmemExperts) {
      const int64_t warps = std::min<int64_t>({kBlockSmemInts / E, kBlockWarps, (slots + 31) / 32});
      const int64_t chunk = ((slots + warps - 1) / warps + 31) / 32 * 32;
      const size_t smem = sizeof(int) * (warps + 1) * E;
      permute_route_block_kernel<Index><<<1, static_cast<unsigned>(warps * 32), smem, stream>>>(
          idp, slots, E, R, chunk, expert_offsets, row_map);
      MOE_CUDA_LAUNCH_CHECK();
      return cudaSuccess;
    }
    const PermutePlan pl = plan(slots, E);
    char* ws = static_cast<char*>(workspace);
    int* hist = reinterpret_cast<int*>(ws);
    ws += align_up(sizeof(int) * pl.nchunks * E);
    int* base = reinterpret_cast<int*>(ws);
    ws += align_up(sizeof(int) * pl.nchunks * E);
    int* totals = reinterpret_cast<int*>(ws);
    ws += align_up(sizeof(int) * E);
    int* starts = reinterpret_cast<int*>(ws);
    const unsigned chunk_blocks = blocks_for(pl.nchunks, kWarps);
    const size_t smem = pl.smem ? sizeof(int) * kWarps * E : 0;
    permute_count_kernel<Index><<<chunk_blocks, kWarps * 32, smem, stream>>>(idp, slots, E, pl, hist);
    MOE_CUDA_LAUNCH_CHECK();
    permute_scan_chunks_kernel<<<blocks_for(E, 32), dim3(32, 32), 0, stream>>>(E, pl.nchunks, hist, base, totals);
    MOE_CUDA_LAUNCH_CHECK();
    permute_scan_experts_kernel<<<1, 32, 0, stream>>>(E, R, totals, starts, expert_offsets);
    MOE_CUDA_LAUNCH_CHECK();
    permute_rank_kernel<Index><<<chunk_blocks, kWarps * 32, smem, stream>>>(idp, slots, E, R, pl, base, starts,
                                                                            row_map);
    MOE_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  };
  const cudaError_t err = ids_int32 ? route(TypeTag<int32_t>{}) : route(TypeTag<int64_t>{});
  if (err != cudaSuccess) return err;
  const int64_t row_bytes = H * static_cast<int64_t>(elem_size);
  if (R == 0 || row_bytes == 0) return cudaSuccess;
  // The widest access that divides the row and both base addresses.
  const auto fits = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(x) % w == 0 &&
           reinterpret_cast<uintptr_t>(x_sorted) % w == 0;
  };
  const auto scatter = [&](auto tag) {
    using V = typename decltype(tag)::type;
    const int64_t units = row_bytes / static_cast<int64_t>(sizeof(V));
    const RowSlices sl = row_slices(T, units);
    // at least min(R, kRowTargetWarps) warps, so that few tokens still zero many padding rows quickly
    const int64_t warps = std::max(T * sl.slices, std::min(R, kRowTargetWarps));
    permute_scatter_kernel<V><<<blocks_for(warps, kRowWarps), kRowWarps * 32, 0, stream>>>(
        static_cast<const V*>(x), static_cast<V*>(x_sorted), T, k, units, R, sl, row_map, expert_offsets, E);
  };
  if (fits(16)) scatter(TypeTag<uint4>{});
  else if (fits(8)) scatter(TypeTag<uint2>{});
  else if (fits(4)) scatter(TypeTag<uint32_t>{});
  else scatter(TypeTag<uint16_t>{});
  MOE_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace moe_ext::cuda
