// Raw-pointer launchers of the grouped GEMM kernels (no torch headers: the .cu files that define these
// compile without them; csrc/cuda/grouped_gemm_cuda.cpp is the torch glue).
//
// Three forms, one per layout, with E experts whose rows are [offsets[e], offsets[e+1]) of the inputs:
//   kFwdNN    c[rows_e, :] (+)= a[rows_e, :] @ b[e]        a [M,K], b [E,K,N], c [M,N]
//   kFwdNT    c[rows_e, :] (+)= a[rows_e, :] @ b[e]^T      a [M,K], b [E,N,K], c [M,N]
//   kWgradTN  out[e] = x[rows_e, :]^T @ y[rows_e, :]       x [M,P], y [M,Q], out [E,P,Q]
// All tensors are contiguous row-major. The per-expert problem shapes, pointers and strides are built
// on the device from `offsets` by a small kernel, so nothing is read back to the host and every launch
// is CUDA-graph capturable. Workspace sizes depend only on host-known bounds (E, dims, SM count).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moe_ext {
namespace gemm {

enum class Form : int { kFwdNN = 0, kFwdNT = 1, kWgradTN = 2 };

struct GroupedGemmArgs {
  Form form;
  const void* a;            // fwd: a [M,K]           wgrad: x [M,P]
  const void* b;            // fwd: b [E,K,N]/[E,N,K] wgrad: y [M,Q]
  void* c;                  // fwd: c [M,N]           wgrad: out [E,P,Q]
  const int64_t* offsets;   // [E+1], device memory
  int64_t rows;             // M (rows of a / x / y)
  int64_t dim_in;           // fwd: K                 wgrad: P
  int64_t dim_out;          // fwd: N                 wgrad: Q
  int64_t num_experts;      // E
  // fwd only: c already holds a per-row prefill (bias) that the GEMM adds to (beta = 1). Rows outside
  // [offsets[0], offsets[E]) are never touched by the GEMM (the caller zeroes them).
  bool accumulate;
  int sm_count;             // SMs of the device (persistent / device-scheduled grids)
  int device;
};

// Each CUTLASS instantiation file defines one pair, e.g. grouped_gemm_sm90_bf16_nn_workspace/_run.
// _run returns nullptr on success or a static string naming what failed.
#define MOE_EXT_DECLARE_GROUPED_GEMM(NAME)                                                  \
  size_t grouped_gemm_##NAME##_workspace(const GroupedGemmArgs& args);                      \
  const char* grouped_gemm_##NAME##_run(const GroupedGemmArgs& args, void* workspace,        \
                                        size_t workspace_bytes, cudaStream_t stream);

MOE_EXT_DECLARE_GROUPED_GEMM(sm90_bf16_nn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_bf16_nt)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_bf16_tn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_fp16_nn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_fp16_nt)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_fp16_tn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_bf16_nn_t256)  // the 128x256 tile (sm90_grouped.cuh)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_bf16_nt_t256)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_bf16_tn_t256)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_fp16_nn_t256)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_fp16_nt_t256)
MOE_EXT_DECLARE_GROUPED_GEMM(sm90_fp16_tn_t256)
MOE_EXT_DECLARE_GROUPED_GEMM(sm80_bf16_nn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm80_bf16_nt)
MOE_EXT_DECLARE_GROUPED_GEMM(sm80_bf16_tn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm80_fp16_nn)
MOE_EXT_DECLARE_GROUPED_GEMM(sm80_fp16_nt)
MOE_EXT_DECLARE_GROUPED_GEMM(sm80_fp16_tn)
MOE_EXT_DECLARE_GROUPED_GEMM(tf32_nn)  // fp32 inputs as TF32, mma.sync: every arch >= 8.0 of the build
MOE_EXT_DECLARE_GROUPED_GEMM(tf32_nt)
MOE_EXT_DECLARE_GROUPED_GEMM(tf32_tn)
MOE_EXT_DECLARE_GROUPED_GEMM(f32_nn)   // exact fp32, SIMT FFMA: every arch >= 8.0 of the build
MOE_EXT_DECLARE_GROUPED_GEMM(f32_nt)
MOE_EXT_DECLARE_GROUPED_GEMM(f32_tn)

// ---- helpers in grouped_gemm_aux.cu (compiled for every arch of the build, no CUTLASS) ----
// Element sizes are in bytes (2: fp16/bf16, 4: fp32, 8: fp64); these kernels only move bits.

// Forward prologue on c [M,N]: rows outside [offsets[0], offsets[E]) get zero; with `bias` [E,N], each
// row of expert e inside the range gets bias[e] (the GEMM then adds a@b with beta = 1).
cudaError_t grouped_gemm_prefill(void* c, const void* bias, const int64_t* offsets, int64_t E, int64_t M,
                                 int64_t N, int elem_size, int sm_count, cudaStream_t stream);

// Wgrad epilogue-side fix for k = 0: out[e] [P*Q elements] = 0 for every expert with no rows once its
// offsets are clamped to [0, M] (CUTLASS is handed a 0x0x0 problem for exactly those, so it writes
// nothing there).
cudaError_t grouped_gemm_zero_empty_experts(void* out, const int64_t* offsets, int64_t E, int64_t M, int64_t PQ,
                                            int elem_size, int sm_count, cudaStream_t stream);

// Simple CUDA-core tiled kernels for what the CUTLASS kernels do not take: fp64, 16-bit inputs whose
// sizes break CUTLASS's 16-byte alignment (K, N, P or Q not a multiple of 8), and fp32 in a build
// without CUTLASS (or on a device it has no fp32 kernel for). fp32 accumulation (fp64 for fp64).
// dtype: 0 fp32, 1 fp64, 2 fp16, 3 bf16.
// Forward writes only the rows of experts (adds to a prefill when accumulate); wgrad writes all of out.
cudaError_t grouped_gemm_simt(const GroupedGemmArgs& args, int dtype, cudaStream_t stream);

}  // namespace gemm
}  // namespace moe_ext
