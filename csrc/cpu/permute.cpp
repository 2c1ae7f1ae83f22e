// CPU kernels of permute, unpermute and unpermute's backward.
//
// permute is a stable counting sort of the T*k slots by expert (rows of one expert keep slot order,
// i.e. token order), then a parallel row copy. unpermute gathers each token's k rows in slot order and
// accumulates in fp32 (fp64 for fp64): a fixed order, so results are bit-reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "../common/routing.h"
#include "memory.h"

namespace moe_ext {
namespace {

template <typename index_t>
void route_slots(const index_t* ids, int64_t slots, int64_t E, int64_t max_rows, int64_t* offsets,
                 int64_t* row_map) {
  std::vector<int64_t> cursor(E + 1, 0);
  for (int64_t s = 0; s < slots; ++s)
    if (valid_expert(ids[s], E)) cursor[ids[s] + 1] += 1;
  for (int64_t e = 0; e < E; ++e) cursor[e + 1] += cursor[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = cursor[e] < max_rows ? cursor[e] : max_rows;
  for (int64_t s = 0; s < slots; ++s)
    row_map[s] = valid_expert(ids[s], E) ? clamp_row(cursor[ids[s]]++, max_rows) : -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                           int64_t num_experts, int64_t max_rows) {
  const int64_t R = check_permute(x_in, ids_in, num_experts, max_rows);
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = x.size(0), H = x.size(1), k = ids.size(1);
  auto offsets = at::empty({num_experts + 1}, x.options().dtype(at::kLong));
  auto row_map = at::empty({T, k}, x.options().dtype(at::kLong));
  if (ids.scalar_type() == at::kInt) {
    route_slots(ids.data_ptr<int32_t>(), T * k, num_experts, R, offsets.data_ptr<int64_t>(),
                row_map.data_ptr<int64_t>());
  } else {
    route_slots(ids.data_ptr<int64_t>(), T * k, num_experts, R, offsets.data_ptr<int64_t>(),
                row_map.data_ptr<int64_t>());
  }
  auto x_sorted = empty_output({R, H}, x.options());
  const int64_t kept = offsets.data_ptr<int64_t>()[num_experts];
  const int64_t* rm = row_map.data_ptr<int64_t>();
  const size_t row_bytes = H * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (rm[t * k + j] >= 0) std::memcpy(dst + rm[t * k + j] * row_bytes, src + t * row_bytes, row_bytes);
  });
  // Rows past the kept count are the static upper bound's slack: zero, so they feed nothing.
  if (kept < R) x_sorted.narrow(0, kept, R - kept).zero_();
  return {x_sorted, offsets, row_map};
}

at::Tensor unpermute_cpu(const at::Tensor& ys_in, const at::Tensor& row_map_in,
                         const std::optional<at::Tensor>& weights_in) {
  check_unpermute("unpermute", ys_in, row_map_in, weights_in);
  const auto ys = ys_in.contiguous();
  const auto rm_t = row_map_in.contiguous();
  const int64_t T = rm_t.size(0), k = rm_t.size(1), H = ys.size(1);
  auto y = empty_output({T, H}, ys.options());
  MOE_DISPATCH_FLOAT_TYPES(ys.scalar_type(), "unpermute", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor w = weights_in ? weights_in->to(sizeof(acc) == 8 ? at::kDouble : at::kFloat).contiguous()
                                    : at::Tensor();
    const acc* wp = w.defined() ? w.data_ptr<acc>() : nullptr;
    const scalar_t* src = ys.data_ptr<scalar_t>();
    const int64_t* rm = rm_t.data_ptr<int64_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<acc> sum(H);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(sum.begin(), sum.end(), acc(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = rm[t * k + j];
          if (row < 0) continue;
          const acc wj = wp ? wp[t * k + j] : acc(1);
          const scalar_t* r = src + row * H;
          for (int64_t h = 0; h < H; ++h) sum[h] += wj * acc(r[h]);
        }
        for (int64_t h = 0; h < H; ++h) out[t * H + h] = scalar_t(sum[h]);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& ys_in,
                                                          const at::Tensor& row_map_in,
                                                          const std::optional<at::Tensor>& weights_in) {
  check_unpermute_backward(grad_y_in, ys_in, row_map_in, weights_in);
  const auto gy = grad_y_in.to(ys_in.scalar_type()).contiguous();
  const auto ys = ys_in.contiguous();
  const auto rm_t = row_map_in.contiguous();
  const int64_t T = rm_t.size(0), k = rm_t.size(1), H = ys.size(1), R = ys.size(0);
  auto grad_ys = empty_output({R, H}, ys.options()).zero_();
  auto grad_w = weights_in ? at::empty({T, k}, weights_in->options()) : at::empty({0}, ys.options());
  MOE_DISPATCH_FLOAT_TYPES(ys.scalar_type(), "unpermute_backward", [&] {
    using acc = acc_t<scalar_t>;
    const auto acc_dtype = sizeof(acc) == 8 ? at::kDouble : at::kFloat;
    const at::Tensor w = weights_in ? weights_in->to(acc_dtype).contiguous() : at::Tensor();
    at::Tensor gw = weights_in ? at::empty({T, k}, ys.options().dtype(acc_dtype)) : at::Tensor();
    const acc* wp = w.defined() ? w.data_ptr<acc>() : nullptr;
    acc* gwp = gw.defined() ? gw.data_ptr<acc>() : nullptr;
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* ysp = ys.data_ptr<scalar_t>();
    const int64_t* rm = rm_t.data_ptr<int64_t>();
    scalar_t* out = grad_ys.data_ptr<scalar_t>();
    // Each row is referenced by at most one slot, so the scatter below is race-free.
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t row = rm[t * k + j];
          acc dot = 0;
          if (row >= 0) {
            const acc wj = wp ? wp[t * k + j] : acc(1);
            for (int64_t h = 0; h < H; ++h) {
              const acc g = acc(gyp[t * H + h]);
              out[row * H + h] = scalar_t(wj * g);
              dot += g * acc(ysp[row * H + h]);
            }
          }
          if (gwp) gwp[t * k + j] = dot;
        }
      }
    });
    if (gw.defined()) grad_w.copy_(gw);
  });
  return {grad_ys, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moe_ext
