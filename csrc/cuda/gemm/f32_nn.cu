// CUTLASS 2.x grouped GEMM, exact fp32 on CUDA cores (SIMT FFMA; sm_80..sm_89 and sm_90), forward, b [E,K,N].
// Taken for fp32 when TF32 is not allowed or the rows break 16-byte alignment. One instantiation per file.
#include "sm80_grouped.cuh"

MOE_EXT_SM80_GROUPED_GEMM(f32_nn, float, moe_ext::gemm::Form::kFwdNN, moe_ext::gemm::Math::kSimt)
