// CPU grouped GEMM: one BLAS call per non-empty expert on row slices of a (oneDNN/MKL do the
// blocking and threading), written straight into the output. Rows outside [offsets[0], offsets[E])
// are zero; experts with no rows get a zero weight gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <functional>

#include "../common/checks.h"
#include "memory.h"

namespace moe_ext {
namespace {

// Experts with few rows each (fine-grained MoE: Qwen3, DeepSeek) spend their time in per-call
// overhead, and one BLAS call cannot use all threads: there, run experts side by side, each call
// single-threaded (at::parallel_for disables nested parallelism). Large experts keep one
// multi-threaded call each. Either way each expert's output is computed by one call: deterministic.
constexpr int64_t kSmallExpertRows = 256;

void for_each_expert(const int64_t* o, int64_t E, const std::function<void(int64_t)>& fn) {
  const int64_t rows = o[E] - o[0];
  if (E > 1 && rows < kSmallExpertRows * E) {
    // The BLAS calls dispatch through ATen: worker threads need the caller's dispatch state (below
    // autograd, inference mode, ...), which OpenMP threads do not inherit.
    const at::ThreadLocalState state;
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t e = e0; e < e1; ++e) fn(e);
    });
  } else {
    for (int64_t e = 0; e < E; ++e) fn(e);
  }
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                            bool trans_b, const std::optional<at::Tensor>& bias) {
  check_grouped_gemm(a, b, expert_offsets, trans_b, bias);
  const int64_t M = a.size(0), E = b.size(0);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  auto c = empty_output({M, N}, a.options());
  const auto offs = expert_offsets.contiguous();
  const int64_t* o = offs.data_ptr<int64_t>();
  if (o[0] > 0) c.narrow(0, 0, o[0]).zero_();
  if (o[E] < M) c.narrow(0, o[E], M - o[E]).zero_();
  for_each_expert(o, E, [&](int64_t e) {
    const int64_t rows = o[e + 1] - o[e];
    if (rows == 0) return;
    auto out = c.narrow(0, o[e], rows);
    const auto be = trans_b ? b[e].t() : b[e];
    if (bias.has_value()) {
      at::addmm_out(out, (*bias)[e], a.narrow(0, o[e], rows), be);
    } else {
      at::mm_out(out, a.narrow(0, o[e], rows), be);
    }
  });
  return c;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& expert_offsets) {
  check_grouped_gemm_wgrad(x, y, expert_offsets);
  const int64_t E = expert_offsets.size(0) - 1;
  auto out = empty_output({E, x.size(1), y.size(1)}, x.options());
  const auto offs = expert_offsets.contiguous();
  const int64_t* o = offs.data_ptr<int64_t>();
  for_each_expert(o, E, [&](int64_t e) {
    auto oe = out[e];
    const int64_t rows = o[e + 1] - o[e];
    if (rows == 0) {
      oe.zero_();
      return;
    }
    at::mm_out(oe, x.narrow(0, o[e], rows).t(), y.narrow(0, o[e], rows));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}

}  // namespace moe_ext
