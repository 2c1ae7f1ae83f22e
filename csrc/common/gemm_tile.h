// The process-wide choice of the sm_90a grouped GEMM tile (csrc/cuda/gemm/sm90_grouped.cuh). "auto"
// (the default) lets the op pick per call from the problem's size; the fixed settings exist to compare
// the two tiles (bench/gemm_kernels.py) and to work around a bad pick. Initial value: the environment
// variable MOE_EXT_SM90_TILE, read at the first use. Python: moe_ext.set_sm90_gemm_tile().
#pragma once

#include <string>

namespace moe_ext {

enum class GemmTile : int { kAuto = 0, k128x128 = 1, k128x256 = 2 };

GemmTile sm90_gemm_tile();
void set_sm90_gemm_tile(GemmTile tile);
// "auto", "128x128" or "128x256"; anything else raises, naming `what` and the accepted values.
GemmTile parse_gemm_tile(const std::string& value, const char* what);
const char* gemm_tile_name(GemmTile tile);

// The CUDA grouped GEMM kernel this thread launched last ("sm90_bf16_nn_t256", "simt", ...; "" before
// any): lets tests and benchmarks see which kernel a call chose. `name` must be a static string.
void note_grouped_gemm_kernel(const char* name);
const char* last_grouped_gemm_kernel();

}  // namespace moe_ext
