// CUTLASS 3.x grouped GEMM, sm_90a, bf16, forward with trans_b, b [E,N,K], 128x128x64 tile. One instantiation per file
// (compile time).
#include "sm90_grouped.cuh"

MOE_EXT_SM90_GROUPED_GEMM(sm90_bf16_nt, cutlass::bfloat16_t, moe_ext::gemm::Form::kFwdNT, moe_ext::gemm::Sm90Tile128)
