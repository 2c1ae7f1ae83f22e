#include "gemm_tile.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace moe_ext {
namespace {

int initial_tile() {
  const char* env = std::getenv("MOE_EXT_SM90_TILE");
  if (env == nullptr || *env == '\0') return static_cast<int>(GemmTile::kAuto);
  return static_cast<int>(parse_gemm_tile(env, "the environment variable MOE_EXT_SM90_TILE"));
}

// A function-local static: the environment is read at the first use, and a bad value raises there
// (from an op call or moe_ext.sm90_gemm_tile()), not while the module loads.
std::atomic<int>& tile_setting() {
  static std::atomic<int> tile{initial_tile()};
  return tile;
}

thread_local const char* last_kernel = "";

}  // namespace

GemmTile sm90_gemm_tile() { return static_cast<GemmTile>(tile_setting().load(std::memory_order_relaxed)); }

void set_sm90_gemm_tile(GemmTile tile) { tile_setting().store(static_cast<int>(tile), std::memory_order_relaxed); }

GemmTile parse_gemm_tile(const std::string& value, const char* what) {
  if (value == "auto") return GemmTile::kAuto;
  if (value == "128x128") return GemmTile::k128x128;
  if (value == "128x256") return GemmTile::k128x256;
  TORCH_CHECK_VALUE(false, "moe_ext: ", what, " must be 'auto', '128x128' or '128x256', got '", value, "'");
  return GemmTile::kAuto;
}

const char* gemm_tile_name(GemmTile tile) {
  switch (tile) {
    case GemmTile::k128x128: return "128x128";
    case GemmTile::k128x256: return "128x256";
    default: return "auto";
  }
}

void note_grouped_gemm_kernel(const char* name) { last_kernel = name; }

const char* last_grouped_gemm_kernel() { return last_kernel; }

}  // namespace moe_ext
