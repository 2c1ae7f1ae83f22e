#include "memory.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace moe_ext {
namespace {

// Below this, freed blocks come back warm from glibc's heap anyway.
constexpr size_t kLargeBytes = size_t(32) << 20;
// A cached block serves a request up to 1/8 smaller (a batch with a few fewer tokens).
constexpr size_t kSlackDiv = 8;

size_t limit_from_env() {
  const char* v = std::getenv("MOE_EXT_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0,
              "moe_ext: MOE_EXT_CPU_CACHE_MB must be a whole number of MiB >= 0, got \"", v, "\"");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class LargeBlockCache final : public c10::Allocator {
 public:
  LargeBlockCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kLargeBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);
    Block* b = take(n);
    if (b == nullptr) b = new Block{c10::alloc_cpu(n), n};
    return {b->ptr, b, &LargeBlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, limit_, hits_, misses_};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [bytes, b] : free_) destroy(b);
    free_.clear();
    cached_ = 0;
  }

  static LargeBlockCache& get() {
    // Never destroyed: tensors that outlive static destruction still return their blocks here.
    static auto* cache = new LargeBlockCache();
    return *cache;
  }

 private:
  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(n);
    if (it == free_.end() || it->first - n > it->first / kSlackDiv) {
      ++misses_;
      return nullptr;
    }
    Block* b = it->second;
    free_.erase(it);
    cached_ -= b->bytes;
    ++hits_;
    return b;
  }

  void put(Block* b) {
    std::lock_guard<std::mutex> lock(mu_);
    // Make room by dropping the largest cached blocks; a block above the whole limit is not kept.
    while (cached_ + b->bytes > limit_ && !free_.empty()) {
      auto last = std::prev(free_.end());
      cached_ -= last->first;
      destroy(last->second);
      free_.erase(last);
    }
    if (cached_ + b->bytes > limit_) {
      destroy(b);
      return;
    }
    free_.emplace(b->bytes, b);
    cached_ += b->bytes;
  }

  static void destroy(Block* b) {
    c10::free_cpu(b->ptr);
    delete b;
  }

  static void release(void* ctx) { get().put(static_cast<Block*>(ctx)); }

  std::mutex mu_;
  std::multimap<size_t, Block*> free_;
  size_t cached_ = 0;
  const size_t limit_;
  size_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < kLargeBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &LargeBlockCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

CpuCacheStats cpu_cache_stats() { return LargeBlockCache::get().stats(); }

void empty_cpu_cache() { LargeBlockCache::get().clear(); }

}  // namespace moe_ext
