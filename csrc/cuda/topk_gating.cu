// CUDA kernels of topk_gating and topk_gating_backward.
//
// Fast path (fp32/fp16/bf16 logits, E <= 512, k <= 32): one warp per token, lane l holding experts
// l, l + 32, ... in registers (NPL = values per lane, a template bucket). Selection is k rounds of a
// warp argmax under routing.h's ranks_before, taken as two integer reductions of rank_bits (the
// largest rank, then the lowest id holding it); lane j keeps chosen slot j. Every float sum follows the
// order the CPU kernel uses (routing.h fixed_order_sum, chosen slots in order j = 0..k-1), and the
// file is compiled with --fmad=false, so ids, weights and score_sum match the CPU bit for bit.
//
// Generic path (fp64, larger E or k): one thread per token calling routing.h's gate_token /
// gate_token_backward as the CPU does, with its E-sized scratch in a global workspace.
//
// Per-expert sums: each block of kGateTokenBlock tokens writes one row of partial sums and counts
// ([num_blocks, E]), and a second kernel combines the rows in fixed_order_sum order: deterministic,
// no floating-point atomics. A single block (decode) writes the final sums itself.
#include <type_traits>

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

// Group-limited routing, any group size: the kept-group mask of routing.h select_groups. Lane g
// scores groups g and g + 32 from the keys staged in `keys` (shared memory), then topk_groups rounds
// of a warp argmax.
__device__ __forceinline__ uint64_t warp_select_groups(const GatingParams& p, const float* keys, int lane) {
  const int gsize = p.num_experts / p.num_groups;
  const auto key_at = [&](int e) { return keys[e]; };
  const int g0 = lane, g1 = lane + 32;
  const float v0 = g0 < p.num_groups ? group_score<float>(g0 * gsize, (g0 + 1) * gsize, p.group_top, key_at) : 0.f;
  const float v1 = g1 < p.num_groups ? group_score<float>(g1 * gsize, (g1 + 1) * gsize, p.group_top, key_at) : 0.f;
  uint64_t kept = 0;
  for (int r = 0; r < p.topk_groups; ++r) {
    float bk = NAN;
    int bg = INT_MAX;  // "none": ranks after every real group
    if (g0 < p.num_groups && !(kept >> g0 & 1)) { bk = v0; bg = g0; }
    if (g1 < p.num_groups && !(kept >> g1 & 1) && ranks_before(v1, g1, bk, bg)) { bk = v1; bg = g1; }
    kept |= uint64_t(1) << warp_best_id(bk, bg);
  }
  return kept;
}

// Group-limited routing when group i is register slot i: E = 32 * NPL experts in NPL groups of 32
// (DeepSeek-V3: 256 in 8). A group's score (routing.h group_score: the sum of its two best keys, or
// the best) comes from three warp reductions (one for the best) over slot i instead of a serial scan
// of 32 keys, and every lane ends with all NPL group scores, so the kept set (the topk_groups best
// under ranks_before) needs no further communication. cand: rank_bits(key) + 1 of each expert.
template <int NPL>
__device__ __forceinline__ uint64_t warp_select_slot_groups(const GatingParams& p, const unsigned (&cand)[NPL],
                                                            int lane) {
  unsigned gr[NPL];
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const unsigned c1 = warp_umax(cand[i]);
    if (p.group_top == 1) {  // the best key ranks as itself (uniform branch)
      gr[i] = c1 - 1u;
      continue;
    }
    const unsigned first = warp_umin(cand[i] == c1 ? unsigned(lane) : 32u);
    const unsigned c2 = warp_umax(unsigned(lane) == first ? 0u : cand[i]);
    // rank_value gives back the keys (a zero as +0: sums then differ from the CPU's only in the
    // sign of a zero, which ranks the same)
    gr[i] = rank_bits(rank_value(c1 - 1u) + rank_value(c2 - 1u));
  }
  uint64_t kept = 0;
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    int before = 0;  // groups ranking before group i
#pragma unroll
    for (int j = 0; j < NPL; ++j) before += j < i ? gr[j] >= gr[i] : (j > i && gr[j] > gr[i]);
    if (before < p.topk_groups) kept |= uint64_t(1) << i;
  }
  return kept;
}

// Launch bounds: two blocks per SM (64 registers) up to NPL = 8, which keeps DeepSeek-V3's 4096
// tokens (256 blocks) in one wave on an H100; NPL = 16 needs more and takes one. An explicit minimum
// either way: with the bare 512-thread bound ptxas held the NPL = 4 16-bit kernels to 40 registers
// on sm_90a and spilled (check_sass).
//
// A grid of one block (num_tokens <= kGateTokenBlock, decode) also finishes the per-expert sums,
// as gate_finalize_kernel would from its single partial row, which saves that launch.
template <int NPL, typename In>
__global__ void __launch_bounds__(kWarps * 32, NPL <= 8 ? 2 : 1)
gate_warp_kernel(GatingParams p, const In* __restrict__ logits, const float* __restrict__ bias,
                 float* __restrict__ weights, int* __restrict__ ids, float* __restrict__ lse,
                 float* __restrict__ psum, int* __restrict__ pcnt, float* __restrict__ score_sum,
                 int* __restrict__ tokens_per_expert) {
  // Scores of the block's tokens (summed per expert at the end); the group stage stages keys here.
  __shared__ float s_score[kGateTokenBlock][NPL * 32];
  __shared__ int s_cnt[NPL * 32];
  const int E = p.num_experts, k = p.k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t_first = int64_t(blockIdx.x) * kGateTokenBlock;
  const int ntok = static_cast<int>(min(int64_t(kGateTokenBlock), p.num_tokens - t_first));
  const bool topk_softmax = p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax;
  const bool slot_groups = p.num_groups == NPL && E == 32 * NPL;
  const bool staged_groups = p.num_groups > 1 && !slot_groups;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_cnt[e] = 0;
  __syncthreads();

  for (int tt = warp * kTokensPerWarp; tt < (warp + 1) * kTokensPerWarp && tt < ntok; ++tt) {
    const int64_t t = t_first + tt;
    float* row = s_score[tt];
    float lg[NPL], sc[NPL];
    // rank_bits(key) + 1 while expert lane + 32 i can still be chosen; 0 once it is padding, taken,
    // or in a dropped group. A NaN key gets 1: after every number, but still a candidate.
    unsigned cand[NPL];
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int e = lane + 32 * i;
      lg[i] = e < E ? to_float(logits[t * E + e]) : 0.f;
    }
    float m, sum;
    warp_row_stats(lg, lane, E, &m, &sum, &sc);  // sc holds exp(l - m) until scored below
    // The vote only where row_logsumexp reads it, an infinite max (warp-uniform): an unconditional
    // vote made ptxas spill registers in the NPL = 16 fp32 kernel on sm_90a.
    const bool any_nan = (m == INFINITY || m == -INFINITY) && warp_any_nan(lg);
    if (lane == 0) lse[t] = row_logsumexp(m, sum, any_nan);
    warp_scores(p.score, lg, 1.f / sum, sc);
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int e = lane + 32 * i;
      const float key = selection_key(p, lg[i], sc[i], (bias != nullptr && e < E) ? bias[e] : 0.f);
      cand[i] = e < E ? rank_bits(key) + 1u : 0u;
      if (staged_groups && e < E) row[e] = key;
    }

    if (p.num_groups > 1) {
      uint64_t kept;
      if (slot_groups) {
        kept = warp_select_slot_groups(p, cand, lane);
      } else {
        __syncwarp();
        kept = warp_select_groups(p, row, lane);
        __syncwarp();  // the row is overwritten with scores below
      }
      const int gsize = E / p.num_groups;
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E && !(kept >> (e / gsize) & 1)) cand[i] = 0;
      }
    }

    // k rounds: the largest candidate rank over the warp, then the lowest id holding it (lowest
    // slot on a lane, then lowest lane: id = lane + 32 slot), which is ranks_before's winner. Two
    // integer reductions a round; lane j keeps chosen slot j's id.
    int my_id = 0;
    for (int j = 0; j < k; ++j) {
      unsigned best = 0;
#pragma unroll
      for (int i = 0; i < NPL; ++i) best = max(best, cand[i]);
      const unsigned top = warp_umax(best);
      unsigned pos = ~0u;
#pragma unroll
      for (int i = 0; i < NPL; ++i) pos = min(pos, cand[i] == top ? unsigned(lane + 32 * i) : ~0u);
      const int id = static_cast<int>(warp_umin(pos));
      if (lane == j) my_id = id;
#pragma unroll
      for (int i = 0; i < NPL; ++i)
        if (id == lane + 32 * i) cand[i] = 0;
    }
    // Slot j's logit and score from the lane that holds its expert; then the chosen max and sum
    // visit the slots in order j = 0..k-1, as gate_token does.
    float my_l = 0.f, my_s = 0.f;
    const int src = my_id & 31, src_slot = my_id >> 5;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const float l = __shfl_sync(kFullMask, lg[i], src);
      const float s = __shfl_sync(kFullMask, sc[i], src);
      if (i == src_slot) { my_l = l; my_s = s; }
    }
    float chosen_max = -INFINITY, chosen_sum = 0.f;
    for (int j = 0; j < k; ++j) {
      const float l = __shfl_sync(kFullMask, my_l, j);
      if (l > chosen_max) chosen_max = l;
    }
    const float my_term = topk_softmax ? moe_exp(my_l - chosen_max) : my_s;
    for (int j = 0; j < k; ++j) chosen_sum += __shfl_sync(kFullMask, my_term, j);
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
    if (gridDim.x == 1) {
      // gate_finalize_kernel's arithmetic for one partial row: lane 0 of the tree holds 0 + s
      score_sum[e] = lane_tree<1, float>(0, [&](int l) { return l == 0 ? 0.f + s : 0.f; });
      tokens_per_expert[e] = s_cnt[e];
    } else {
      psum[b * E + e] = s;
      pcnt[b * E + e] = s_cnt[e];
    }
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
                        float* lse, const GateWorkspace& w, float* score_sum, int* tokens_per_expert,
                        cudaStream_t stream) {
  gate_warp_kernel<NPL, In><<<blocks_for(p.num_tokens, kGateTokenBlock), kWarps * 32, 0, stream>>>(
      p, logits, bias, weights, ids, lse, static_cast<float*>(w.psum), w.pcnt, score_sum, tokens_per_expert);
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
        const auto launch = [&](auto npl) {
          return launch_warp<decltype(npl)::value>(p, lp, static_cast<const float*>(bias), static_cast<float*>(weights),
                                                   ids, static_cast<float*>(lse), w, static_cast<float*>(score_sum),
                                                   tokens_per_expert, stream);
        };
        cudaError_t err;
        if (p.num_experts <= 64) err = launch(std::integral_constant<int, 2>{});
        else if (p.num_experts <= 128) err = launch(std::integral_constant<int, 4>{});
        else if (p.num_experts <= 256) err = launch(std::integral_constant<int, 8>{});
        else err = launch(std::integral_constant<int, 16>{});
        if (err != cudaSuccess) return err;
        if (num_token_blocks(p) == 1) return cudaSuccess;  // the one block wrote the sums
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
