// CUDA kernels of permute, unpermute and unpermute_backward.
//
// permute is the CPU kernel's stable counting sort (route_slots), done without a host sync:
//   1. count:  the S = T*k slots split into contiguous chunks, one per warp; each warp counts its
//              chunk per expert (integer atomics: exact in any order) -> hist[chunk][e]
//   2. scan:   per expert, an exclusive scan over chunks (-> base); then one block scans the expert
//              totals into the expert starts and writes expert_offsets (clamped to max_rows)
//   3. rank:   each warp walks its chunk 32 slots at a time, in slot order; __match_any_sync groups
//              the lanes of one expert and a lane's rank among them is the popcount of its lower
//              peers; the expert's cursor then advances by the group size. So rows of one expert
//              keep slot order (s = t*k + j), exactly as route_slots assigns them.
//   4. copy:   one warp per output row: the token's row (16-byte vectors when aligned), or zeros
//              past expert_offsets[E], which is read on the device.
// The per-warp cursors live in shared memory when E is small enough, else in the base rows.
//
// unpermute: one warp per token (per slice of its row when there are few tokens), unpermute_backward:
// one warp per slot. Fixed slot order j = 0..k-1, acc accumulation, no floating-point atomics. With
// --fmad=false, unpermute matches the CPU bit for bit.
#include <algorithm>
#include <type_traits>

#include "cuda_utils.cuh"

namespace moe_ext::cuda {
namespace {

constexpr int kWarps = 4;                      // warps per block of the count and rank kernels
constexpr int64_t kSmemExperts = 3072;         // kWarps * E ints of cursors <= 48 KB
constexpr int64_t kHistCells = int64_t(4) << 20;  // bound on chunks * E (two int arrays of it)
constexpr int kRowWarps = 8;                   // warps per block of the row kernels
constexpr int64_t kUnpermuteWarps = 4096;      // unpermute: slice rows until about this many warps run

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
  const int64_t end = min(slots, (c + 1) * pl.chunk);
  for (int64_t s = c * pl.chunk + lane; s < end; s += 32) {
    const int e = expert_of(ids, s, E);
    if (e >= 0) atomicAdd(row + e, 1);
  }
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

// One block: expert starts = exclusive scan of the totals; expert_offsets clamped to max_rows.
__global__ void __launch_bounds__(1024)
permute_scan_experts_kernel(int64_t E, int64_t max_rows, const int* __restrict__ totals,
                            int* __restrict__ starts, int64_t* __restrict__ offsets) {
  __shared__ int s_warp[32];
  __shared__ int s_carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (threadIdx.x == 0) s_carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < E; base += blockDim.x) {
    const int64_t e = base + threadIdx.x;
    const int v = e < E ? totals[e] : 0;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += o;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    int before = s_carry;
    for (int w = 0; w < warp; ++w) before += s_warp[w];
    const int excl = before + incl - v;
    if (e < E) {
      starts[e] = excl;
      offsets[e] = excl < max_rows ? excl : max_rows;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int total = s_carry;
      for (int w = 0; w < nwarps; ++w) total += s_warp[w];
      s_carry = total;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[E] = s_carry < max_rows ? s_carry : max_rows;
}

template <typename Index>
__global__ void __launch_bounds__(kWarps * 32)
permute_rank_kernel(const Index* __restrict__ ids, int64_t slots, int64_t k, int64_t E, int64_t max_rows,
                    PermutePlan pl, int* base, const int* __restrict__ starts,
                    int64_t* __restrict__ row_map, int* __restrict__ src_token) {
  extern __shared__ int s_rows[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c = int64_t(blockIdx.x) * kWarps + warp;
  if (c >= pl.nchunks) return;
  // base is not __restrict__: without shared memory the cursors are updated in place in it
  int* cursor = pl.smem ? s_rows + warp * E : base + c * E;
  for (int64_t e = lane; e < E; e += 32) cursor[e] = base[c * E + e] + starts[e];
  __syncwarp();
  const unsigned lower = (1u << lane) - 1;
  const int64_t begin = c * pl.chunk, end = min(slots, (c + 1) * pl.chunk);
  for (int64_t tile = begin; tile < end; tile += 32) {
    const int64_t s = tile + lane;
    const int e = s < end ? expert_of(ids, s, E) : -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    int row = 0;
    if (e >= 0) row = cursor[e] + __popc(peers & lower);
    __syncwarp();  // every lane has read its cursor before the group's last lane advances it
    if (e >= 0 && lane == 31 - __clz(peers)) cursor[e] = row + 1;
    __syncwarp();
    if (s < end) {
      row_map[s] = e >= 0 ? clamp_row(row, max_rows) : -1;
      if (e >= 0 && row < max_rows) src_token[row] = static_cast<int>(s / k);
    }
  }
}

// One warp per row of x_sorted: the source token's row, or zeros past the kept rows.
template <typename V>
__global__ void __launch_bounds__(kRowWarps * 32)
permute_copy_kernel(const V* __restrict__ x, V* __restrict__ out, int64_t R, int64_t units,
                    const int64_t* __restrict__ offsets, int64_t E, const int* __restrict__ src_token) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= R) return;
  V* dst = out + r * units;
  if (r < offsets[E]) {
    const V* src = x + static_cast<int64_t>(src_token[r]) * units;
    for (int64_t u = lane; u < units; u += 32) dst[u] = src[u];
  } else {
    V zero;
    memset(&zero, 0, sizeof zero);
    for (int64_t u = lane; u < units; u += 32) dst[u] = zero;
  }
}

// A row access of N elements of T at once (N * sizeof(T) = 16 when the rows are 16-byte aligned).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Two kernels, both summing over j = 0..k-1 in order as the CPU kernel does (bit-identical results):
//  - unpermute_rows_kernel, one warp per token and whole row, when there are enough tokens to fill the
//    GPU (T >= kUnpermuteWarps). Few registers, so many warps per SM keep the gathers in flight: 80-84%
//    of copy bandwidth at 4096 tokens on the H100.
//  - unpermute_sliced_kernel for fewer tokens (decode): each row split over several warps (below).
//    It took unpermute at 16 tokens from 28.6 to 5.0 us, but at 4096 tokens it reached only 69-73%
//    (80 registers: fewer warps per SM), hence the split (bench/NOTES.md, unpermute entries).
template <typename T, int N>
__global__ void __launch_bounds__(kRowWarps * 32)
unpermute_rows_kernel(const Pack<T, N>* __restrict__ ys, const int64_t* __restrict__ row_map,
                      const typename AccOf<T>::type* __restrict__ weights, Pack<T, N>* __restrict__ y,
                      int64_t T_, int64_t k, int64_t units, int64_t R) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (t >= T_) return;
  for (int64_t u = lane; u < units; u += 32) {
    Acc sum[N];
#pragma unroll
    for (int n = 0; n < N; ++n) sum[n] = Acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = row_map[t * k + j];
      if (row < 0 || row >= R) continue;  // dropped (an out-of-range row is a caller error: skip it)
      const Acc w = weights != nullptr ? weights[t * k + j] : Acc(1);
      const Pack<T, N> p = ys[row * units + u];
#pragma unroll
      for (int n = 0; n < N; ++n) sum[n] += w * static_cast<Acc>(p.v[n]);
    }
    Pack<T, N> o;
#pragma unroll
    for (int n = 0; n < N; ++n) o.v[n] = from_acc<T>(sum[n]);
    y[t * units + u] = o;
  }
}

// One warp per (token, slice of the row): the row's units [u0, u1) of token t, so that enough warps
// are in flight with few tokens. The token's k (row, weight) pairs are read once into shared memory
// (k <= 32) instead of once per unit, and the k gathered rows are loaded kGather at a time before they
// are summed, so a lane has several loads in flight.
// Minimum 1 block per SM in the launch bounds: without it ptxas held the 16-byte-pack kernels to 64
// registers on sm_90a and spilled (scripts/check_sass.py allows no local memory).
constexpr int kGather = 4;
constexpr int kSharedSlots = 32;

template <typename T, int N>
__global__ void __launch_bounds__(kRowWarps * 32, 1)
unpermute_sliced_kernel(const Pack<T, N>* __restrict__ ys, const int64_t* __restrict__ row_map,
                        const typename AccOf<T>::type* __restrict__ weights, Pack<T, N>* __restrict__ y,
                        int64_t T_, int64_t k, int64_t units, int64_t R, int64_t slices, int64_t slice_units) {
  using Acc = typename AccOf<T>::type;
  __shared__ int64_t s_row[kRowWarps][kSharedSlots];
  __shared__ Acc s_w[kRowWarps][kSharedSlots];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gw = int64_t(blockIdx.x) * kRowWarps + warp;
  if (gw >= T_ * slices) return;  // warp-uniform
  const int64_t t = gw / slices, u0 = gw % slices * slice_units;
  const int64_t u1 = u0 + slice_units < units ? u0 + slice_units : units;
  const bool shared_slots = k <= kSharedSlots;
  if (shared_slots) {
    if (lane < k) {
      s_row[warp][lane] = row_map[t * k + lane];
      s_w[warp][lane] = weights != nullptr ? weights[t * k + lane] : Acc(1);
    }
    __syncwarp();
  }
  for (int64_t u = u0 + lane; u < u1; u += 32) {
    Acc sum[N];
#pragma unroll
    for (int n = 0; n < N; ++n) sum[n] = Acc(0);
    for (int64_t j0 = 0; j0 < k; j0 += kGather) {
      Pack<T, N> p[kGather];
      Acc w[kGather];
      bool use[kGather];
#pragma unroll
      for (int g = 0; g < kGather; ++g) {
        const int64_t j = j0 + g;
        int64_t row = -1;
        w[g] = Acc(0);
        if (j < k && shared_slots) {
          row = s_row[warp][j];
          w[g] = s_w[warp][j];
        } else if (j < k) {
          row = row_map[t * k + j];
          w[g] = weights != nullptr ? weights[t * k + j] : Acc(1);
        }
        use[g] = row >= 0 && row < R;  // dropped (-1); an out-of-range row is a caller error: skip it
        if (use[g]) p[g] = ys[row * units + u];
      }
#pragma unroll
      for (int g = 0; g < kGather; ++g) {
        if (!use[g]) continue;
#pragma unroll
        for (int n = 0; n < N; ++n) sum[n] += w[g] * static_cast<Acc>(p[g].v[n]);
      }
    }
    Pack<T, N> o;
#pragma unroll
    for (int n = 0; n < N; ++n) o.v[n] = from_acc<T>(sum[n]);
    y[t * units + u] = o;
  }
}

__global__ void mark_rows_kernel(const int64_t* __restrict__ row_map, int64_t slots, int64_t R,
                                 unsigned char* __restrict__ referenced) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= slots) return;
  const int64_t row = row_map[s];
  if (row >= 0 && row < R) referenced[row] = 1;
}

// One warp per slot: grad_y_sorted[row] = w * grad_y[t], grad_w[s] = <grad_y[t], y_sorted[row]>.
template <typename T, int N>
__global__ void __launch_bounds__(kRowWarps * 32)
unpermute_backward_kernel(const Pack<T, N>* __restrict__ gy, const Pack<T, N>* __restrict__ ys,
                          const int64_t* __restrict__ row_map, const typename AccOf<T>::type* __restrict__ weights,
                          Pack<T, N>* __restrict__ gys, typename AccOf<T>::type* __restrict__ gw, int64_t slots,
                          int64_t k, int64_t units, int64_t R) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t s = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (s >= slots) return;
  const int64_t row = row_map[s], t = s / k;
  Acc dot = Acc(0);
  if (row >= 0 && row < R) {
    const Acc w = weights != nullptr ? weights[s] : Acc(1);
    for (int64_t u = lane; u < units; u += 32) {
      const Pack<T, N> g = gy[t * units + u];
      const Pack<T, N> yv = ys[row * units + u];
      Pack<T, N> o;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const Acc gv = static_cast<Acc>(g.v[n]);
        o.v[n] = from_acc<T>(w * gv);
        dot += gv * static_cast<Acc>(yv.v[n]);
      }
      gys[row * units + u] = o;
    }
    dot = warp_tree_sum(dot);
  }
  if (gw != nullptr && lane == 0) gw[s] = dot;
}

template <typename V>
__global__ void __launch_bounds__(kRowWarps * 32)
zero_unreferenced_kernel(V* __restrict__ out, int64_t R, int64_t units, const unsigned char* __restrict__ referenced) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= R || referenced[r]) return;
  V zero;
  memset(&zero, 0, sizeof zero);
  for (int64_t u = lane; u < units; u += 32) out[r * units + u] = zero;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Vector width in elements: 16 bytes when every row start is 16-byte aligned, else 1.
template <typename T>
constexpr int vec16() { return 16 / sizeof(T); }

}  // namespace

size_t permute_workspace_bytes(int64_t slots, int64_t num_experts, int64_t max_rows) {
  const PermutePlan pl = plan(slots, num_experts);
  return 2 * align_up(sizeof(int) * pl.nchunks * num_experts) + 2 * align_up(sizeof(int) * num_experts) +
         align_up(sizeof(int) * std::max<int64_t>(max_rows, 1));
}

cudaError_t launch_permute(const void* x, size_t elem_size, int64_t T, int64_t H, const void* ids,
                           bool ids_int32, int64_t k, int64_t num_experts, int64_t max_rows,
                           void* x_sorted, int64_t* expert_offsets, int64_t* row_map, void* workspace,
                           cudaStream_t stream) {
  const int64_t slots = T * k, E = num_experts, R = max_rows;
  const PermutePlan pl = plan(slots, E);
  char* ws = static_cast<char*>(workspace);
  int* hist = reinterpret_cast<int*>(ws);
  ws += align_up(sizeof(int) * pl.nchunks * E);
  int* base = reinterpret_cast<int*>(ws);
  ws += align_up(sizeof(int) * pl.nchunks * E);
  int* totals = reinterpret_cast<int*>(ws);
  ws += align_up(sizeof(int) * E);
  int* starts = reinterpret_cast<int*>(ws);
  ws += align_up(sizeof(int) * E);
  int* src_token = reinterpret_cast<int*>(ws);

  const unsigned chunk_blocks = blocks_for(pl.nchunks, kWarps);
  const size_t smem = pl.smem ? sizeof(int) * kWarps * E : 0;
  if (ids_int32) {
    permute_count_kernel<int32_t><<<chunk_blocks, kWarps * 32, smem, stream>>>(
        static_cast<const int32_t*>(ids), slots, E, pl, hist);
  } else {
    permute_count_kernel<int64_t><<<chunk_blocks, kWarps * 32, smem, stream>>>(
        static_cast<const int64_t*>(ids), slots, E, pl, hist);
  }
  MOE_CUDA_LAUNCH_CHECK();
  permute_scan_chunks_kernel<<<blocks_for(E, 32), dim3(32, 32), 0, stream>>>(E, pl.nchunks, hist, base, totals);
  MOE_CUDA_LAUNCH_CHECK();
  permute_scan_experts_kernel<<<1, 1024, 0, stream>>>(E, R, totals, starts, expert_offsets);
  MOE_CUDA_LAUNCH_CHECK();
  if (ids_int32) {
    permute_rank_kernel<int32_t><<<chunk_blocks, kWarps * 32, smem, stream>>>(
        static_cast<const int32_t*>(ids), slots, k, E, R, pl, base, starts, row_map, src_token);
  } else {
    permute_rank_kernel<int64_t><<<chunk_blocks, kWarps * 32, smem, stream>>>(
        static_cast<const int64_t*>(ids), slots, k, E, R, pl, base, starts, row_map, src_token);
  }
  MOE_CUDA_LAUNCH_CHECK();
  const int64_t row_bytes = H * static_cast<int64_t>(elem_size);
  if (R == 0 || row_bytes == 0) return cudaSuccess;
  const unsigned grid = blocks_for(R, kRowWarps);
  // The widest access that divides the row and both base addresses.
  const auto fits = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(x) % w == 0 &&
           reinterpret_cast<uintptr_t>(x_sorted) % w == 0;
  };
  if (fits(16)) {
    permute_copy_kernel<uint4><<<grid, kRowWarps * 32, 0, stream>>>(
        static_cast<const uint4*>(x), static_cast<uint4*>(x_sorted), R, row_bytes / 16, expert_offsets, E, src_token);
  } else if (fits(8)) {
    permute_copy_kernel<uint2><<<grid, kRowWarps * 32, 0, stream>>>(
        static_cast<const uint2*>(x), static_cast<uint2*>(x_sorted), R, row_bytes / 8, expert_offsets, E, src_token);
  } else if (fits(4)) {
    permute_copy_kernel<uint32_t><<<grid, kRowWarps * 32, 0, stream>>>(
        static_cast<const uint32_t*>(x), static_cast<uint32_t*>(x_sorted), R, row_bytes / 4, expert_offsets, E, src_token);
  } else {
    permute_copy_kernel<uint16_t><<<grid, kRowWarps * 32, 0, stream>>>(
        static_cast<const uint16_t*>(x), static_cast<uint16_t*>(x_sorted), R, row_bytes / 2, expert_offsets, E, src_token);
  }
  MOE_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t launch_unpermute(DType dt, const void* y_sorted, const int64_t* row_map, const void* weights,
                             void* y, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using Tp = typename decltype(tag)::type;
    using Acc = typename AccOf<Tp>::type;
    constexpr int N = vec16<Tp>();
    const Acc* w = static_cast<const Acc*>(weights);
    const bool vec = H % N == 0 && aligned16(y_sorted) && aligned16(y);
    const int64_t units = vec ? H / N : H;
    // Slices of whole 32-unit chunks, as many as it takes to put ~kUnpermuteWarps warps in flight.
    const int64_t chunks = (units + 31) / 32;
    const int64_t want = (kUnpermuteWarps + T - 1) / T;
    const int64_t slices0 = std::min(chunks, std::max<int64_t>(want, 1));
    const int64_t slice_units = (chunks + slices0 - 1) / slices0 * 32;
    const int64_t slices = (units + slice_units - 1) / slice_units;
    const unsigned grid = blocks_for(T * slices, kRowWarps);
    const auto launch = [&](auto pack) {
      constexpr int n = decltype(pack)::value;
      const auto* src = static_cast<const Pack<Tp, n>*>(y_sorted);
      auto* dst = static_cast<Pack<Tp, n>*>(y);
      if (T >= kUnpermuteWarps) {
        unpermute_rows_kernel<Tp, n><<<grid, kRowWarps * 32, 0, stream>>>(src, row_map, w, dst, T, k, units, R);
      } else {
        unpermute_sliced_kernel<Tp, n><<<grid, kRowWarps * 32, 0, stream>>>(src, row_map, w, dst, T, k, units, R,
                                                                           slices, slice_units);
      }
    };
    if (vec) {
      launch(std::integral_constant<int, N>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    MOE_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

size_t unpermute_backward_workspace_bytes(int64_t R) { return align_up(std::max<int64_t>(R, 1)); }

cudaError_t launch_unpermute_backward(DType dt, const void* grad_y, const void* y_sorted,
                                      const int64_t* row_map, const void* weights, void* grad_y_sorted,
                                      void* grad_weights_acc, void* workspace, int64_t T, int64_t k,
                                      int64_t H, int64_t R, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using Tp = typename decltype(tag)::type;
    using Acc = typename AccOf<Tp>::type;
    constexpr int N = vec16<Tp>();
    const int64_t slots = T * k;
    auto* referenced = static_cast<unsigned char*>(workspace);
    if (R > 0) {
      const cudaError_t err = cudaMemsetAsync(referenced, 0, R, stream);
      if (err != cudaSuccess) return err;
      mark_rows_kernel<<<blocks_for(slots, 256), 256, 0, stream>>>(row_map, slots, R, referenced);
      MOE_CUDA_LAUNCH_CHECK();
    }
    const bool vec = H % N == 0 && aligned16(grad_y) && aligned16(y_sorted) && aligned16(grad_y_sorted);
    const Acc* w = static_cast<const Acc*>(weights);
    Acc* gw = static_cast<Acc*>(grad_weights_acc);
    const unsigned grid = blocks_for(slots, kRowWarps);
    if (vec) {
      unpermute_backward_kernel<Tp, N><<<grid, kRowWarps * 32, 0, stream>>>(
          static_cast<const Pack<Tp, N>*>(grad_y), static_cast<const Pack<Tp, N>*>(y_sorted), row_map, w,
          static_cast<Pack<Tp, N>*>(grad_y_sorted), gw, slots, k, H / N, R);
    } else {
      unpermute_backward_kernel<Tp, 1><<<grid, kRowWarps * 32, 0, stream>>>(
          static_cast<const Pack<Tp, 1>*>(grad_y), static_cast<const Pack<Tp, 1>*>(y_sorted), row_map, w,
          static_cast<Pack<Tp, 1>*>(grad_y_sorted), gw, slots, k, H, R);
    }
    MOE_CUDA_LAUNCH_CHECK();
    if (R > 0 && H > 0) {
      const unsigned zgrid = blocks_for(R, kRowWarps);
      if (vec) {
        zero_unreferenced_kernel<uint4><<<zgrid, kRowWarps * 32, 0, stream>>>(
            static_cast<uint4*>(grad_y_sorted), R, H * sizeof(Tp) / 16, referenced);
      } else {
        zero_unreferenced_kernel<Tp><<<zgrid, kRowWarps * 32, 0, stream>>>(
            static_cast<Tp*>(grad_y_sorted), R, H, referenced);
      }
      MOE_CUDA_LAUNCH_CHECK();
    }
    return cudaSuccess;
  });
}

}  // namespace moe_ext::cuda
