// A CPU emulation of the CUDA execution model, enough to run moe_ext's handwritten kernels without a
// GPU (tests/kernel_backends.py's "emu" back end; test_emulator.py checks its reports). Every CUDA thread is a fiber; a block's fibers run one at a time,
// each until its next synchronisation point (a warp collective, __syncwarp or __syncthreads), in an
// order drawn from a seeded generator, so a missing barrier shows up as a result that changes with the
// seed. What it checks beyond the results:
//   - every warp collective is reached by all 32 lanes of the warp (kernels pass the full mask), with
//     the same collective, and no lane has exited;
//   - a block that cannot make progress (a barrier some threads never reach) is a reported deadlock;
//   - launches respect the block size limits (1024 threads, __launch_bounds__), grid limits, and
//     48 KB of shared memory (static + dynamic);
//   - shared memory starts each block filled with a poison pattern, as real shared memory holds
//     whatever the last block left.
// What it does not model: the memory model beyond sequential consistency, timing, and fast-math
// contraction (nvcc fuses a*b+c where --fmad=true; the files that promise bit-exact results are
// built with --fmad=false, which this emulation matches).
//
// Compiled as host C++20 with -D__CUDA_ARCH__=900, so the sm_80+ branches of the kernels run.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---------------------------------------------------------------- vector and runtime types
struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t s = nullptr);

// ---------------------------------------------------------------- builtin variables
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

// The collectives a warp can meet at; all 32 lanes must name the same one.
enum class Op : int { kSyncwarp, kShflIdx, kShflXor, kShflUp, kShflDown, kAny, kAll, kBallot, kMatchAny,
                      kReduceMaxU, kReduceMinU, kReduceMaxI, kReduceMinI, kReduceAddI };

// Meets the warp at collective `op` with this lane's 64-bit value and argument (source lane, lane mask,
// delta); returns this lane's 64-bit result. Fails the launch unless mask is the full mask.
uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int arg);
void syncthreads();
[[noreturn]] void fail(const char* what);  // fails the running launch with a message

// Shared memory: the dynamic allocation of the running block, and the once-per-block poisoning of a
// static __shared__ array (the first thread to reach the declaration does it).
void* dynamic_smem();
void shared_decl(void* p, size_t bytes);

// ---- launches
struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  int max_threads;  // __launch_bounds__, or 1024
  const char* name;
};
using BlockBody = void (*)(void* ctx);
cudaError_t run_launch(const LaunchCfg& cfg, BlockBody body, void* ctx);

inline dim3 to_dim3(dim3 d) { return d; }
template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
inline dim3 to_dim3(I n) { return dim3(static_cast<unsigned>(n)); }

// `call` invokes the kernel on copies of the arguments (a launch copies them into its parameter
// buffer), so template arguments are deduced from them as at the original call.
template <typename Call, typename... A>
cudaError_t launch(const char* name, int max_threads, auto grid, auto block, size_t smem, cudaStream_t, Call call,
                   A&&... args) {
  struct Ctx {
    Call call;
    std::tuple<std::decay_t<A>...> args;
  } ctx{call, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
  const LaunchCfg cfg{to_dim3(grid), to_dim3(block), smem, max_threads, name};
  return run_launch(cfg, [](void* c) {
    auto* x = static_cast<Ctx*>(c);
    std::apply(x->call, x->args);
  }, &ctx);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

}  // namespace emu

// ---------------------------------------------------------------- intrinsics
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_collective(emu::Op::kSyncwarp, mask, 0, 0); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (width != 32) emu::fail("__shfl_sync: only width 32 is emulated");
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kShflIdx, mask, emu::to_bits(v), src));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) emu::fail("__shfl_xor_sync: only width 32 is emulated");
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kShflXor, mask, emu::to_bits(v), lane_mask));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) emu::fail("__shfl_up_sync: only width 32 is emulated");
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kShflUp, mask, emu::to_bits(v), int(delta)));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) emu::fail("__shfl_down_sync: only width 32 is emulated");
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kShflDown, mask, emu::to_bits(v), int(delta)));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(emu::warp_collective(emu::Op::kAny, mask, pred != 0, 0));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(emu::warp_collective(emu::Op::kAll, mask, pred != 0, 0));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(emu::warp_collective(emu::Op::kBallot, mask, pred != 0, 0));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "__match_any_sync: 32/64-bit ints");
  return unsigned(emu::warp_collective(emu::Op::kMatchAny, mask, emu::to_bits(v), 0));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return unsigned(emu::warp_collective(emu::Op::kReduceMaxU, mask, v, 0));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return unsigned(emu::warp_collective(emu::Op::kReduceMinU, mask, v, 0));
}
inline int __reduce_max_sync(unsigned mask, int v) {
  return int(emu::warp_collective(emu::Op::kReduceMaxI, mask, emu::to_bits(v), 0));
}
inline int __reduce_min_sync(unsigned mask, int v) {
  return int(emu::warp_collective(emu::Op::kReduceMinI, mask, emu::to_bits(v), 0));
}
inline int __reduce_add_sync(unsigned mask, int v) {
  return int(emu::warp_collective(emu::Op::kReduceAddI, mask, emu::to_bits(v), 0));
}

// Atomics: fibers never interleave inside one, so a plain read-modify-write is atomic. Floating-point
// atomics are refused at compile time: moe_ext's reductions must be deterministic.
template <typename T>
T atomicAdd(T* p, T v) {
  static_assert(std::is_integral_v<T>, "moe_ext kernels use no floating-point atomics (determinism)");
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old > v ? old : v;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = old < v ? old : v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __int_as_float(int v) { return emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline int __float_as_int(float v) { return static_cast<int>(emu::to_bits(v)); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return emu::from_bits<float>(v); }

// CUDA's global min/max overloads, for any mix of arithmetic types (the usual conversions).
template <typename A, typename B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ---------------------------------------------------------------- half and bfloat16
namespace emu {
// float -> 16-bit, round to nearest even (as __float2half_rn / __float2bfloat16_rn and c10 do).
uint16_t float_to_half_bits(float f);
float half_bits_to_float(uint16_t h);
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = static_cast<uint32_t>(to_bits(f));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return from_bits<float>(uint32_t(b) << 16); }
}  // namespace emu

// Conversions only: the kernels compute in float (AccOf) and never in 16-bit arithmetic.
namespace emu {
template <uint16_t (*Encode)(float), float (*Decode)(uint16_t)>
struct Bits16 {
  uint16_t bits;
  Bits16() = default;
  Bits16(float f) : bits(Encode(f)) {}
  Bits16(double f) : Bits16(static_cast<float>(f)) {}
  Bits16(int f) : Bits16(static_cast<float>(f)) {}
  operator float() const { return Decode(bits); }
};
}  // namespace emu
struct __half : emu::Bits16<emu::float_to_half_bits, emu::half_bits_to_float> {
  using Bits16::Bits16;
};
struct __nv_bfloat16 : emu::Bits16<emu::float_to_bf16_bits, emu::bf16_bits_to_float> {
  using Bits16::Bits16;
};
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
