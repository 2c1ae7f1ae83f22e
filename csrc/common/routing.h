// Per-token routing logic written once for the CPU loops and the CUDA kernels.
//
// Nothing here includes torch: the header is compiled by g++ (csrc/cpu) and by nvcc (csrc/cuda), so
// both back ends rank experts, break ties and normalise weights with the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "exp_core.h"
#include "macros.h"

namespace moe_ext {

enum class ScoreFunc : int { kSoftmax = 0, kSigmoid = 1 };

// Where the softmax sits relative to the top-k selection (softmax scoring only).
//   kSoftmaxThenTopk: probabilities over all E experts, pick the k largest (Mixtral, Qwen, DeepSeek-V2).
//   kTopkThenSoftmax: pick the k largest logits, softmax over the k chosen (TE use_pre_softmax=False).
enum class GateOrder : int { kSoftmaxThenTopk = 0, kTopkThenSoftmax = 1 };

// Tokens per partial block of the per-expert sums (score_sum, tokens_per_expert): each block's sum
// runs over its tokens in order, then the blocks combine in fixed_order_sum order, on both back ends.
constexpr int64_t kGateTokenBlock = 16;

struct GatingParams {
  int64_t num_tokens;
  int num_experts;
  int k;
  ScoreFunc score;
  GateOrder order;
  bool renormalize;
  int num_groups;   // 1 = no group-limited routing
  int topk_groups;  // groups kept per token when num_groups > 1
  int group_top;    // a group scores the sum of its group_top best keys (2: DeepSeek-V3; 1, the max: V2)
  // Kept in double: fp64 routing must not see it rounded to float. Each use converts it to acc_t,
  // where the checks have made sure it is finite and > 0.
  double routed_scaling;
  bool has_bias;
};

// Renormalisation adds this to the denominator (DeepSeek-V3's 1e-20), converted to acc_t where used
// (fp64 routing gets 1e-20, not float's 1.00000001e-20): it changes no fp32 sum of probabilities,
// and keeps a token whose chosen sigmoid scores all underflow to 0 from dividing 0/0.
constexpr double kRenormEps = 1e-20;

// std::bit_cast for host and device (a memcpy of a register-sized value compiles to a move).
template <typename To, typename From>
MOE_HD To bit_cast_(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_ between types of one size");
  To y;
  __builtin_memcpy(&y, &x, sizeof y);
  return y;
}

// The total order used to rank experts: larger key first, NaN after every number, and among equal
// keys the lower expert id first. Every selection on both back ends goes through this one predicate,
// so ties and NaN logits resolve identically on CPU and GPU, and an id is always in range.
//
// rank_bits writes the key part of that order as an unsigned integer (a ranks before b iff its
// bits are larger, or equal with the lower id), so that a CUDA warp can rank by integer max/min
// reductions (redux.sync). NaN gets 0, after every number (-inf included); -0 gets the bits of +0,
// since the two compare equal. rank_value inverts it (NaN for 0, +0 for either zero).
template <typename T>
MOE_HD auto rank_bits(T x) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U kSign = U(1) << (8 * sizeof(U) - 1);
  U b = bit_cast_<U>(x);
  if (x != x) return U(0);
  if ((b & ~kSign) == 0) b = 0;  // -0 ranks as +0
  return (b & kSign) ? U(~b) : U(b | kSign);
}

MOE_HD float rank_value(uint32_t r) {
  if (r == 0) return NAN;
  return bit_cast_<float>((r >> 31) ? (r & 0x7fffffffu) : ~r);
}

template <typename T>
MOE_HD bool ranks_before(T a, int ia, T b, int ib) {
  const auto ra = rank_bits(a), rb = rank_bits(b);
  return ra != rb ? ra > rb : ia < ib;
}

// Routing maths runs in acc_t: float for fp32/fp16/bf16 inputs, double for fp64 (gradcheck).
//
// Bit-identical CPU and GPU routing: expert ids are picked by comparing scores, so both back ends
// must compute the same float for every score. libm's expf and CUDA's expf round differently, so the
// float exp is written here from + - * / and floor only (Cody-Waite reduction and the Cephes
// polynomial, about 1 ulp). This only holds without a*b+c contraction: the build compiles host code
// with -ffp-contract=off and the routing .cu files with --fmad=false (CMakeLists.txt).
MOE_HD float moe_pow2i(int n) {  // 2^n for n in [-126, 127]
  return bit_cast_<float>(static_cast<uint32_t>(n + 127) << 23);
}

// exp for x in [kExpLo, kExpHi] (below: 0, above: +inf).
constexpr float kExpHi = 88.72283935546875f;
constexpr float kExpLo = -103.972084045410156f;
MOE_HD float moe_exp_in_range(float x) {
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  const float y = exp_of_reduced(x, n);
  // two exact power-of-two steps keep 2^n representable; only the last product can round (subnormals)
  const int ni = static_cast<int>(n);
  const int n1 = ni / 2;
  return y * moe_pow2i(n1) * moe_pow2i(ni - n1);
}

MOE_HD float moe_exp(float x) {
#if defined(__CUDA_ARCH__)
  // Branch-free on the GPU: the special cases are selected after the arithmetic (done on an
  // in-range stand-in), so a warp's independent exps overlap instead of each sitting behind its own
  // branches. The CPU keeps the early returns, about 15% faster there; both give the same bits.
  const float v = moe_exp_in_range(x >= kExpLo && x <= kExpHi ? x : 0.f);
  return x != x ? x : (x > kExpHi ? INFINITY : (x < kExpLo ? 0.0f : v));
#else
  if (x != x) return x;
  if (x > kExpHi) return INFINITY;
  if (x < kExpLo) return 0.0f;
  return moe_exp_in_range(x);
#endif
}
MOE_HD double moe_exp(double x) { return exp(x); }
MOE_HD float moe_log(float x) { return logf(x); }
MOE_HD double moe_log(double x) { return log(x); }

// 1 / sigmoid(x). Split out so that a CUDA warp can take all its exps before the divisions (each
// division branches to a slow path, which would otherwise keep the exps apart).
template <typename T>
MOE_HD T sigmoid_denominator(T x) {
  return T(1) + moe_exp(-x);
}

template <typename T>
MOE_HD T sigmoid_(T x) {
  return T(1) / sigmoid_denominator(x);
}

// The score each expert gets before selection: softmax needs the row max and 1/sum(exp(x - max)).
template <typename T>
MOE_HD T score_of(ScoreFunc f, T logit, T row_max, T inv_sum) {
  return f == ScoreFunc::kSigmoid ? sigmoid_(logit) : moe_exp(logit - row_max) * inv_sum;
}

// The value experts are ranked by. kTopkThenSoftmax ranks raw logits (same order as probabilities,
// but no exp is needed); the selection bias (DeepSeek-V3 e_score_correction_bias) is added here only.
template <typename T>
MOE_HD T selection_key(const GatingParams& p, T logit, T score, T bias) {
  const T base =
      (p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax) ? logit : score;
  return base + bias;
}

// Share of chosen slot j before routed_scaling (weight = share * routed_scaling), given the chosen
// expert's logit and score. chosen_sum is the sum of chosen scores (renormalisation), and for
// kTopkThenSoftmax the softmax denominator over the chosen logits, taken relative to chosen_max.
template <typename T>
MOE_HD T slot_share(const GatingParams& p, T logit, T score, T chosen_max, T chosen_sum) {
  if (p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax)
    return moe_exp(logit - chosen_max) / chosen_sum;
  return p.renormalize ? score / (chosen_sum + T(kRenormEps)) : score;
}

template <typename T>
MOE_HD T slot_weight(const GatingParams& p, T logit, T score, T chosen_max, T chosen_sum) {
  return slot_share(p, logit, score, chosen_max, chosen_sum) * T(p.routed_scaling);
}

// Gradient of the loss w.r.t. the score (kSoftmaxThenTopk, sigmoid) or logit (kTopkThenSoftmax) of
// chosen slot j. It takes the shares u (w = s * u) and the weight gradients already times s
// (gs_j = s * g_j), gs_dot_u = sum_i gs_i * u_i over the chosen slots: recovering u as w / s would
// be NaN or inf where w or s is 0 or inf in acc_t (extreme scalings, underflowed weights).
//   renormalised:  u_j = x_j / Z        -> dx_j = (gs_j - gs_dot_u) / Z
//   plain:         u_j = x_j            -> dx_j = gs_j
//   topk->softmax: u_j = softmax(l)_j   -> dl_j = u_j * (gs_j - gs_dot_u)
template <typename T>
MOE_HD T chosen_grad(const GatingParams& p, T gs, T u, T chosen_sum, T gs_dot_u) {
  if (p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax) return u * (gs - gs_dot_u);
  if (p.renormalize) return (gs - gs_dot_u) / (chosen_sum + T(kRenormEps));
  return gs;
}

// d logit from d score for one expert: softmax couples the row through dot = sum_e p_e * dscore_e.
template <typename T>
MOE_HD T score_backward(ScoreFunc f, T score, T dscore, T dot) {
  return f == ScoreFunc::kSigmoid ? dscore * score * (T(1) - score) : score * (dscore - dot);
}

// ---- One token's gating, forward and backward. ----
// The CPU kernel calls these per token; a CUDA thread can call them as they are, and the
// warp-parallel CUDA kernel reuses every helper above, so all back ends share this arithmetic.

// The one summation order of every per-expert (or per-block) float sum, chosen so that a CUDA warp
// reproduces it exactly: element i goes to lane i % 32 (each lane sums its elements in increasing i,
// from 0), then the 32 lane sums combine as a warp's xor-butterfly does (lane l with lane l + 16,
// then + 8, ... + 1). lane_tree<1> is that butterfly written as a compile-time recursion (no array,
// so no local memory when a CUDA thread calls it).
constexpr int kSumLanes = 32;

template <int Stride, typename T, typename LaneSum>
MOE_HD T lane_tree(int lane, const LaneSum& lane_sum) {
  if constexpr (Stride == kSumLanes) {
    return lane_sum(lane);
  } else {
    return lane_tree<2 * Stride, T>(lane, lane_sum) + lane_tree<2 * Stride, T>(lane + Stride, lane_sum);
  }
}

template <typename T, typename ValAt>
MOE_HD T fixed_order_sum(int64_t n, const ValAt& val_at) {
  return lane_tree<1, T>(0, [&](int lane) {
    T s = T(0);
    for (int64_t i = lane; i < n; i += kSumLanes) s += val_at(i);
    return s;
  });
}

// any_nan (optional): whether the row holds a NaN, which row_logsumexp needs.
template <typename T, typename In>
MOE_HD void row_softmax_stats(const In* logits, int E, T* row_max, T* sum, bool* any_nan = nullptr) {
  T m = T(-INFINITY);
  bool nan = false;
  for (int e = 0; e < E; ++e) {
    const T l = T(logits[e]);
    if (l > m) m = l;  // NaN never compares greater: a NaN row keeps m finite where it can
    nan = nan || l != l;
  }
  *row_max = m;
  *sum = fixed_order_sum<T>(E, [&](int64_t e) { return moe_exp(T(logits[e]) - m); });
  if (any_nan) *any_nan = nan;
}

// The row's logsumexp with torch.logsumexp's special values. An infinite max is the answer (all
// -inf: -inf, a +inf: +inf) because sum = sum exp(x - max) is NaN there (inf - inf); a NaN anywhere
// makes it NaN, which m + log(sum) alone would miss when the max is infinite. any_nan is read only
// when the max is infinite (with a finite max a NaN already makes the sum NaN).
template <typename T>
MOE_HD T row_logsumexp(T row_max, T sum, bool any_nan) {
  if (any_nan) return T(NAN);
  if (row_max == T(INFINITY) || row_max == T(-INFINITY)) return row_max;
  return row_max + moe_log(sum);
}

// A group's score: the sum of the `top` (1 or 2) best selection keys among experts [first, last), ranked
// with the shared order (the best key alone if the group holds one expert).
template <typename T, typename KeyAt>
MOE_HD T group_score(int first, int last, int top, const KeyAt& key_at) {
  int i1 = -1, i2 = -1;
  T v1 = T(0), v2 = T(0);
  for (int e = first; e < last; ++e) {
    const T key = key_at(e);
    if (i1 < 0 || ranks_before(key, e, v1, i1)) {
      i2 = i1; v2 = v1; i1 = e; v1 = key;
    } else if (i2 < 0 || ranks_before(key, e, v2, i2)) {
      i2 = e; v2 = key;
    }
  }
  return i2 < 0 || top == 1 ? v1 : v1 + v2;
}

// Group-limited routing: a group's score is the sum of its two best selection keys (DeepSeek-V3) or its
// best key (p.group_top = 1: DeepSeek-V2); the topk_groups best groups stay eligible. Returns a bit mask
// of the kept groups (num_groups <= 64).
template <typename T, typename In>
MOE_HD uint64_t select_groups(const GatingParams& p, const In* logits, const T* score, const T* bias,
                              T* group_scratch = nullptr) {
  if (p.num_groups <= 1) return ~uint64_t(0);
  const int gsize = p.num_experts / p.num_groups;
  auto gscore = [&](int g) {
    return group_score<T>(g * gsize, (g + 1) * gsize, p.group_top, [&](int e) {
      return selection_key(p, T(logits[e]), score[e], bias ? bias[e] : T(0));
    });
  };
  // With scratch (the CPU) each group is scored once; without (a CUDA thread, which must not spill an
  // array to local memory) it is rescored each round. Same values, same choice.
  if (group_scratch)
    for (int g = 0; g < p.num_groups; ++g) group_scratch[g] = gscore(g);
  uint64_t kept = 0;
  for (int r = 0; r < p.topk_groups; ++r) {
    int best = -1;
    T best_val = T(0);
    for (int g = 0; g < p.num_groups; ++g) {
      if (kept >> g & 1) continue;
      const T gval = group_scratch ? group_scratch[g] : gscore(g);
      if (best < 0 || ranks_before(gval, g, best_val, best)) {
        best = g;
        best_val = gval;
      }
    }
    kept |= uint64_t(1) << best;
  }
  return kept;
}

// Forward for one token. score: scratch of E, filled with the full scores (softmax or sigmoid)
// that the load-balancing loss sums. Writes k ids (best first), k weights and the row logsumexp.
// group_scratch: optional room for num_groups values (saves rescoring groups; results unchanged).
template <typename T, typename In>
MOE_HD void gate_token(const GatingParams& p, const In* logits, const T* bias, T* score, int* ids,
                       T* weights, T* lse, T* group_scratch = nullptr) {
  const int E = p.num_experts;
  T m, sum;
  bool any_nan;
  row_softmax_stats(logits, E, &m, &sum, &any_nan);
  *lse = row_logsumexp(m, sum, any_nan);
  const T inv_sum = T(1) / sum;
  for (int e = 0; e < E; ++e) score[e] = score_of(p.score, T(logits[e]), m, inv_sum);

  const uint64_t groups = select_groups(p, logits, score, bias, group_scratch);
  const int gsize = p.num_experts / (p.num_groups > 1 ? p.num_groups : 1);
  // One pass keeping the k best so far sorted (insertion), their keys parked in `weights` until the
  // weights are computed below: O(E) comparisons for most experts instead of k passes over E.
  // ranks_before is a total order, so the k chosen and their order are unique.
  T* keys = weights;
  int n = 0;
  for (int e = 0; e < E; ++e) {
    if (!(groups >> (e / gsize) & 1)) continue;
    const T key = selection_key(p, T(logits[e]), score[e], bias ? bias[e] : T(0));
    if (n == p.k && !ranks_before(key, e, keys[n - 1], ids[n - 1])) continue;
    int pos = n < p.k ? n++ : n - 1;
    for (; pos > 0 && ranks_before(key, e, keys[pos - 1], ids[pos - 1]); --pos) {
      keys[pos] = keys[pos - 1];
      ids[pos] = ids[pos - 1];
    }
    keys[pos] = key;
    ids[pos] = e;
  }

  T chosen_max = T(-INFINITY), chosen_sum = T(0);
  const bool topk_softmax = p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax;
  if (topk_softmax) {
    for (int j = 0; j < p.k; ++j) {
      const T l = T(logits[ids[j]]);
      if (l > chosen_max) chosen_max = l;
    }
    for (int j = 0; j < p.k; ++j) chosen_sum += moe_exp(T(logits[ids[j]]) - chosen_max);
  } else {
    for (int j = 0; j < p.k; ++j) chosen_sum += score[ids[j]];
  }
  for (int j = 0; j < p.k; ++j)
    weights[j] = slot_weight(p, T(logits[ids[j]]), score[ids[j]], chosen_max, chosen_sum);
}

// Backward for one token: d logits from d weights[k], d prob_sum[E] (grad_score_sum, may be null:
// it reaches every token's full scores) and d logsumexp (0 when absent). dscore: scratch of E.
// A zero grad_lse adds nothing, not 0 * prob: prob is NaN on a row with an infinite logit, whose
// sigmoid routing and its gradient are otherwise finite.
template <typename T, typename In, typename Out>
MOE_HD void gate_token_backward(const GatingParams& p, const In* logits, const int* ids,
                                const T* grad_w, const T* grad_score_sum, T grad_lse, T* dscore,
                                Out* grad_logits) {
  const int E = p.num_experts;
  T m, sum;
  row_softmax_stats(logits, E, &m, &sum);
  const T inv_sum = T(1) / sum;
  const bool topk_softmax = p.score == ScoreFunc::kSoftmax && p.order == GateOrder::kTopkThenSoftmax;

  T chosen_max = T(-INFINITY), chosen_sum = T(0);
  for (int j = 0; j < p.k; ++j) {
    const T l = T(logits[ids[j]]);
    if (l > chosen_max) chosen_max = l;
  }
  for (int j = 0; j < p.k; ++j) {
    const T l = T(logits[ids[j]]);
    chosen_sum += topk_softmax ? moe_exp(l - chosen_max) : score_of(p.score, l, m, inv_sum);
  }
  const T s = T(p.routed_scaling);
  T gs_dot_u = T(0);
  for (int j = 0; j < p.k; ++j) {
    const T l = T(logits[ids[j]]);
    gs_dot_u += grad_w[j] * s * slot_share(p, l, score_of(p.score, l, m, inv_sum), chosen_max, chosen_sum);
  }

  for (int e = 0; e < E; ++e) dscore[e] = grad_score_sum ? grad_score_sum[e] : T(0);
  for (int j = 0; j < p.k; ++j) {
    if (topk_softmax) continue;  // these slots differentiate the logits directly, below
    const T l = T(logits[ids[j]]);
    const T u = slot_share(p, l, score_of(p.score, l, m, inv_sum), chosen_max, chosen_sum);
    dscore[ids[j]] += chosen_grad(p, grad_w[j] * s, u, chosen_sum, gs_dot_u);
  }
  T dot = T(0);
  if (p.score == ScoreFunc::kSoftmax)
    dot = fixed_order_sum<T>(E, [&](int64_t e) { return score_of(p.score, T(logits[e]), m, inv_sum) * dscore[e]; });

  for (int e = 0; e < E; ++e) {
    const T l = T(logits[e]);
    T g = score_backward(p.score, score_of(p.score, l, m, inv_sum), dscore[e], dot);
    if (grad_lse != T(0)) g += grad_lse * (moe_exp(l - m) * inv_sum);  // d lse / d l = softmax
    if (topk_softmax) {
      for (int j = 0; j < p.k; ++j) {
        if (ids[j] != e) continue;
        const T u = slot_share(p, l, T(0), chosen_max, chosen_sum);
        g += chosen_grad(p, grad_w[j] * s, u, chosen_sum, gs_dot_u);
      }
    }
    grad_logits[e] = Out(g);
  }
}

// ---- Slot and row index maths shared by permute, unpermute and capacity dropping. ----
// A slot is (token t, choice j), flattened as s = t * k + j; rows of x_sorted are grouped by expert
// and, within an expert, ordered by s (stable). Offsets past max_rows are clamped: a slot whose row
// would land at or past max_rows is dropped (row -1), never written out of bounds.
MOE_HD int64_t clamp_row(int64_t row, int64_t max_rows) { return row < max_rows ? row : -1; }

MOE_HD bool valid_expert(int64_t e, int64_t num_experts) { return e >= 0 && e < num_experts; }

// Capacity with rerouting (token choice, overflow="reroute"): slots are visited in priority order
// (every token's first choice, then every second choice, ...; lower token first). A slot whose expert
// still has room keeps it; otherwise it moves to the best-ranked expert (by keys[t, :], ranks_before)
// that has room and that the token does not hold, or is dropped (-1) when none has room. Inherently
// sequential: the CPU kernel runs this function; the CUDA kernel (cuda/capacity.cu) makes the same
// decisions in the same order with one warp, the search over E split across its lanes. load: E zeroed ints.
template <typename index_t, typename key_t>
MOE_HD void reroute_capacity(index_t* ids, const key_t* keys, int64_t T, int64_t k, int64_t E,
                             int64_t capacity, int* load) {
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t t = 0; t < T; ++t) {
      index_t* row = ids + t * k;
      const int64_t e = row[j];
      if (!valid_expert(e, E)) {
        row[j] = -1;
        continue;
      }
      if (load[e] < capacity) {
        ++load[e];
        continue;
      }
      int64_t best = -1;
      for (int64_t a = 0; a < E; ++a) {
        if (load[a] >= capacity) continue;
        bool held = false;
        for (int64_t i = 0; i < k; ++i) held = held || row[i] == a;
        if (held) continue;
        if (best < 0 || ranks_before(float(keys[t * E + a]), int(a), float(keys[t * E + best]), int(best))) best = a;
      }
      row[j] = static_cast<index_t>(best);
      if (best >= 0) ++load[best];
    }
  }
}

}  // namespace moe_ext
