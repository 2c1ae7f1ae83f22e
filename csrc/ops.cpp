// Every op schema of moe_ext, and the Python extension module that loads them.
//
// The kernels register themselves per back end (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cpp for CUDA), the
// autograd rules at the Autograd key (csrc/autograd.cpp), the fake kernels in moe_ext/_ops.py;
// shapes, dtypes and semantics are documented in docs/ops.md and in moe_ext/functional.py.
#include <torch/library.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/build_config.h"
#include "common/gemm_tile.h"
#include "cpu/memory.h"

TORCH_LIBRARY(moe_ext, m) {
  m.def(
      "topk_gating(Tensor logits, int k, str score_func=\"softmax\", str order=\"softmax_topk\", "
      "bool renormalize=True, Tensor? expert_bias=None, int num_groups=1, int topk_groups=1, "
      "float routed_scaling=1.0, str group_score=\"top2_sum\") -> (Tensor weights, Tensor expert_ids, "
      "Tensor tokens_per_expert, Tensor score_sum, Tensor lse)");
  m.def(
      "topk_gating_backward(Tensor grad_weights, Tensor? grad_score_sum, Tensor? grad_lse, "
      "Tensor logits, Tensor expert_ids, str score_func, str order, bool renormalize, "
      "float routed_scaling) -> Tensor");
  m.def(
      "permute(Tensor x, Tensor expert_ids, int num_experts, int max_rows=-1) "
      "-> (Tensor x_sorted, Tensor expert_offsets, Tensor row_map)");
  m.def("unpermute(Tensor y_sorted, Tensor row_map, Tensor? weights=None) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor y_sorted, Tensor row_map, Tensor? weights) "
      "-> (Tensor grad_y_sorted, Tensor grad_weights)");
  m.def(
      "grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, bool trans_b=False, "
      "Tensor? bias=None) -> Tensor");
  m.def("grouped_gemm_wgrad(Tensor x, Tensor y, Tensor expert_offsets) -> Tensor");
  m.def("gated_activation(Tensor h, str activation=\"silu\") -> Tensor");
  m.def("gated_activation_backward(Tensor grad, Tensor h, str activation=\"silu\") -> Tensor");
  m.def("capacity_reroute(Tensor expert_ids, Tensor keys, int capacity) -> Tensor");
}

namespace py = pybind11;

namespace {
// A bad tile name (argument or MOE_EXT_SM90_TILE) raises c10::ValueError, which pybind11 turns into
// RuntimeError under some torch versions (2.11): rethrown as Python's ValueError on all of them.
template <typename F>
auto value_errors_as_python(F f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    throw py::value_error(e.what_without_backtrace());
  }
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_ext native module: loading it registers the torch.ops.moe_ext operators.";
  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = MOE_EXT_WITH_CUDA != 0;
    info["cuda_archs"] = moe_ext::build_cuda_archs();
    info["cuda_version"] = std::string(MOE_EXT_CUDA_VERSION);
    info["cutlass"] = MOE_EXT_WITH_CUTLASS ? py::object(py::str(MOE_EXT_CUTLASS_VERSION)) : py::none();
    info["torch"] = std::string(MOE_EXT_TORCH_VERSION);
    info["cxx"] = std::string(MOE_EXT_CXX);
    info["cuda_host_cxx"] = std::string(MOE_EXT_CUDA_HOST_CXX);
    py::dict gemm;  // which CUDA grouped GEMM kernel families are in (docs/grouped_gemm.md)
    gemm["sm80"] = MOE_EXT_GEMM_SM80 != 0;
    gemm["sm90"] = MOE_EXT_GEMM_SM90 != 0;
    gemm["fp16"] = MOE_EXT_GEMM_FP16 != 0;
    gemm["tf32_sm80"] = MOE_EXT_GEMM_TF32_SM80 != 0;
    gemm["tf32_sm90"] = MOE_EXT_GEMM_TF32_SM90 != 0;
    gemm["f32_sm80"] = MOE_EXT_GEMM_F32_SM80 != 0;
    gemm["f32_sm90"] = MOE_EXT_GEMM_F32_SM90 != 0;
    info["grouped_gemm"] = gemm;
    return info;
  }, "How this build of moe_ext was compiled: CUDA on/off, archs, CUTLASS version, torch version, "
     "C++ compiler, grouped GEMM kernel families.");
  m.def("cpu_cache_stats", [] {
    const auto s = moe_ext::cpu_cache_stats();
    py::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["limit_bytes"] = s.limit_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  }, "The CPU large-block cache (csrc/cpu/memory.h): cached_bytes, limit_bytes, hits, misses.");
  m.def("empty_cpu_cache", &moe_ext::empty_cpu_cache, "Free the CPU large-block cache's idle blocks.");
  m.def("sm90_gemm_tile", [] {
    return value_errors_as_python([] { return std::string(moe_ext::gemm_tile_name(moe_ext::sm90_gemm_tile())); });
  }, "The sm_90a grouped GEMM tile setting: 'auto', '128x128' or '128x256'.");
  m.def("set_sm90_gemm_tile", [](const std::string& tile) {
    value_errors_as_python([&] {
      moe_ext::set_sm90_gemm_tile(moe_ext::parse_gemm_tile(tile, "the sm_90a grouped GEMM tile"));
    });
  }, "Set the sm_90a grouped GEMM tile: 'auto', '128x128' or '128x256'.");
  m.def("last_grouped_gemm_kernel", [] { return std::string(moe_ext::last_grouped_gemm_kernel()); },
        "The CUDA grouped GEMM kernel this thread launched last, e.g. 'sm90_bf16_nn_t256' or 'simt'.");
}
