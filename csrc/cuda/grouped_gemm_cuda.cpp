// CUDA entry points of grouped_gemm and grouped_gemm_wgrad: checks (shared with the CPU kernels),
// device guard, current stream, kernel choice, workspace. The kernels are in csrc/cuda/gemm/:
//   bf16/fp16, sm_90        CUTLASS 3.x pointer-array grouped GEMM (TMA, warp-specialised, wgmma),
//                           128x128 or 128x256 tile (choose_wide_tile)
//   bf16/fp16, sm_80..sm_89 CUTLASS 2.x GemmGrouped with device-side scheduling (mma.sync)
//   fp32, sm_80..sm_90      CUTLASS 2.x: mma.sync TF32 when torch allows TF32 for CUDA matmuls and the
//                           rows are 16-byte aligned, exact SIMT FFMA otherwise
//   fp64, 16-bit inputs whose K/N (P/Q) or data break 16-byte alignment, and fp32 without a CUTLASS
//   kernel for the device: a simple CUDA-core tiled kernel (correct, slow; see docs/grouped_gemm.md)
// Nothing here reads expert_offsets on the host: per-expert problems are built on the device, so the
// ops never synchronise and can be captured in CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <climits>
#include <cstdint>
#include <string>

#include "../common/build_config.h"
#include "../common/checks.h"
#include "../common/gemm_tile.h"
#include "gemm/grouped_gemm_launch.h"

namespace moe_ext {
namespace {

using gemm::Form;
using gemm::GroupedGemmArgs;

using WorkspaceFn = size_t (*)(const GroupedGemmArgs&);
using RunFn = const char* (*)(const GroupedGemmArgs&, void*, size_t, cudaStream_t);
struct KernelFns {
  WorkspaceFn workspace = nullptr;
  RunFn run = nullptr;
  const char* name = "";
};

#define MOE_EXT_KERNEL_FNS(NAME) \
  KernelFns{&gemm::grouped_gemm_##NAME##_workspace, &gemm::grouped_gemm_##NAME##_run, #NAME}
// The fp16 kernels are not linked in when MOE_EXT_DISABLE_FP16 compiled them out (find_cutlass_kernel
// refuses fp16 before it gets here), so they must not be referenced either, even from a dead branch.
#if MOE_EXT_GEMM_FP16
#define MOE_EXT_FP16_FNS(NAME) MOE_EXT_KERNEL_FNS(NAME)
#else
#define MOE_EXT_FP16_FNS(NAME) KernelFns{}
#endif

const char* form_name(Form f) {
  return f == Form::kFwdNN ? "forward NN" : (f == Form::kFwdNT ? "forward NT (trans_b)" : "wgrad TN");
}

std::string device_desc(const cudaDeviceProp& p) {
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ")";
}

// Whether the build has SASS that runs on an sm_8<minor> device: some 8y with y <= minor (sm_8y code
// runs on sm_8z for z >= y; the grouped GEMM files carry no PTX).
bool built_for_sm8x(int minor) {
  for (const auto& a : build_cuda_archs())
    if (a.size() >= 2 && a[0] == '8' && a[1] >= '0' && a[1] - '0' <= minor) return true;
  return false;
}

std::string compiled_archs() {
  std::string s = "[";
  for (const auto& a : build_cuda_archs()) s += (s.size() > 1 ? ", " : "") + a;
  return s + "]";
}

// The sm_90a tile for one call. The 128x256 tile feeds wgmma 1.5x the FLOPs per byte of shared memory
// filled, but a problem has half as many of its tiles, and its 2x1 cluster rounds each expert's M
// tiles up to an even count: it pays off only when experts average many rows. The host knows only
// the mean rows per expert without a sync (rows / E). The wide tile is used when that mean is >= 256
// (a forward's M, a wgrad's depth) and the problem still has at least two wide tiles per SM, so that
// no SM idles at the tail. 256, not the 1024 of commit 951fc6a: torch's grouped_mm takes 128x256
// whenever experts average over 128 rows, and at Qwen3's 256 the forced wide tile was 2-6% faster in
// run 2 (bench/NOTES.md logs what each tile measured, entry 9 this change).
constexpr int64_t kWideTileMinRowsPerExpert = 256;

bool choose_wide_tile(const GroupedGemmArgs& g) {
  switch (sm90_gemm_tile()) {
    case GemmTile::k128x128: return false;
    case GemmTile::k128x256: return true;
    case GemmTile::kAuto: break;
  }
  if (g.num_experts <= 0) return false;
  const int64_t mean_rows = g.rows / g.num_experts;
  if (mean_rows < kWideTileMinRowsPerExpert) return false;
  const int64_t m = g.form == Form::kWgradTN ? g.dim_in : mean_rows;
  const int64_t tiles = g.num_experts * ((m + 127) / 128) * ((g.dim_out + 255) / 256);
  return tiles >= 2 * int64_t(g.sm_count);
}

// The CUTLASS kernel for (device, dtype, problem), or an error that says why there is none. The tile
// setting is read only on sm_90, the one arch with two tiles.
KernelFns find_cutlass_kernel(const char* op, const cudaDeviceProp& prop, at::ScalarType dtype,
                              const GroupedGemmArgs& args) {
  const Form form = args.form;
  TORCH_CHECK(MOE_EXT_WITH_CUTLASS, "moe_ext.", op, ": the CUDA ", dtype,
              " grouped GEMM needs CUTLASS, which was not found when moe_ext was built. Install its headers "
              "(pip install --no-deps nvidia-cutlass==4.2.0.0, or set MOE_EXT_CUTLASS_DIR to a CUTLASS "
              "include dir) and rebuild; float32 inputs run without CUTLASS (slow CUDA-core kernel)");
  const bool fp16 = dtype == at::kHalf;
  TORCH_CHECK(!fp16 || MOE_EXT_GEMM_FP16, "moe_ext.", op,
              ": the float16 grouped GEMM kernels were compiled out (MOE_EXT_DISABLE_FP16=1 at build time). "
              "Use bfloat16 inputs, or rebuild without MOE_EXT_DISABLE_FP16");
  const bool sm90 = prop.major == 9 && prop.minor == 0;
  const bool sm8x = prop.major == 8 && built_for_sm8x(prop.minor);
  if (sm90) {
#if MOE_EXT_GEMM_SM90
    if (choose_wide_tile(args)) {
      switch (form) {
        case Form::kFwdNN:
          return fp16 ? MOE_EXT_FP16_FNS(sm90_fp16_nn_t256) : MOE_EXT_KERNEL_FNS(sm90_bf16_nn_t256);
        case Form::kFwdNT:
          return fp16 ? MOE_EXT_FP16_FNS(sm90_fp16_nt_t256) : MOE_EXT_KERNEL_FNS(sm90_bf16_nt_t256);
        case Form::kWgradTN:
          return fp16 ? MOE_EXT_FP16_FNS(sm90_fp16_tn_t256) : MOE_EXT_KERNEL_FNS(sm90_bf16_tn_t256);
      }
    }
    switch (form) {
      case Form::kFwdNN: return fp16 ? MOE_EXT_FP16_FNS(sm90_fp16_nn) : MOE_EXT_KERNEL_FNS(sm90_bf16_nn);
      case Form::kFwdNT: return fp16 ? MOE_EXT_FP16_FNS(sm90_fp16_nt) : MOE_EXT_KERNEL_FNS(sm90_bf16_nt);
      case Form::kWgradTN: return fp16 ? MOE_EXT_FP16_FNS(sm90_fp16_tn) : MOE_EXT_KERNEL_FNS(sm90_bf16_tn);
    }
#endif
  } else if (sm8x) {
#if MOE_EXT_GEMM_SM80
    switch (form) {
      case Form::kFwdNN: return fp16 ? MOE_EXT_FP16_FNS(sm80_fp16_nn) : MOE_EXT_KERNEL_FNS(sm80_bf16_nn);
      case Form::kFwdNT: return fp16 ? MOE_EXT_FP16_FNS(sm80_fp16_nt) : MOE_EXT_KERNEL_FNS(sm80_bf16_nt);
      case Form::kWgradTN: return fp16 ? MOE_EXT_FP16_FNS(sm80_fp16_tn) : MOE_EXT_KERNEL_FNS(sm80_bf16_tn);
    }
#endif
  }
  TORCH_CHECK(false, "moe_ext.", op, ": no ", dtype, " grouped GEMM kernel (", form_name(form), ") for ",
              device_desc(prop), ". This build has CUDA code for archs ", compiled_archs(),
              " (TORCH_CUDA_ARCH_LIST)", std::string(MOE_EXT_GEMM_NOTE),
              "; the grouped GEMM kernels exist for sm_80..sm_89 (CUTLASS 2.x, arch 8.x in the list) and "
              "sm_90 (CUTLASS 3.x, needs 9.0a in the list). Rebuild with this device's arch, e.g. "
              "TORCH_CUDA_ARCH_LIST=\"", prop.major == 9 ? "9.0a" : "8.0", "\"");
  return {};
}

// Whether torch allows TF32 for fp32 CUDA matmuls. The fp32_precision API and the legacy allow_tf32 /
// set_float32_matmul_precision both land in float32Precision(CUDA, MATMUL); allowTF32CuBLAS() throws
// once the two APIs have been mixed, so it is only the fallback for torch before 2.11.
bool torch_allows_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  try {
    return at::globalContext().allowTF32CuBLAS();
  } catch (const c10::Error&) {
    return false;
  }
#endif
}

// The fp32 CUTLASS kernels are compiled for every 8.x and 9.0a arch of the build (no PTX).
bool fp32_kernel_runs_on(const cudaDeviceProp& prop, bool built_sm80, bool built_sm90) {
  if (prop.major == 9 && prop.minor == 0) return built_sm90;
  return prop.major == 8 && built_sm80 && built_for_sm8x(prop.minor);
}

// fp32: TF32 where torch allows TF32 for CUDA matmuls and the rows are 16-byte aligned, exact SIMT
// otherwise. Empty when the build has no fp32 kernel for the device (no CUTLASS, another arch): the
// simple kernel runs then. TF32 is a speed-up, never an error.
KernelFns find_fp32_kernel(const cudaDeviceProp& prop, Form form, bool aligned) {
  if (aligned && fp32_kernel_runs_on(prop, MOE_EXT_GEMM_TF32_SM80, MOE_EXT_GEMM_TF32_SM90) && torch_allows_tf32()) {
#if MOE_EXT_GEMM_TF32_SM80 || MOE_EXT_GEMM_TF32_SM90
    switch (form) {
      case Form::kFwdNN: return MOE_EXT_KERNEL_FNS(tf32_nn);
      case Form::kFwdNT: return MOE_EXT_KERNEL_FNS(tf32_nt);
      case Form::kWgradTN: return MOE_EXT_KERNEL_FNS(tf32_tn);
    }
#endif
  }
  if (fp32_kernel_runs_on(prop, MOE_EXT_GEMM_F32_SM80, MOE_EXT_GEMM_F32_SM90)) {
#if MOE_EXT_GEMM_F32_SM80 || MOE_EXT_GEMM_F32_SM90
    switch (form) {
      case Form::kFwdNN: return MOE_EXT_KERNEL_FNS(f32_nn);
      case Form::kFwdNT: return MOE_EXT_KERNEL_FNS(f32_nt);
      case Form::kWgradTN: return MOE_EXT_KERNEL_FNS(f32_tn);
    }
#endif
  }
  return {};
}

// CUTLASS's problem shapes are int32, and it rounds them up to whole tiles in int32 (m - 1 + 128, ...):
// larger sizes take the simple kernel, which indexes in int64.
constexpr int64_t kMaxCutlassDim = INT_MAX - 256;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether a row of `n` elements of `elem` bytes keeps 16-byte accesses 16-byte aligned.
bool rows16(int64_t n, int64_t elem) { return (n * elem) % 16 == 0; }

// Which of the simple kernel's dtype codes (grouped_gemm_launch.h).
int simt_dtype(at::ScalarType d) {
  switch (d) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;
  }
}

// Runs the grouped GEMM described by `args` on the current stream and says whether CUTLASS ran it:
// CUTLASS for 16-bit inputs whose rows and data are 16-byte aligned, and for fp32 (any layout);
// the simple kernel otherwise. `fits` says whether every size fits CUTLASS's int32 problem shapes.
bool run_grouped(const char* op, GroupedGemmArgs& args, at::ScalarType dtype, bool aligned, bool fits,
                 const at::Tensor& like, cudaStream_t stream) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const cudaDeviceProp& prop = *at::cuda::getDeviceProperties(args.device);
  KernelFns k;
  if (fits && dtype == at::kFloat) k = find_fp32_kernel(prop, args.form, aligned);
  if (fits && aligned && half) k = find_cutlass_kernel(op, prop, dtype, args);
  note_grouped_gemm_kernel(k.run == nullptr ? "simt" : k.name);
  if (k.run == nullptr) {
    C10_CUDA_CHECK(gemm::grouped_gemm_simt(args, simt_dtype(dtype), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return false;
  }
  const size_t bytes = k.workspace(args);
  auto ws = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  const char* err = k.run(args, ws.data_ptr(), bytes, stream);
  TORCH_CHECK(err == nullptr, "moe_ext.", op, ": CUTLASS grouped GEMM ", k.name, " (", form_name(args.form), ", ",
              dtype, ", ", device_desc(prop), ") failed: ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& expert_offsets,
                             bool trans_b, const std::optional<at::Tensor>& bias) {
  const char* op = "grouped_gemm";
  check_grouped_gemm(a, b, expert_offsets, trans_b, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), K = a.size(1), E = b.size(0);
  const int64_t N = trans_b ? b.size(1) : b.size(2);
  auto c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  const auto a_c = a.contiguous();
  const auto b_c = b.contiguous();
  const auto offs = expert_offsets.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = a.get_device();
  const int sm_count = at::cuda::getDeviceProperties(dev)->multiProcessorCount;
  const int elem = static_cast<int>(a.element_size());

  // Prologue: zero the rows outside [offsets[0], offsets[E]); with bias, every expert row starts as
  // bias[e] and the GEMM adds to it (beta = 1).
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  if (K == 0 || E == 0) {  // nothing to multiply: c = bias rows (or zeros)
    if (bias_c.has_value() && E > 0) {
      C10_CUDA_CHECK(gemm::grouped_gemm_prefill(c.data_ptr(), bias_c->data_ptr(), offs.data_ptr<int64_t>(), E, M, N,
                                                elem, sm_count, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      c.zero_();
    }
    return c;
  }
  C10_CUDA_CHECK(gemm::grouped_gemm_prefill(c.data_ptr(), bias_c.has_value() ? bias_c->data_ptr() : nullptr,
                                            offs.data_ptr<int64_t>(), E, M, N, elem, sm_count, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  GroupedGemmArgs args{};
  args.form = trans_b ? Form::kFwdNT : Form::kFwdNN;
  args.a = a_c.data_ptr();
  args.b = b_c.data_ptr();
  args.c = c.data_ptr();
  args.offsets = offs.data_ptr<int64_t>();
  args.rows = M;
  args.dim_in = K;
  args.dim_out = N;
  args.num_experts = E;
  args.accumulate = bias_c.has_value();
  args.sm_count = sm_count;
  args.device = dev;
  const bool aligned = rows16(K, elem) && rows16(N, elem) && aligned16(a_c) && aligned16(b_c) && aligned16(c);
  const bool fits = M <= kMaxCutlassDim && K <= kMaxCutlassDim && N <= kMaxCutlassDim && E <= kMaxCutlassDim;
  run_grouped(op, args, a.scalar_type(), aligned, fits, a, stream);
  return c;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& expert_offsets) {
  const char* op = "grouped_gemm_wgrad";
  check_grouped_gemm_wgrad(x, y, expert_offsets);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), P = x.size(1), Q = y.size(1);
  const int64_t E = expert_offsets.size(0) - 1;
  auto out = at::empty({E, P, Q}, x.options());
  if (out.numel() == 0) return out;
  if (M == 0) return out.zero_();
  const auto x_c = x.contiguous();
  const auto y_c = y.contiguous();
  const auto offs = expert_offsets.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int dev = x.get_device();
  const int sm_count = at::cuda::getDeviceProperties(dev)->multiProcessorCount;

  GroupedGemmArgs args{};
  args.form = Form::kWgradTN;
  args.a = x_c.data_ptr();
  args.b = y_c.data_ptr();
  args.c = out.data_ptr();
  args.offsets = offs.data_ptr<int64_t>();
  args.rows = M;
  args.dim_in = P;
  args.dim_out = Q;
  args.num_experts = E;
  args.accumulate = false;
  args.sm_count = sm_count;
  args.device = dev;
  const int64_t elem = x.element_size();
  const bool aligned = rows16(P, elem) && rows16(Q, elem) && aligned16(x_c) && aligned16(y_c) && aligned16(out);
  const bool fits = M <= kMaxCutlassDim && P <= kMaxCutlassDim && Q <= kMaxCutlassDim && E <= kMaxCutlassDim;
  if (run_grouped(op, args, x.scalar_type(), aligned, fits, x, stream)) {
    // CUTLASS got 0x0x0 problems for experts without rows (k = 0 is mishandled, cutlass PR #1593);
    // their gradient is zero. The simple kernel writes those zeros itself.
    C10_CUDA_CHECK(gemm::grouped_gemm_zero_empty_experts(out.data_ptr(), offs.data_ptr<int64_t>(), E, M, P * Q,
                                                         static_cast<int>(out.element_size()), sm_count, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
}

}  // namespace moe_ext
