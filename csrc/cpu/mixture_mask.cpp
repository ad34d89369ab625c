// Uniform-mixture and masked path ops on the CPU (DESIGN §2.3, §2.4). A step draws x̂1 only
// for tokens whose result depends on it (jumping / unmasking ones, every token on the last
// step): the others keep their token and never read their logits.
#include "kernels.h"

namespace ursa {
namespace cpu {
namespace URSA_ISA {
// Jump to x̂1 with probability 1 − exp(−h·κ̇/(1−κ)) (lane 1); the last step returns x̂1.
std::string mixture_step(const StepArgs& a) {
  const double jump = -std::expm1(-static_cast<double>(a.params[P_H]) * static_cast<double>(a.params[P_RATE]));
  const bool last = a.last;
  return token_step(a, [=](int64_t, float u1) { return last || static_cast<double>(u1) < jump; });
}

// A masked token becomes x̂1 (never the mask) with probability min(1, h·κ̇/(1−κ)); every masked
// token on the last step; unmasked tokens stay.
std::string mask_step(const StepArgs& a) {
  const double unmask = std::min(1.0, static_cast<double>(a.params[P_H]) * static_cast<double>(a.params[P_RATE]));
  const bool last = a.last;
  const int64_t mask_id = a.mask_id;
  return token_step(a, [=](int64_t z0, float u1) {
    return z0 == mask_id && (last || static_cast<double>(u1) < unmask);
  });
}

// x_t = x1 with probability κ (lane 1), else a uniform code (lane 2).
std::string mixture_sample(const PathArgs& a) {
#pragma omp parallel for num_threads(threads(a.n_threads)) schedule(static) if (a.D > 4096)
  for (int64_t i = 0; i < a.D; ++i) {
    const Words r = rng_words(a.rng, i, 0, TAG_PATH);
    a.out[i] = to_uniform(r.w[LANE_JUMP]) < a.value[i] ? a.x1[i] : to_below(r.w[LANE_DEST], a.K);
  }
  return "";
}

// x_t = x1 with probability κ (lane 1), else the mask id.
std::string mask_sample(const PathArgs& a) {
#pragma omp parallel for num_threads(threads(a.n_threads)) schedule(static) if (a.D > 4096)
  for (int64_t i = 0; i < a.D; ++i) {
    const Words r = rng_words(a.rng, i, 0, TAG_PATH);
    a.out[i] = to_uniform(r.w[LANE_JUMP]) < a.value[i] ? a.x1[i] : a.mask_id;
  }
  return "";
}

}  // namespace URSA_ISA
}  // namespace cpu
}  // namespace ursa
