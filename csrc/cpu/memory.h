// Allocation of the large outputs of the CPU ops: a small cache of freed large blocks.
//
// glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each large
// output of an op (an expert FFN's [T*k, 2F] activations, its [E, 2F, H] weight gradient) is
// first-touch faulted in 4 KiB at a time on every call: about 17 ms per 64 MiB here, 8-10% of a
// Mixtral block's forward+backward on 2 cores. Blocks of 32 MiB or more that moe_ext allocated are
// kept when freed (up to MOE_EXT_CPU_CACHE_MB, read at the first large allocation: default 1024, 0
// turns the cache off) and handed back to the next output of the same size or up to 1/8 smaller;
// smaller outputs go to torch's CPU allocator unchanged.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace moe_ext {

// at::empty on the CPU, through the cache for large sizes.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct CpuCacheStats {
  size_t cached_bytes;  // freed blocks held for reuse
  size_t limit_bytes;   // MOE_EXT_CPU_CACHE_MB
  size_t hits;          // large allocations served from the cache
  size_t misses;        // large allocations that went to the system
};
CpuCacheStats cpu_cache_stats();
// Frees every cached block (blocks in use return to the cache when their tensors die).
void empty_cpu_cache();

}  // namespace moe_ext
