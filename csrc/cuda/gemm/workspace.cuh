// Shared by the CUTLASS launchers: carving one workspace buffer into 256-byte-aligned arrays, and the
// clamped row range of one expert.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe_ext {
namespace gemm {

// With base == nullptr it only measures (used for the workspace size the host allocates).
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += round_up(size_t(count) * sizeof(T));
    return p;
  }
  void* take_bytes(size_t bytes) { return take<char>(int64_t(bytes)); }
  size_t size() const { return used_; }
  static size_t round_up(size_t n) { return (n + 255) / 256 * 256; }

 private:
  char* base_;
  size_t used_ = 0;
};

struct ExpertRows {
  int64_t begin;
  int64_t count;
};

// Rows [offsets[e], offsets[e+1]) clamped to [0, M]. Offsets are not validated on CUDA (that would
// need a sync), so a bad offsets tensor gives wrong numbers, never out-of-bounds accesses.
__device__ __forceinline__ ExpertRows expert_rows(const int64_t* offsets, int64_t e, int64_t M) {
  int64_t lo = offsets[e], hi = offsets[e + 1];
  lo = lo < 0 ? 0 : (lo > M ? M : lo);
  hi = hi < lo ? lo : (hi > M ? M : hi);
  return {lo, hi - lo};
}

}  // namespace gemm
}  // namespace moe_ext
