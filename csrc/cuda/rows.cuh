// Row-copy helpers shared by permute.cu and unpermute.cu: packed accesses, and the split of each
// token's row into slices so that enough warps are in flight when there are few tokens.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda_utils.cuh"

namespace moe_ext::cuda {

constexpr int kRowWarps = 8;               // warps per block of the row kernels
constexpr int64_t kRowTargetWarps = 4096;  // slice rows until about this many warps run
constexpr int kSharedSlots = 32;           // a token's k rows (and weights) staged in shared memory up to this k

// A row access of N elements of T at once (N * sizeof(T) = 16 when the rows are 16-byte aligned).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Vector width in elements: 16 bytes when every row start is 16-byte aligned, else 1.
template <typename T>
constexpr int vec16() { return 16 / sizeof(T); }

// Each token's row of `units` accesses as `slices` slices of slice_units (whole 32-unit chunks): as
// many as it takes to put about kRowTargetWarps warps (one per token and slice) in flight.
struct RowSlices {
  int64_t slices;
  int64_t slice_units;
};

inline RowSlices row_slices(int64_t T, int64_t units) {
  const int64_t chunks = std::max<int64_t>((units + 31) / 32, 1);
  const int64_t want = (kRowTargetWarps + std::max<int64_t>(T, 1) - 1) / std::max<int64_t>(T, 1);
  const int64_t slices0 = std::clamp<int64_t>(want, 1, chunks);
  const int64_t slice_units = (chunks + slices0 - 1) / slices0 * 32;
  return {std::max<int64_t>((units + slice_units - 1) / slice_units, 1), slice_units};
}

}  // namespace moe_ext::cuda
