// Codebook geometry shared by the CPU and CUDA kernels (DESIGN §2.1).
//
//   ê = e / max(||e||, eps),  eps = 1e-5
//   d(x, y) = max(||ê_x||² + ||ê_y||² − 2 ê_x·ê_y, 0),  d(x, x) = 0 exactly,  d^2 for power 4
// An FSQ code is implicit: index i has mixed-radix digits (first level fastest), digit q of a
// level L maps to (q − L/2) / (L/2). Kernels either read the normalized (K, m) table or, for
// FSQ, rebuild ê from the index (no table traffic).
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"  // URSA_HD

namespace ursa {

constexpr float kNormEps = 1e-5f;
constexpr int kMaxLevels = 16;  // FSQ levels handled from the index

// Distance from its parts; `same` (x == y) forces the exact zero of the contract.
URSA_HD float combine_distance(float sq_x, float sq_y, float dot, bool same, int power) {
  float d = (sq_x + sq_y) - 2.0f * dot;
  d = d > 0.0f ? d : 0.0f;
  d = same ? 0.0f : d;
  return power == 4 ? d * d : d;
}

// Digit value of FSQ level L: (q − L/2) / (L/2).
URSA_HD float fsq_value(int64_t q, int64_t level) {
  const int64_t half = level / 2;
  return static_cast<float>(q - half) / static_cast<float>(half);
}

// Inverse norm with the clamp of the contract: 1 / max(sqrt(sq), eps).
URSA_HD float inv_norm(float sq) {
  const float n = sqrtf(sq);
  return 1.0f / (n > kNormEps ? n : kNormEps);
}

// ê of FSQ code `index` written to out[0..m), and ||ê||² returned.
URSA_HD float fsq_normalized(int64_t index, const int32_t* levels, int m, float* out) {
  float sq = 0.0f;
  for (int l = 0; l < m; ++l) {
    const float v = fsq_value(index % levels[l], levels[l]);
    index /= levels[l];
    out[l] = v;
    sq += v * v;
  }
  const float inv = inv_norm(sq);
  float sq_hat = 0.0f;
  for (int l = 0; l < m; ++l) {
    out[l] *= inv;
    sq_hat += out[l] * out[l];
  }
  return sq_hat;
}

}  // namespace ursa
