// What the build system compiled in; CMakeLists.txt defines these.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#ifndef MOE_EXT_WITH_CUDA
#define MOE_EXT_WITH_CUDA 0
#endif
#ifndef MOE_EXT_WITH_CUTLASS
#define MOE_EXT_WITH_CUTLASS 0
#endif
#ifndef MOE_EXT_CUDA_ARCHS
#define MOE_EXT_CUDA_ARCHS ""
#endif
#ifndef MOE_EXT_CUDA_VERSION
#define MOE_EXT_CUDA_VERSION ""
#endif
#ifndef MOE_EXT_CUTLASS_VERSION
#define MOE_EXT_CUTLASS_VERSION ""
#endif
#ifndef MOE_EXT_CXX
#define MOE_EXT_CXX ""
#endif
#ifndef MOE_EXT_CUDA_HOST_CXX
#define MOE_EXT_CUDA_HOST_CXX ""
#endif
#ifndef MOE_EXT_TORCH_VERSION
#define MOE_EXT_TORCH_VERSION ""
#endif
// Which grouped GEMM kernel families were compiled (archs in TORCH_CUDA_ARCH_LIST, CUTLASS found, and
// the MOE_EXT_DISABLE_SM80 / _SM90 / _FP16 / _TF32 switches).
#ifndef MOE_EXT_GEMM_SM80
#define MOE_EXT_GEMM_SM80 0
#endif
#ifndef MOE_EXT_GEMM_SM90
#define MOE_EXT_GEMM_SM90 0
#endif
#ifndef MOE_EXT_GEMM_FP16
#define MOE_EXT_GEMM_FP16 0
#endif
#ifndef MOE_EXT_GEMM_TF32_SM80
#define MOE_EXT_GEMM_TF32_SM80 0
#endif
#ifndef MOE_EXT_GEMM_TF32_SM90
#define MOE_EXT_GEMM_TF32_SM90 0
#endif
#ifndef MOE_EXT_GEMM_F32_SM80
#define MOE_EXT_GEMM_F32_SM80 0
#endif
#ifndef MOE_EXT_GEMM_F32_SM90
#define MOE_EXT_GEMM_F32_SM90 0
#endif
#ifndef MOE_EXT_GEMM_NOTE
#define MOE_EXT_GEMM_NOTE ""
#endif

namespace moe_ext {

// MOE_EXT_CUDA_ARCHS is the comma-separated list the CUDA code was compiled for, e.g. "80,90a".
inline std::vector<std::string> build_cuda_archs() {
  std::vector<std::string> out;
  std::stringstream ss(MOE_EXT_CUDA_ARCHS);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace moe_ext
