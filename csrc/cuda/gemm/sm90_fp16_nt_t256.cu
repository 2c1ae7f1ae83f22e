// CUTLASS 3.x grouped GEMM, sm_90a, fp16, forward with trans_b, b [E,N,K], 128x256x64 tile. One instantiation per file
// (compile time).
#include "sm90_grouped.cuh"

MOE_EXT_SM90_GROUPED_GEMM(sm90_fp16_nt_t256, cutlass::half_t, moe_ext::gemm::Form::kFwdNT, moe_ext::gemm::Sm90Tile256)
