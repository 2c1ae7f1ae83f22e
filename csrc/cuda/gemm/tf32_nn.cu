// CUTLASS 2.x grouped GEMM, fp32 inputs as TF32 (mma.sync; sm_80..sm_89 and sm_90), forward, b [E,K,N].
// Taken only when torch allows TF32 for matmuls. One instantiation per file (compile time).
#include "sm80_grouped.cuh"

MOE_EXT_SM80_GROUPED_GEMM(tf32_nn, float, moe_ext::gemm::Form::kFwdNN, moe_ext::gemm::Math::kTensorOp)
