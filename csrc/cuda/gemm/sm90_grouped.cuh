// CUTLASS 3.x grouped GEMM for sm_90a: pointer-array problems (GroupProblemShape), TMA loads with
// per-group tensor maps patched on the device, warp-specialised cooperative persistent kernel (two
// consumer warp groups on one 128xN tile, one producer warp group), wgmma (HGMMA) on bf16/fp16 with
// fp32 accumulation. Problem shapes live only on the device (host_problem_shapes = nullptr), so the
// grid is the persistent one (SM count) and the tile scheduler walks the groups on the device.
// Two tile configurations (Sm90Tile128 and Sm90Tile256 below; the host picks one per call, see
// grouped_gemm_cuda.cpp). Included by exactly one .cu per (dtype, layout, tile); see
// MOE_EXT_SM90_GROUPED_GEMM at the bottom.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"

#include "grouped_gemm_launch.h"
#include "workspace.cuh"

namespace moe_ext {
namespace gemm {

// 128x128x64 with a 1x2 cluster (the A tile multicast to the 2 CTAs along N): many small tiles, for
// experts with few rows (decode, many-expert models such as Qwen3 with ~256 rows per expert).
struct Sm90Tile128 {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
};
// 128x256x64 with a 2x1 cluster (the B tile, i.e. the expert's weights, multicast to the 2 CTAs along
// M): 1.5x the arithmetic intensity of the 128x128 tile (85 vs 64 FLOP per byte of shared memory
// filled), for experts with >= ~1024 rows (Mixtral-sized layers at training batch sizes).
struct Sm90Tile256 {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
};

template <typename Element, Form kForm, class Tile>
struct Sm90Grouped {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  // CUTLASS 3 convention: A is (M,K), B is (N,K). fwd NN: B = b[e] [K,N] is N-major (RowMajor tag);
  // fwd NT: b[e] [N,K] is K-major (ColumnMajor tag); wgrad: A = x_e^T is M-major (ColumnMajor tag),
  // B = y_e [m,Q] is N-major. wgmma reads MN-major 16-bit operands from shared memory directly.
  using LayoutA = std::conditional_t<kForm == Form::kWgradTN, ColumnMajor, RowMajor>;
  using LayoutB = std::conditional_t<kForm == Form::kFwdNT, ColumnMajor, RowMajor>;
  using LayoutC = RowMajor;
  static constexpr int kAlignment = 8;  // TMA: 16-byte aligned rows and bases

  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M,N,K) per group
  using TileShape = typename Tile::TileShape;
  using ClusterShape = typename Tile::ClusterShape;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, LayoutC*, kAlignment, Element, LayoutC*, kAlignment, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideC = typename GemmKernel::InternalStrideC;
  using StrideD = typename GemmKernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;

  struct Arrays {
    Shape* problems;
    const Element** ptr_a;
    const Element** ptr_b;
    const Element** ptr_c;
    Element** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideC* stride_c;
    StrideD* stride_d;
    void* cutlass_workspace;
  };

  static typename Gemm::Arguments arguments(const GroupedGemmArgs& g, const Arrays& arr) {
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = ProblemShape{int(g.num_experts), arr.problems, /*host_problem_shapes=*/nullptr};
    args.mainloop = {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b};
    args.epilogue.ptr_C = arr.ptr_c;
    args.epilogue.dC = arr.stride_c;
    args.epilogue.ptr_D = arr.ptr_d;
    args.epilogue.dD = arr.stride_d;
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = g.accumulate ? 1.0f : 0.0f;  // beta = 0: C is never read
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
    fusion.alpha_ptr_array = nullptr;
    fusion.beta_ptr_array = nullptr;
    args.hw_info.device_id = g.device;
    args.hw_info.sm_count = g.sm_count;
    return args;
  }

  // Arrays first, then CUTLASS's own workspace (tensor maps per SM; depends on E and the SM count only).
  static size_t carve(void* base, const GroupedGemmArgs& g, Arrays* out) {
    const int64_t E = g.num_experts;
    WorkspaceCarver w(base);
    Arrays a;
    a.problems = w.take<Shape>(E);
    a.ptr_a = w.take<const Element*>(E);
    a.ptr_b = w.take<const Element*>(E);
    a.ptr_c = w.take<const Element*>(E);
    a.ptr_d = w.take<Element*>(E);
    a.stride_a = w.take<StrideA>(E);
    a.stride_b = w.take<StrideB>(E);
    a.stride_c = w.take<StrideC>(E);
    a.stride_d = w.take<StrideD>(E);
    a.cutlass_workspace = w.take_bytes(Gemm::get_workspace_size(arguments(g, a)));
    if (out) *out = a;
    return w.size();
  }
};

// A packed stride whose one dynamic mode (the leading dimension) is `ld`.
template <class Stride>
__device__ __forceinline__ Stride ld_stride(int64_t ld) {
  Stride s{};
  if constexpr (std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(cute::get<0>(s))>>, int64_t>) {
    cute::get<0>(s) = ld;
  } else {
    cute::get<1>(s) = ld;
  }
  return s;
}

// One thread per expert: problem shape, pointers and strides from the offsets.
template <typename Element, Form kForm, class Tile>
__global__ void sm90_build_args_kernel(GroupedGemmArgs g, typename Sm90Grouped<Element, kForm, Tile>::Arrays arr) {
  using T = Sm90Grouped<Element, kForm, Tile>;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= g.num_experts) return;
  const ExpertRows r = expert_rows(g.offsets, e, g.rows);
  const auto* a = static_cast<const Element*>(g.a);
  const auto* b = static_cast<const Element*>(g.b);
  auto* c = static_cast<Element*>(g.c);
  const int m = int(r.count);
  if constexpr (kForm == Form::kWgradTN) {
    const int64_t P = g.dim_in, Q = g.dim_out;
    // k = 0 problems are mishandled by CUTLASS (cutlass PR #1593): an empty expert gets a 0x0x0
    // problem (no tiles) and grouped_gemm_zero_empty_experts writes its zeros.
    arr.problems[e] = m > 0 ? cute::make_shape(int(P), int(Q), m) : cute::make_shape(0, 0, 0);
    arr.ptr_a[e] = a + r.begin * P;
    arr.stride_a[e] = ld_stride<typename T::StrideA>(P);
    arr.ptr_b[e] = b + r.begin * Q;
    arr.stride_b[e] = ld_stride<typename T::StrideB>(Q);
    arr.ptr_c[e] = arr.ptr_d[e] = c + e * P * Q;
    arr.stride_c[e] = ld_stride<typename T::StrideC>(Q);
    arr.stride_d[e] = ld_stride<typename T::StrideD>(Q);
  } else {
    const int64_t K = g.dim_in, N = g.dim_out;
    arr.problems[e] = cute::make_shape(m, int(N), int(K));  // m = 0: no tiles for this group
    arr.ptr_a[e] = a + r.begin * K;
    arr.stride_a[e] = ld_stride<typename T::StrideA>(K);
    arr.ptr_b[e] = b + e * K * N;
    arr.stride_b[e] = ld_stride<typename T::StrideB>(kForm == Form::kFwdNT ? K : N);
    arr.ptr_c[e] = arr.ptr_d[e] = c + r.begin * N;
    arr.stride_c[e] = ld_stride<typename T::StrideC>(N);
    arr.stride_d[e] = ld_stride<typename T::StrideD>(N);
  }
}

template <typename Element, Form kForm, class Tile>
size_t sm90_workspace(const GroupedGemmArgs& g) {
  return Sm90Grouped<Element, kForm, Tile>::carve(nullptr, g, nullptr);
}

template <typename Element, Form kForm, class Tile>
const char* sm90_run(const GroupedGemmArgs& g, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using Traits = Sm90Grouped<Element, kForm, Tile>;
  using Gemm = typename Traits::Gemm;
  if (g.form != kForm) return "internal error: grouped GEMM form does not match the kernel";
  typename Traits::Arrays arr;
  if (Traits::carve(workspace, g, &arr) > workspace_bytes) return "grouped GEMM workspace too small";
  const int E = int(g.num_experts);
  sm90_build_args_kernel<Element, kForm, Tile><<<(E + 127) / 128, 128, 0, stream>>>(g, arr);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);

  const auto args = Traits::arguments(g, arr);
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
  st = gemm.initialize(args, arr.cutlass_workspace, stream);
  if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
  return nullptr;
}

}  // namespace gemm
}  // namespace moe_ext

// Defines grouped_gemm_<NAME>_workspace / _run for one (element, form, tile).
#define MOE_EXT_SM90_GROUPED_GEMM(NAME, ELEMENT, FORM, TILE)                                            \
  namespace moe_ext {                                                                                   \
  namespace gemm {                                                                                      \
  size_t grouped_gemm_##NAME##_workspace(const GroupedGemmArgs& args) {                                 \
    return sm90_workspace<ELEMENT, FORM, TILE>(args);                                                   \
  }                                                                                                     \
  const char* grouped_gemm_##NAME##_run(const GroupedGemmArgs& args, void* workspace,                   \
                                        size_t workspace_bytes, cudaStream_t stream) {                  \
    return sm90_run<ELEMENT, FORM, TILE>(args, workspace, workspace_bytes, stream);                     \
  }                                                                                                     \
  }                                                                                                     \
  }
