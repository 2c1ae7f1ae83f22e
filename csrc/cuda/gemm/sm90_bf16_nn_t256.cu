// CUTLASS 3.x grouped GEMM, sm_90a, bf16, forward, b [E,K,N], 128x256x64 tile. One instantiation per file
// (compile time).
#include "sm90_grouped.cuh"

MOE_EXT_SM90_GROUPED_GEMM(sm90_bf16_nn_t256, cutlass::bfloat16_t, moe_ext::gemm::Form::kFwdNN, moe_ext::gemm::Sm90Tile256)
