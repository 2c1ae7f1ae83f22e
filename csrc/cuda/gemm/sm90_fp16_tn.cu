// CUTLASS 3.x grouped GEMM, sm_90a, fp16, weight gradient x^T @ y. One instantiation per file (compile time).
#include "sm90_grouped.cuh"

MOE_EXT_SM90_GROUPED_GEMM(sm90_fp16_tn, cutlass::half_t, moe_ext::gemm::Form::kWgradTN)
