// CUTLASS 3.x grouped GEMM, sm_90a, fp16, forward, b [E,K,N], 128x256x64 tile. One instantiation per file
// (compile time).
#include "sm90_grouped.cuh"

MOE_EXT_SM90_GROUPED_GEMM(sm90_fp16_nn_t256, cutlass::half_t, moe_ext::gemm::Form::kFwdNN, moe_ext::gemm::Sm90Tile256)
