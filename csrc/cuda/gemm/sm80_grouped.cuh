// CUTLASS 2.x grouped GEMM (GemmGrouped, device-side scheduling: each persistent CTA walks the problem
// list on the device, so no host precomputation and no workspace beyond our arrays), in three kinds:
//   kTensorOp, 16-bit elements: bf16/fp16 mma.sync m16n8k16, sm_80..sm_89;
//   kTensorOp, float elements:  fp32 inputs as TF32, mma.sync m16n8k8 .tf32 (also runs on sm_90);
//   kSimt, float elements:      exact fp32 FFMA on CUDA cores with cp.async pipelining (sm_80..sm_90).
// Included by exactly one .cu per (kind, dtype, layout); see MOE_EXT_SM80_GROUPED_GEMM at the bottom.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/layout/matrix.h"

#include "grouped_gemm_launch.h"
#include "workspace.cuh"

namespace moe_ext {
namespace gemm {

enum class Math { kTensorOp, kSimt };

// Tiles per (element, math): 16-bit as CUTLASS's Ampere bf16/fp16 defaults, TF32 as its Ampere TF32
// example (14_ampere_tf32_tensorop_gemm), both 64 KiB of shared memory in 4 stages; SIMT fp32 as its
// sm80 SGEMM configurations (128x128x8, 8 warps of 32x64), 32 KiB in 4 stages. Tensor ops move 16
// bytes per access (rows must be 16-byte aligned); SIMT moves single elements (any layout).
template <typename Element, Math kMath>
struct Sm80Tiles {
  using OpClass = cutlass::arch::OpClassTensorOp;
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;       // 4 warps
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;  // mma.sync m16n8k16
  static constexpr int kAlignment = 16 / int(sizeof(Element));
};
template <>
struct Sm80Tiles<float, Math::kTensorOp> {
  using OpClass = cutlass::arch::OpClassTensorOp;
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 16>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 16>;      // 4 warps
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;  // mma.sync m16n8k8 .tf32
  static constexpr int kAlignment = 4;
};
template <>
struct Sm80Tiles<float, Math::kSimt> {
  using OpClass = cutlass::arch::OpClassSimt;
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 8>;
  using Warp = cutlass::gemm::GemmShape<32, 64, 8>;      // 8 warps
  using Instruction = cutlass::gemm::GemmShape<1, 1, 1>;  // FFMA
  static constexpr int kAlignment = 1;
};

// The per-expert argument arrays the device builds (sm80_build_args_kernel) and CUTLASS reads.
template <typename Element>
struct Sm80Arrays {
  cutlass::gemm::GemmCoord* problems;
  Element** ptr_a;
  Element** ptr_b;
  Element** ptr_c;
  Element** ptr_d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldc;
  int64_t* ldd;

  static size_t carve(void* base, int64_t E, Sm80Arrays* out) {
    WorkspaceCarver w(base);
    Sm80Arrays a;
    a.problems = w.take<cutlass::gemm::GemmCoord>(E);
    a.ptr_a = w.take<Element*>(E);
    a.ptr_b = w.take<Element*>(E);
    a.ptr_c = w.take<Element*>(E);
    a.ptr_d = w.take<Element*>(E);
    a.lda = w.take<int64_t>(E);
    a.ldb = w.take<int64_t>(E);
    a.ldc = w.take<int64_t>(E);
    a.ldd = w.take<int64_t>(E);
    if (out) *out = a;
    return w.size();
  }
};

template <typename Element, Form kForm, Math kMath>
struct Sm80Grouped {
  using RowMajor = cutlass::layout::RowMajor;
  using ColumnMajor = cutlass::layout::ColumnMajor;
  // fwd NN: A [m,K] row-major, B [K,N] row-major; fwd NT: B is b[e] [N,K] read as a column-major
  // [K,N]; wgrad TN: A = x_e^T, a column-major [P,m] view of x_e [m,P].
  using LayoutA = std::conditional_t<kForm == Form::kWgradTN, ColumnMajor, RowMajor>;
  using LayoutB = std::conditional_t<kForm == Form::kFwdNT, ColumnMajor, RowMajor>;
  using LayoutC = RowMajor;
  using Tiles = Sm80Tiles<Element, kMath>;
  static constexpr int kAlignment = Tiles::kAlignment;
  using EpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>;
  using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlignment,
      Element, LayoutB, cutlass::ComplexTransform::kNone, kAlignment,
      Element, LayoutC, float,
      typename Tiles::OpClass, cutlass::arch::Sm80,
      typename Tiles::Threadblock, typename Tiles::Warp, typename Tiles::Instruction,
      EpilogueOp,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,  // unused by grouped kernels
      4,                                       // pipeline stages
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<GemmKernel>;
};

// One thread per expert: problem shape, pointers and leading dimensions from the offsets.
template <typename Element, Form kForm>
__global__ void sm80_build_args_kernel(GroupedGemmArgs g, Sm80Arrays<Element> arr) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= g.num_experts) return;
  const ExpertRows r = expert_rows(g.offsets, e, g.rows);
  auto* a = const_cast<Element*>(static_cast<const Element*>(g.a));
  auto* b = const_cast<Element*>(static_cast<const Element*>(g.b));
  auto* c = static_cast<Element*>(g.c);
  const int m = int(r.count);
  if constexpr (kForm == Form::kWgradTN) {
    const int64_t P = g.dim_in, Q = g.dim_out;
    // k = 0 problems are mishandled by CUTLASS (cutlass PR #1593): give it nothing to do and let
    // grouped_gemm_zero_empty_experts write the zeros.
    arr.problems[e] = m > 0 ? cutlass::gemm::GemmCoord(int(P), int(Q), m) : cutlass::gemm::GemmCoord(0, 0, 0);
    arr.ptr_a[e] = a + r.begin * P;
    arr.lda[e] = P;
    arr.ptr_b[e] = b + r.begin * Q;
    arr.ldb[e] = Q;
    arr.ptr_c[e] = arr.ptr_d[e] = c + e * P * Q;
    arr.ldc[e] = arr.ldd[e] = Q;
  } else {
    const int64_t K = g.dim_in, N = g.dim_out;
    arr.problems[e] = cutlass::gemm::GemmCoord(m, int(N), int(K));
    arr.ptr_a[e] = a + r.begin * K;
    arr.lda[e] = K;
    arr.ptr_b[e] = b + e * K * N;
    arr.ldb[e] = kForm == Form::kFwdNT ? K : N;
    arr.ptr_c[e] = arr.ptr_d[e] = c + r.begin * N;
    arr.ldc[e] = arr.ldd[e] = N;
  }
}

template <typename Element>
size_t sm80_workspace(const GroupedGemmArgs& g) {
  return Sm80Arrays<Element>::carve(nullptr, g.num_experts, nullptr);
}

template <typename Element, Form kForm, Math kMath>
const char* sm80_run(const GroupedGemmArgs& g, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using Traits = Sm80Grouped<Element, kForm, kMath>;
  using Gemm = typename Traits::Gemm;
  if (g.form != kForm) return "internal error: grouped GEMM form does not match the kernel";
  Sm80Arrays<Element> arr;
  if (Sm80Arrays<Element>::carve(workspace, g.num_experts, &arr) > workspace_bytes) return "grouped GEMM workspace too small";
  const int E = int(g.num_experts);
  sm80_build_args_kernel<Element, kForm><<<(E + 127) / 128, 128, 0, stream>>>(g, arr);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);

  // Persistent grid: as many CTAs as fit on the device (the occupancy query is cached per device).
  static int blocks_per_sm[64] = {0};
  int& bps = blocks_per_sm[g.device & 63];
  if (bps <= 0) {
    bps = Gemm::maximum_active_blocks();
    if (bps <= 0) return "CUTLASS grouped GEMM (sm80): the kernel does not fit on this device";
  }
  typename Traits::EpilogueOp::Params epilogue(1.0f, g.accumulate ? 1.0f : 0.0f);
  typename Gemm::Arguments args(arr.problems, E, bps * g.sm_count, epilogue, arr.ptr_a, arr.ptr_b, arr.ptr_c,
                                arr.ptr_d, arr.lda, arr.ldb, arr.ldc, arr.ldd, /*host_problem_sizes=*/nullptr);
  Gemm gemm;
  cutlass::Status st = gemm.initialize(args, nullptr, stream);
  if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
  st = gemm.run(stream);
  if (st != cutlass::Status::kSuccess) return cutlassGetStatusString(st);
  return nullptr;
}

}  // namespace gemm
}  // namespace moe_ext

// Defines grouped_gemm_<NAME>_workspace / _run for one (element, form, math).
#define MOE_EXT_SM80_GROUPED_GEMM(NAME, ELEMENT, FORM, MATH)                                            \
  namespace moe_ext {                                                                                   \
  namespace gemm {                                                                                      \
  size_t grouped_gemm_##NAME##_workspace(const GroupedGemmArgs& args) {                                 \
    return sm80_workspace<ELEMENT>(args);                                                               \
  }                                                                                                     \
  const char* grouped_gemm_##NAME##_run(const GroupedGemmArgs& args, void* workspace,                   \
                                        size_t workspace_bytes, cudaStream_t stream) {                  \
    return sm80_run<ELEMENT, FORM, MATH>(args, workspace, workspace_bytes, stream);                     \
  }                                                                                                     \
  }                                                                                                     \
  }
