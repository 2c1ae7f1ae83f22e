// CUDA kernels of topk_gating and topk_gating_backward.
//
// Fast path (fp32/fp16/bf16 logits, E <= 512, k <= 32): one warp per token, lane l holding experts
// l, l + 32, ... in registers (NPL = values per lane, a template bucket). Selection is k rounds of a
// warp argmax under routing.h's ranks_before; lane j keeps chosen slot j. Every float sum follows the
// order the CPU kernel uses (routing.h fixed_order_sum, chosen slots in order j = 0..k-1), and the
// file is compiled with --fmad=false, so ids, weights and score_sum match the CPU bit for bit.
//
// Generic path (fp64, larger E or k): one thread per token calling routing.h's gate_token /
// gate_token_backward as the CPU does, with its E-sized scratch in a global workspace.
//
// Per-expert sums: each block of kGateTokenBlock tokens writes one row of partial sums and counts
// ([num_blocks, E]), and a second kernel combines the rows in fixed_order_sum order: deterministic,
// no floating-point atomics.
#include "cuda_utils.cuh"

namespace moe_ext::cuda {
namespace {

// Warps per block of the forward warp kernel: one token per warp. A token is a long dependent chain
// (row stats, group stage, k rounds of warp argmax), so at decode sizes the kernel takes as long as
// the tokens one warp handles in series (bench/NOTES.md, gating entry).
constexpr int kWarps = 16;
constexpr int kTokensPerWarp = kGateTokenBlock / kWarps;
constexpr int kMaxWarpExperts = 512;
constexpr int kMaxWarpK = 32;                      // chosen slot j lives in lane j
constexpr size_t kScratchBytes = size_t(256) << 20;  // generic path: scratch per launch chunk
static_assert(kGateTokenBlock % kWarps == 0, "a block's tokens split evenly over its warps");

bool use_warp_path(const GatingParams& p, DType in) {
  return in != DType::kFloat64 && p.num_experts <= kMaxWarpExperts && p.k <= kMaxWarpK;
}

int64_t num_token_blocks(const GatingParams& p) {
  return (p.num_tokens + kGateTokenBlock - 1) / kGateTokenBlock;
}

// Generic path: tokens per launch chunk, a multiple of the token block so blocks never straddle.
int64_t generic_chunk(const GatingParams& p, size_t acc_size) {
  int64_t c = static_cast<int64_t>(kScratchBytes / (acc_size * p.num_experts));
  c = c / kGateTokenBlock * kGateTokenBlock;
  if (c < kGateTokenBlock) c = kGateTokenBlock;
  if (c > 65535 * kGateTokenBlock) c = 65535 * kGateTokenBlock;  // grid.y of the partials kernel
  const int64_t all = num_token_blocks(p) * kGateTokenBlock;
  return c < all ? c : all;
}

// Group-limited routing: the kept-group mask of routing.h select_groups. Lane g scores groups g and
// g + 32 from the keys staged in `keys` (shared memory), then topk_groups rounds of a warp argmax.
__device__ __forceinline__ uint64_t warp_select_groups(const GatingParams& p, const float* keys, int lane) {
  const int gsize = p.num_experts / p.num_groups;
  const auto key_at = [&](int e) { return keys[e]; };
  const int g0 = lane, g1 = lane + 32;
  const float v0 = g0 < p.num_groups ? group_score<float>(g0 * gsize, (g0 + 1) * gsize, key_at) : 0.f;
  const float v1 = g1 < p.num_groups ? group_score<float>(g1 * gsize, (g1 + 1) * gsize, key_at) : 0.f;
  uint64_t kept = 0;
  for (int r = 0; r < p.topk_groups; ++r) {
    float bk = NAN;
    int bg = INT_MAX;  // "none": ranks after every real group
    if (g0 < p.num_groups && !(kept >> g0 & 1)) { bk = v0; bg = g0; }
    if (g1 < p.num_groups && !(kept >> g1 & 1) && ranks_before(v1, g1, bk, bg)) { bk = v1; bg = g1; }
    warp_best(bk, bg);
    kept |= uint64_t(1) << bg;
  }
  return kept;
}

// The explicit minimum of 1 block: with the bare 512-thread bound, ptxas held the NPL = 4 16-bit
// kernels to 40 registers on sm_90a and spilled; with it they take 48, no spills (check_sass).
template <int NPL, typename In>
__global__ void __launch_bounds__(kWarps * 32, 1)
gate_warp_kernel(GatingParams p, const In* __restrict__ logits, const float* __restrict__ bias,
                 float* __restrict__ weights, int* __restrict__ ids, float* __restrict__ lse,
                 float* __restrict__ psum, int* __restrict__ pcnt) {
  // Scores of the block's tokens (summed per expert at the end); the group stage stages keys here.
  __shared__ float s_score[kGateTokenBlock][NPL * 32];
  __shared__ int s_cnt[NPL * 32];
  const int E = p.num_experts, k = p.k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t_first = int64_t(blockIdx.x) * kGateTokenBlock;
  const int ntok = static_cast<int>(min(int64_t(kGateTokenBlock), p.num_tokens - t_first));
  const bool topk_softmax = p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_cnt[e] = 0;
  __syncthreads();

  for (int tt = warp * kTokensPerWarp; tt < (warp + 1) * kTokensPerWarp && tt < ntok; ++tt) {
    const int64_t t = t_first + tt;
    float* row = s_score[tt];
    float lg[NPL], sc[NPL], key[NPL];
    unsigned ineligible = 0;  // bit i: expert lane + 32 i is padding, taken, or in a dropped group
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int e = lane + 32 * i;
      lg[i] = e < E ? to_float(logits[t * E + e]) : 0.f;
      if (e >= E) ineligible |= 1u << i;
    }
    float m, sum;
    warp_row_stats(lg, lane, E, &m, &sum);
    // The vote only where row_logsumexp reads it, an infinite max (warp-uniform): an unconditional
    // vote made ptxas spill registers in the NPL = 16 fp32 kernel on sm_90a.
    const bool any_nan = (m == INFINITY || m == -INFINITY) && warp_any_nan(lg);
    if (lane == 0) lse[t] = row_logsumexp(m, sum, any_nan);
    const float inv_sum = 1.f / sum;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int e = lane + 32 * i;
      sc[i] = score_of(p.score, lg[i], m, inv_sum);
      key[i] = selection_key(p, lg[i], sc[i], (bias != nullptr && e < E) ? bias[e] : 0.f);
    }

    if (p.num_groups > 1) {
#pragma unroll
      for (int i = 0; i < NPL; ++i)
        if (lane + 32 * i < E) row[lane + 32 * i] = key[i];
      __syncwarp();
      const uint64_t kept = warp_select_groups(p, row, lane);
      __syncwarp();  // the row is overwritten with scores below
      const int gsize = E / p.num_groups;
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && !(kept >> (e / gsize) & 1)) ineligible |= 1u << i;
      }
    }

    // k rounds of argmax; chosen slot j is kept by lane j. The running sum/max visit the slots in
    // order j = 0..k-1, as gate_token does.
    float my_l = 0.f, my_s = 0.f;
    int my_id = 0;
    float chosen_max = -INFINITY, chosen_sum = 0.f;
    for (int j = 0; j < k; ++j) {
      float bk = NAN, bl = 0.f, bs = 0.f;
      int bi = INT_MAX;
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        if (!(ineligible >> i & 1) && ranks_before(key[i], lane + 32 * i, bk, bi)) {
          bk = key[i]; bi = lane + 32 * i; bl = lg[i]; bs = sc[i];
        }
      }
      warp_best(bk, bi);
      const int owner = bi & 31;  // the winner is the owner lane's own best
      const float wl = __shfl_sync(kFullMask, bl, owner);
      const float ws = __shfl_sync(kFullMask, bs, owner);
      if (lane == owner) ineligible |= 1u << (bi >> 5);
      if (lane == j) { my_id = bi; my_l = wl; my_s = ws; }
      if (wl > chosen_max) chosen_max = wl;
      chosen_sum += ws;
    }
    if (topk_softmax) {
      const float my_exp = moe_exp(my_l - chosen_max);
      chosen_sum = 0.f;
      for (int j = 0; j < k; ++j) chosen_sum += __shfl_sync(kFullMask, my_exp, j);
    }
    if (lane < k) {
      weights[t * k + lane] = slot_weight(p, my_l, my_s, chosen_max, chosen_sum);
      ids[t * k + lane] = my_id;
      atomicAdd(&s_cnt[my_id], 1);  // integer: exact in any order
    }
#pragma unroll
    for (int i = 0; i < NPL; ++i)
      if (lane + 32 * i < E) row[lane + 32 * i] = sc[i];
  }
  __syncthreads();

  // This block's partial sums: its tokens in order, as the CPU kernel's per-block loop.
  const int64_t b = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float s = 0.f;
    for (int tt = 0; tt < ntok; ++tt) s += s_score[tt][e];
    psum[b * E + e] = s;
    pcnt[b * E + e] = s_cnt[e];
  }
}

template <typename In, typename Acc>
__global__ void gate_generic_kernel(GatingParams p, int64_t t0, int64_t ntok, const In* __restrict__ logits,
                                    const Acc* __restrict__ bias, Acc* __restrict__ scratch,
                                    Acc* __restrict__ weights, int* __restrict__ ids, Acc* __restrict__ lse) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= ntok) return;
  const int64_t t = t0 + i, E = p.num_experts, k = p.k;
  gate_token<Acc>(p, logits + t * E, bias, scratch + i * E, ids + t * k, weights + t * k, lse + t);
}

// Generic path's partial sums for the token blocks of one chunk (scratch holds the chunk's scores).
template <typename Acc>
__global__ void gate_generic_partials_kernel(GatingParams p, int64_t t0, int64_t ntok,
                                             const Acc* __restrict__ scratch, const int* __restrict__ ids,
                                             Acc* __restrict__ psum, int* __restrict__ pcnt) {
  const int64_t E = p.num_experts, k = p.k;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lb = blockIdx.y;  // token block within the chunk
  if (e >= E) return;
  const int64_t lt0 = lb * kGateTokenBlock;
  const int64_t lt1 = min(lt0 + kGateTokenBlock, ntok);
  Acc s = Acc(0);
  int c = 0;
  for (int64_t lt = lt0; lt < lt1; ++lt) {
    s += scratch[lt * E + e];
    for (int64_t j = 0; j < k; ++j) c += ids[(t0 + lt) * k + j] == e;
  }
  const int64_t b = t0 / kGateTokenBlock + lb;
  psum[b * E + e] = s;
  pcnt[b * E + e] = c;
}

// Combines the [nblocks, E] partial rows: 32 x-threads take 32 experts, 32 y-threads the lanes of
// fixed_order_sum (block b to lane b % 32), then lane_tree, as the CPU kernel's final loop does.
template <typename Acc>
__global__ void __launch_bounds__(1024)
gate_finalize_kernel(int64_t E, int64_t nblocks, const Acc* __restrict__ psum, const int* __restrict__ pcnt,
                     Acc* __restrict__ score_sum, int* __restrict__ tokens_per_expert) {
  __shared__ Acc s_sum[32][33];
  __shared__ int s_cnt[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t e = int64_t(blockIdx.x) * 32 + tx;
  Acc s = Acc(0);
  int c = 0;
  if (e < E) {
    for (int64_t b = ty; b < nblocks; b += 32) {
      s += psum[b * E + e];
      c += pcnt[b * E + e];
    }
  }
  s_sum[ty][tx] = s;
  s_cnt[ty][tx] = c;
  __syncthreads();
  if (ty != 0 || e >= E) return;
  score_sum[e] = lane_tree<1, Acc>(0, [&](int l) { return s_sum[l][tx]; });
  int total = 0;
  for (int l = 0; l < 32; ++l) total += s_cnt[l][tx];
  tokens_per_expert[e] = total;
}

struct GateWorkspace {
  void* psum;
  int* pcnt;
  void* scratch;
};

GateWorkspace carve(const GatingParams& p, size_t acc_size, bool generic, void* base, size_t* total) {
  const size_t cells = static_cast<size_t>(num_token_blocks(p)) * p.num_experts;
  char* ptr = static_cast<char*>(base);
  GateWorkspace w{};
  size_t off = 0;
  w.psum = ptr + off;
  off += align_up(cells * acc_size);
  w.pcnt = reinterpret_cast<int*>(ptr + off);
  off += align_up(cells * sizeof(int));
  w.scratch = ptr + off;
  if (generic) off += align_up(static_cast<size_t>(generic_chunk(p, acc_size)) * p.num_experts * acc_size);
  if (total) *total = off;
  return w;
}

template <int NPL, typename In>
cudaError_t launch_warp(const GatingParams& p, const In* logits, const float* bias, float* weights, int* ids,
                        float* lse, const GateWorkspace& w, cudaStream_t stream) {
  gate_warp_kernel<NPL, In><<<blocks_for(p.num_tokens, kGateTokenBlock), kWarps * 32, 0, stream>>>(
      p, logits, bias, weights, ids, lse, static_cast<float*>(w.psum), w.pcnt);
  MOE_CUDA_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace

size_t topk_gating_workspace_bytes(const GatingParams& p, DType in) {
  size_t total = 0;
  carve(p, in == DType::kFloat64 ? 8 : 4, !use_warp_path(p, in), nullptr, &total);
  return total;
}

cudaError_t launch_topk_gating(const GatingParams& p, DType in, const void* logits, const void* bias,
                               void* weights, int* ids, void* lse, int* tokens_per_expert,
                               void* score_sum, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(in, [&](auto tag) -> cudaError_t {
    using In = typename decltype(tag)::type;
    using Acc = typename AccOf<In>::type;
    const bool generic = !use_warp_path(p, in);
    const GateWorkspace w = carve(p, sizeof(Acc), generic, workspace, nullptr);
    const In* lp = static_cast<const In*>(logits);
    if constexpr (sizeof(Acc) == sizeof(float)) {
      if (!generic) {
        const float* bp = static_cast<const float*>(bias);
        float* wp = static_cast<float*>(weights);
        float* lsep = static_cast<float*>(lse);
        cudaError_t err;
        if (p.num_experts <= 64) err = launch_warp<2>(p, lp, bp, wp, ids, lsep, w, stream);
        else if (p.num_experts <= 128) err = launch_warp<4>(p, lp, bp, wp, ids, lsep, w, stream);
        else if (p.num_experts <= 256) err = launch_warp<8>(p, lp, bp, wp, ids, lsep, w, stream);
        else err = launch_warp<16>(p, lp, bp, wp, ids, lsep, w, stream);
        if (err != cudaSuccess) return err;
      }
    }
    if (generic) {
      const int64_t chunk = generic_chunk(p, sizeof(Acc));
      for (int64_t t0 = 0; t0 < p.num_tokens; t0 += chunk) {
        const int64_t n = min(chunk, p.num_tokens - t0);
        gate_generic_kernel<In, Acc><<<blocks_for(n, 128), 128, 0, stream>>>(
            p, t0, n, lp, static_cast<const Acc*>(bias), static_cast<Acc*>(w.scratch),
            static_cast<Acc*>(weights), ids, static_cast<Acc*>(lse));
        MOE_CUDA_LAUNCH_CHECK();
        const dim3 grid(blocks_for(p.num_experts, 128), static_cast<unsigned>(blocks_for(n, kGateTokenBlock)));
        gate_generic_partials_kernel<Acc><<<grid, 128, 0, stream>>>(
            p, t0, n, static_cast<const Acc*>(w.scratch), ids, static_cast<Acc*>(w.psum), w.pcnt);
        MOE_CUDA_LAUNCH_CHECK();
      }
    }
    gate_finalize_kernel<Acc><<<blocks_for(p.num_experts, 32), dim3(32, 32), 0, stream>>>(
        p.num_experts, num_token_blocks(p), static_cast<const Acc*>(w.psum), w.pcnt,
        static_cast<Acc*>(score_sum), tokens_per_expert);
    MOE_CUDA_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace moe_ext::cuda
