// The core of both float exps (routing.h moe_exp, activation.h act_exp): exp(x - n ln2) for an
// integer-valued n with |x - n ln2| <= ln2 / 2, by Cody-Waite reduction and the Cephes polynomial
// (about 1 ulp). Only + - * in a fixed order, so the routing exp rounds the same on CPU and GPU.
#pragma once

#include "macros.h"

namespace moe_ext {

MOE_HD float exp_of_reduced(float x, float n) {
  float r = x - n * 0.693359375f;  // ln2 split so that n * hi is exact for |n| <= 151
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  return q * (r * r) + r + 1.0f;
}

}  // namespace moe_ext
