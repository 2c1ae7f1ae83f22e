// CUTLASS 2.x grouped GEMM, sm_80..sm_89, bf16, weight gradient x^T @ y. One instantiation per file (compile time).
#include "sm80_grouped.cuh"

MOE_EXT_SM80_GROUPED_GEMM(sm80_bf16_tn, cutlass::bfloat16_t, moe_ext::gemm::Form::kWgradTN, moe_ext::gemm::Math::kTensorOp)
