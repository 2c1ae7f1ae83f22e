// Kernels with deliberate bugs, so tests/test_emulated_kernels.py can check that the emulation reports
// each kind it claims to (emu.h). Built into the emulation library with the real kernels.
#include <cuda_runtime.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// Warp 0 reads what warp 1 wrote, with (fixed) and without (racy) a barrier between.
__global__ void racy_kernel(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = int(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 32) % 64];
}
__global__ void fixed_kernel(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 32) % 64];
}

// A full-mask shuffle reached by half of the warp.
__global__ void partial_shfl_kernel(int* out) {
  int v = int(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_sync(kFull, v, 0);
  out[threadIdx.x] = v;
}

// Half of each warp waits at the block barrier, the other half at a shuffle: neither completes.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_sync(kFull, 1, 0);
  }
}

__global__ void oob_write_kernel(int* out, int n) {
  if (threadIdx.x == 0) out[n] = 1;  // one past the end
}

// Reads shared memory nobody wrote: the poison pattern.
__global__ void uninit_shared_kernel(unsigned* out) {
  __shared__ unsigned s[64];
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

}  // namespace

extern "C" int emu_selftest(int which, int* out, int n, int threads) {
  switch (which) {
    case 0: racy_kernel<<<1, threads>>>(out); break;
    case 1: fixed_kernel<<<1, threads>>>(out); break;
    case 2: partial_shfl_kernel<<<1, threads>>>(out); break;
    case 3: deadlock_kernel<<<1, threads>>>(out); break;
    case 4: oob_write_kernel<<<1, threads>>>(out, n); break;
    case 5: uninit_shared_kernel<<<1, threads>>>(reinterpret_cast<unsigned*>(out)); break;
    case 6: bounded_kernel<<<1, threads>>>(out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
