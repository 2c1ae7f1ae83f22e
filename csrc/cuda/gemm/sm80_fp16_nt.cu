// CUTLASS 2.x grouped GEMM, sm_80..sm_89, fp16, forward with trans_b, b [E,N,K]. One instantiation per file (compile time).
#include "sm80_grouped.cuh"

MOE_EXT_SM80_GROUPED_GEMM(sm80_fp16_nt, cutlass::half_t, moe_ext::gemm::Form::kFwdNT, moe_ext::gemm::Math::kTensorOp)
