// The fiber scheduler behind emu.h: one launch at a time, one block at a time, one fiber per CUDA
// thread. On x86-64 fibers switch with six register pushes (swapcontext's signal-mask system call
// made it most of the emulation's time); elsewhere with ucontext. Errors (a broken collective, a
// deadlock, a bad launch) stop the launch; cudaGetLastError returns its code and emu_last_message()
// its message.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
// Saves the callee-saved registers on the current stack and its pointer in *from, then resumes the
// stack `to` (whose top holds the same six registers and a return address).
extern "C" void emu_switch(void** from, void* to);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch, .-emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#define EMU_ASM_SWITCH 0
#endif

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemLimit = 48 * 1024;  // without cudaFuncSetAttribute, which moe_ext never calls
constexpr int kMaxThreads = 1024;
constexpr unsigned char kPoison = 0xA5;   // shared memory's contents at the start of a block

enum class State { kRunnable, kAtWarp, kAtBarrier, kDone };

struct Thread {
#if EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;
  State state = State::kDone;
  uint3 idx;
  // the collective this thread waits at (warp_collective refuses partial masks)
  Op op = Op::kSyncwarp;
  uint64_t value = 0;
  int arg = 0;
  uint64_t result = 0;
};

struct Warp {
  int live = 0;     // lanes that have not exited
  int arrived = 0;  // lanes waiting at a collective
};

struct Runtime {
  std::vector<Thread> threads;  // the block's threads; stacks kept between blocks
  std::vector<Warp> warps;
  int nthreads = 0, live = 0, at_barrier = 0;
  int current = -1;
#if EMU_ASM_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  BlockBody body = nullptr;
  void* body_ctx = nullptr;
  std::vector<unsigned char> dyn_smem;
  std::vector<std::pair<void*, size_t>> shared_seen;  // static __shared__ arrays poisoned this block
  size_t static_smem = 0;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  bool failed = false;
  std::string message;
  const char* launch_name = "";
};

Runtime rt;
cudaError_t last_error = cudaSuccess;
std::string last_message;
uint64_t seed = 1;

uint64_t next_random() {  // xorshift64*
  rt.rng ^= rt.rng >> 12;
  rt.rng ^= rt.rng << 25;
  rt.rng ^= rt.rng >> 27;
  return rt.rng * 0x2545F4914F6CDD1Dull;
}

void set_failure(const std::string& what) {
  if (rt.failed) return;
  rt.failed = true;
  char where[160];
  const Thread& t = rt.threads[rt.current >= 0 ? rt.current : 0];
  std::snprintf(where, sizeof where, " [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]", rt.launch_name, blockIdx.x,
                blockIdx.y, blockIdx.z, t.idx.x, t.idx.y, t.idx.z);
  rt.message = what + where;
}

void yield_to_scheduler() {
#if EMU_ASM_SWITCH
  emu_switch(&rt.threads[rt.current].sp, rt.scheduler_sp);
#else
  swapcontext(&rt.threads[rt.current].ctx, &rt.scheduler);
#endif
}

void resume(Thread& t) {
#if EMU_ASM_SWITCH
  emu_switch(&rt.scheduler_sp, t.sp);
#else
  swapcontext(&rt.scheduler, &t.ctx);
#endif
}

const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncwarp: return "__syncwarp";
    case Op::kShflIdx: return "__shfl_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kMatchAny: return "__match_any_sync";
    case Op::kReduceMaxU: case Op::kReduceMaxI: return "__reduce_max_sync";
    case Op::kReduceMinU: case Op::kReduceMinI: return "__reduce_min_sync";
    case Op::kReduceAddI: return "__reduce_add_sync";
  }
  return "?";
}

// All of warp w's live lanes have arrived: check them and compute every lane's result.
void complete_warp(int w) {
  Thread* lane = &rt.threads[w * 32];
  const int n = std::min(32, rt.nthreads - w * 32);
  Warp& warp = rt.warps[w];
  warp.arrived = 0;
  Op op = Op::kSyncwarp;
  bool first = true;
  for (int l = 0; l < n; ++l) {
    if (lane[l].state != State::kAtWarp) continue;
    if (first) { op = lane[l].op; first = false; }
    if (lane[l].op != op) {
      rt.current = w * 32 + l;
      set_failure(std::string("divergent warp: lanes wait at ") + op_name(op) + " and at " + op_name(lane[l].op));
      return;
    }
  }
  const bool full = n == 32 && warp.live == 32;
  if (!full && op != Op::kSyncwarp) {
    set_failure(std::string(op_name(op)) + " with the full mask, but lanes of the warp have exited or do not exist");
    return;
  }
  uint64_t vals[32];
  for (int l = 0; l < n; ++l) vals[l] = lane[l].value;
  for (int l = 0; l < n; ++l) {
    Thread& t = lane[l];
    if (t.state != State::kAtWarp) continue;
    uint64_t r = 0;
    switch (op) {
      case Op::kSyncwarp: break;
      case Op::kShflIdx: r = vals[t.arg & 31]; break;
      case Op::kShflXor: r = vals[(l ^ t.arg) & 31]; break;
      case Op::kShflUp: r = l - t.arg >= 0 ? vals[l - t.arg] : vals[l]; break;
      case Op::kShflDown: r = l + t.arg < 32 ? vals[l + t.arg] : vals[l]; break;
      case Op::kAny: for (int i = 0; i < 32; ++i) r |= vals[i] != 0; break;
      case Op::kAll: r = 1; for (int i = 0; i < 32; ++i) r &= vals[i] != 0; break;
      case Op::kBallot: for (int i = 0; i < 32; ++i) r |= uint64_t(vals[i] != 0) << i; break;
      case Op::kMatchAny: for (int i = 0; i < 32; ++i) r |= uint64_t(vals[i] == vals[l]) << i; break;
      case Op::kReduceMaxU: r = vals[0]; for (int i = 1; i < 32; ++i) r = std::max<uint32_t>(r, vals[i]); break;
      case Op::kReduceMinU: r = vals[0]; for (int i = 1; i < 32; ++i) r = std::min<uint32_t>(r, vals[i]); break;
      case Op::kReduceMaxI: {
        int32_t m = int32_t(vals[0]);
        for (int i = 1; i < 32; ++i) m = std::max(m, int32_t(vals[i]));
        r = to_bits(m);
        break;
      }
      case Op::kReduceMinI: {
        int32_t m = int32_t(vals[0]);
        for (int i = 1; i < 32; ++i) m = std::min(m, int32_t(vals[i]));
        r = to_bits(m);
        break;
      }
      case Op::kReduceAddI: {
        uint32_t s = 0;
        for (int i = 0; i < 32; ++i) s += uint32_t(vals[i]);
        r = s;
        break;
      }
    }
    t.result = r;
    t.state = State::kRunnable;
  }
}

void maybe_release_barrier() {
  if (rt.at_barrier == 0 || rt.at_barrier < rt.live) return;
  rt.at_barrier = 0;
  for (int i = 0; i < rt.nthreads; ++i)
    if (rt.threads[i].state == State::kAtBarrier) rt.threads[i].state = State::kRunnable;
}

void maybe_complete_warp(int w) {
  const Warp& warp = rt.warps[w];
  if (warp.arrived > 0 && warp.arrived == warp.live) complete_warp(w);
}

void fiber_main() {
  rt.body(rt.body_ctx);
  Thread& t = rt.threads[rt.current];
  t.state = State::kDone;
  --rt.live;
  const int w = rt.current / 32;
  --rt.warps[w].live;
  maybe_complete_warp(w);
  maybe_release_barrier();
#if EMU_ASM_SWITCH
  yield_to_scheduler();  // never resumed
  std::abort();
#endif
  // with ucontext, returning resumes uc_link: the scheduler
}

std::string describe_deadlock() {
  std::string s = "deadlock: no thread can proceed;";
  int shown = 0;
  for (int w = 0; w < int(rt.warps.size()) && shown < 4; ++w) {
    int at_warp = 0, at_bar = 0, done = 0;
    Op op = Op::kSyncwarp;
    for (int l = 0; l < 32 && w * 32 + l < rt.nthreads; ++l) {
      const Thread& t = rt.threads[w * 32 + l];
      if (t.state == State::kAtWarp) { ++at_warp; op = t.op; }
      if (t.state == State::kAtBarrier) ++at_bar;
      if (t.state == State::kDone) ++done;
    }
    if (at_warp == 0) continue;
    char buf[160];
    std::snprintf(buf, sizeof buf, " warp %d: %d lanes at %s, %d at __syncthreads, %d exited;", w, at_warp,
                  op_name(op), at_bar, done);
    s += buf;
    ++shown;
  }
  return s;
}

void run_block(const LaunchCfg& cfg) {
  const int n = int(cfg.block.x * cfg.block.y * cfg.block.z);
  rt.nthreads = n;
  rt.live = n;
  rt.at_barrier = 0;
  if (int(rt.threads.size()) < n) rt.threads.resize(n);
  rt.warps.assign((n + 31) / 32, Warp{});
  for (int w = 0; w < int(rt.warps.size()); ++w) rt.warps[w].live = std::min(32, n - w * 32);
  std::fill(rt.dyn_smem.begin(), rt.dyn_smem.end(), kPoison);
  rt.shared_seen.clear();
  for (int i = 0; i < n; ++i) {
    Thread& t = rt.threads[i];
    if (t.stack == nullptr) {
      void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (mem == MAP_FAILED) std::abort();
      mprotect(mem, 4096, PROT_NONE);  // a guard page: a stack overflow faults instead of corrupting
      t.stack = static_cast<char*>(mem);
    }
#if EMU_ASM_SWITCH
    // the top of the stack as emu_switch leaves it: six zeroed registers, then fiber_main as the
    // return address, placed so that fiber_main starts with the ABI's alignment (rsp + 8 on 16)
    auto** top = reinterpret_cast<void**>(t.stack + kStackBytes - 16);
    top[0] = reinterpret_cast<void*>(&fiber_main);
    for (int r = 1; r <= 6; ++r) top[-r] = nullptr;
    t.sp = top - 6;
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &rt.scheduler;
    makecontext(&t.ctx, fiber_main, 0);
#endif
    t.idx.x = i % cfg.block.x;
    t.idx.y = i / cfg.block.x % cfg.block.y;
    t.idx.z = i / (cfg.block.x * cfg.block.y);
    t.state = State::kRunnable;
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  while (rt.live > 0 && !rt.failed) {
    // a fresh random order each round: which thread runs first between two barriers varies
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random() % (i + 1)]);
    bool progress = false;
    for (int i : order) {
      if (rt.failed) break;
      Thread& t = rt.threads[i];
      if (t.state != State::kRunnable) continue;
      rt.current = i;
      threadIdx = t.idx;
      resume(t);
      progress = true;
    }
    if (!progress && !rt.failed) set_failure(describe_deadlock());
  }
  rt.current = -1;
}

}  // namespace

uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int arg) {
  if (rt.current < 0) fail("warp collective outside a kernel");
  if (mask != 0xffffffffu) fail("only full-mask warp collectives are emulated");
  Thread& t = rt.threads[rt.current];
  t.op = op;
  t.value = value;
  t.arg = arg;
  t.state = State::kAtWarp;
  const int w = rt.current / 32;
  ++rt.warps[w].arrived;
  maybe_complete_warp(w);
  yield_to_scheduler();
  return rt.threads[rt.current].result;
}

void syncthreads() {
  if (rt.current < 0) fail("__syncthreads outside a kernel");
  rt.threads[rt.current].state = State::kAtBarrier;
  ++rt.at_barrier;
  maybe_release_barrier();
  yield_to_scheduler();
}

void fail(const char* what) {
  set_failure(what);
  if (rt.current >= 0) {
    // park this fiber for good; the scheduler sees the failure and ends the launch
    rt.threads[rt.current].state = State::kAtBarrier;
    for (;;) yield_to_scheduler();
  }
  std::fprintf(stderr, "emu: %s\n", what);
  std::abort();
}

void* dynamic_smem() { return rt.dyn_smem.data(); }

void shared_decl(void* p, size_t bytes) {
  for (const auto& s : rt.shared_seen)
    if (s.first == p) return;
  rt.shared_seen.emplace_back(p, bytes);
  rt.static_smem += bytes;
  std::memset(p, kPoison, bytes);
  if (rt.static_smem + rt.dyn_smem.size() > kSmemLimit) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "shared memory %zu B static + %zu B dynamic exceeds %zu B", rt.static_smem,
                  rt.dyn_smem.size(), kSmemLimit);
    fail(buf);
  }
}

cudaError_t run_launch(const LaunchCfg& cfg, BlockBody body, void* ctx) {
  char buf[256];
  const uint64_t threads = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  const auto refuse = [&](cudaError_t code, const char* why) {
    std::snprintf(buf, sizeof buf, "launch of %s refused: %s (grid %u,%u,%u; block %u,%u,%u; smem %zu)", cfg.name,
                  why, cfg.grid.x, cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem);
    if (last_error == cudaSuccess) { last_error = code; last_message = buf; }
    return code;
  };
  if (threads == 0 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0)
    return refuse(cudaErrorInvalidConfiguration, "an empty grid or block");
  if (threads > kMaxThreads || cfg.block.z > 64) return refuse(cudaErrorInvalidConfiguration, "block too large");
  if (threads > uint64_t(cfg.max_threads))
    return refuse(cudaErrorLaunchOutOfResources, "more threads than its __launch_bounds__");
  if (cfg.grid.y > 65535 || cfg.grid.z > 65535 || cfg.grid.x > 0x7fffffffu)
    return refuse(cudaErrorInvalidConfiguration, "grid too large");
  if (cfg.smem > kSmemLimit) return refuse(cudaErrorInvalidValue, "dynamic shared memory above 48 KB");
  rt.body = body;
  rt.body_ctx = ctx;
  rt.launch_name = cfg.name;
  rt.failed = false;
  rt.message.clear();
  rt.rng = seed * 0x9E3779B97F4A7C15ull + 1;
  rt.dyn_smem.assign(cfg.smem, kPoison);
  gridDim = cfg.grid;
  blockDim = cfg.block;
  for (unsigned z = 0; z < cfg.grid.z && !rt.failed; ++z)
    for (unsigned y = 0; y < cfg.grid.y && !rt.failed; ++y)
      for (unsigned x = 0; x < cfg.grid.x && !rt.failed; ++x) {
        blockIdx = uint3{x, y, z};
        rt.static_smem = 0;
        run_block(cfg);
      }
  if (rt.failed) {
    if (last_error == cudaSuccess) { last_error = cudaErrorLaunchFailure; last_message = rt.message; }
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

// ---- half
uint16_t float_to_half_bits(float f) {
  const uint32_t x = static_cast<uint32_t>(to_bits(f));
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), m * 2^-24
    const float a = from_bits<float>(ax);
    const float scaled = a * 16777216.0f;  // exact; nearbyint rounds half to even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  uint32_t m = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15, round to nearest even
  return static_cast<uint16_t>(sign | (m >> 13));
}

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  if (e == 31) return from_bits<float>(sign | 0x7f800000u | (m << 13));
  return from_bits<float>(sign | ((e + 112) << 23) | (m << 13));
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::last_error; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "CUDA emulation error"; }
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}

// The C interface the Python harness uses besides the launchers.
extern "C" {
void emu_set_seed(uint64_t s) { emu::seed = s; }
const char* emu_last_message() { return emu::last_message.c_str(); }
void emu_clear_error() {
  emu::last_error = cudaSuccess;
  emu::last_message.clear();
}
}
