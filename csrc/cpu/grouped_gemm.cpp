// CPU grouped GEMM: one BLAS call per non-empty expert on row slices of a (oneDNN/MKL do the
// blocking and threading), written straight into the output. Rows outside [offsets[0], offsets[E])
// are zero; experts with no rows get a zero weight gradient.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace moe_ext {
namespace {

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                            bool trans_b, const std::optional<at::Tensor>& bias) {
  check_grouped_gemm(a, b, expert_offsets, trans_b, bias);
  const int64_t M = a.size(0), E = b.size(0);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  auto c = at::empty({M, N}, a.options());
  const auto offs = expert_offsets.contiguous();
  const int64_t* o = offs.data_ptr<int64_t>();
  if (o[0] > 0) c.narrow(0, 0, o[0]).zero_();
  if (o[E] < M) c.narrow(0, o[E], M - o[E]).zero_();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = o[e + 1] - o[e];
    if (rows == 0) continue;
    auto out = c.narrow(0, o[e], rows);
    const auto be = trans_b ? b[e].t() : b[e];
    if (bias.has_value()) {
      at::addmm_out(out, (*bias)[e], a.narrow(0, o[e], rows), be);
    } else {
      at::mm_out(out, a.narrow(0, o[e], rows), be);
    }
  }
  return c;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& expert_offsets) {
  check_grouped_gemm_wgrad(x, y, expert_offsets);
  const int64_t E = expert_offsets.size(0) - 1;
  auto out = at::empty({E, x.size(1), y.size(1)}, x.options());
  const auto offs = expert_offsets.contiguous();
  const int64_t* o = offs.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = o[e + 1] - o[e];
    if (rows == 0) {
      out[e].zero_();
      continue;
    }
    auto oe = out[e];
    at::mm_out(oe, x.narrow(0, o[e], rows).t(), y.narrow(0, o[e], rows));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}

}  // namespace moe_ext
