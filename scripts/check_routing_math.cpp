// Host check of two claims common/routing.h makes, which the CPU/GPU bit-identity rests on:
//  1. moe_exp's branch-free GPU form gives the CPU form's bits for every float (all 2^32 inputs);
//  2. ranks_before, written on rank_bits, is the order it documents (larger first, NaN after every
//     number, -0 equal to +0, ties to the lower id), for float and double, on special values and
//     random bit patterns; rank_value inverts rank_bits.
// Built and run by .ci/run:  g++ -O2 -std=c++20 -ffp-contract=off -fopenmp -Icsrc scripts/check_routing_math.cpp
#include <cstdio>
#include <cstring>

#include "common/routing.h"

using namespace moe_ext;

static float exp_gpu_form(float x) {  // the __CUDA_ARCH__ branch of moe_exp, compiled for the host
  const float v = moe_exp_in_range(x >= kExpLo && x <= kExpHi ? x : 0.f);
  return x != x ? x : (x > kExpHi ? INFINITY : (x < kExpLo ? 0.0f : v));
}

template <typename T>
static bool spec_before(T a, int ia, T b, int ib) {  // the documented order, on floats
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

int main() {
  long exp_bad = 0;
#pragma omp parallel for reduction(+ : exp_bad) schedule(static)
  for (long long hi = 0; hi < 65536; ++hi) {
    for (uint32_t lo = 0; lo < 65536; ++lo) {
      const uint32_t b = static_cast<uint32_t>(hi) << 16 | lo;
      float x;
      std::memcpy(&x, &b, 4);
      const float p = moe_exp(x), q = exp_gpu_form(x);
      uint32_t bp, bq;
      std::memcpy(&bp, &p, 4);
      std::memcpy(&bq, &q, 4);
      if (bp != bq && !(p != p && q != q)) ++exp_bad;
    }
  }
  const float sp[] = {0.f, -0.f, 1.f, -1.f, INFINITY, -INFINITY, NAN, -NAN, 1e-45f, -1e-45f, 3.4e38f, -3.4e38f, 0.5f};
  const int nsp = sizeof sp / sizeof sp[0];
  long rank_bad = 0;
  uint32_t s = 12345;
  const auto rnd = [&] { return s = s * 1664525u + 1013904223u; };
  for (int it = 0; it < 20000000; ++it) {
    float a, b;
    const uint32_t ra = rnd(), rb = rnd();
    if (it % 3 == 0) {
      a = sp[ra % nsp];
      b = sp[rb % nsp];
    } else {
      std::memcpy(&a, &ra, 4);
      if (it % 3 == 1) b = sp[rb % nsp]; else std::memcpy(&b, &rb, 4);
    }
    const int ia = rnd() % 4, ib = rnd() % 4;
    rank_bad += ranks_before(a, ia, b, ib) != spec_before(a, ia, b, ib);
    rank_bad += ranks_before(double(a), ia, double(b), ib) != spec_before(double(a), ia, double(b), ib);
    if (a == a) rank_bad += rank_value(rank_bits(a)) != a;
  }
  std::printf("check_routing_math: moe_exp forms differ on %ld floats; rank order wrong on %ld cases\n", exp_bad,
              rank_bad);
  return exp_bad || rank_bad ? 1 : 0;
}
