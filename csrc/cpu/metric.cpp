// Metric path ops on the CPU (DESIGN §2.3, §2.4): path sampling and the fused Euler step.
// OpenMP threads over tokens; the loops over codes vectorize (kernels.h).
#include "codes.h"

namespace ursa {
namespace cpu {
namespace URSA_ISA {
namespace {

// Kinetic-optimal weights of one block: g = exp(−β d), w = g·max(d0 − d, 0) with w(z0) = 0;
// returns Σ g and Σ w (float, vectorized), w written for the destination rescan.
inline void metric_weights(const float* d, int64_t n, float beta, float d0, int z0r, float* w, float& gsum,
                           float& wsum) {
  float gs = 0.0f, ws = 0.0f;
  const int nn = static_cast<int>(n);
#pragma omp simd reduction(+ : gs, ws)
  for (int y = 0; y < nn; ++y) {
    const float g = fast_exp(-beta * d[y]);
    const float gap = d0 - d[y];
    float wv = g * (gap > 0.0f ? gap : 0.0f);
    wv = y == z0r ? 0.0f : wv;
    w[y] = wv;
    gs += g;
    ws += wv;
  }
  gsum = gs;
  wsum = ws;
}

// The move of one token with x̂1 = j ≠ z0: Z = Σ exp(−βd), S = Σ w over the codebook (block
// sums kept), λ = β̇·S/Z, jump iff u1 < 1 − exp(−hλ), destination by the inverse CDF of w with
// u2: find the block, rescan it alone.
template <class C>
int64_t metric_move(C& c, int64_t K, int64_t z0, int64_t j, float beta, double beta_dot, double h,
                    float u1, float u2, Scratch& s) {
  c.target(j);
  const int64_t B = c.block(), blocks = (K + B - 1) / B;
  float* d = s.buf.data();
  float* w = s.aux.data();
  float d0;
  {  // d(z0, j) exactly as the block pass computes it, so that w(z0) = 0 is consistent
    const int64_t k0 = z0 / B * B;
    c.distances(k0, std::min(B, K - k0), d);
    d0 = d[z0 - k0];
  }
  double Z = 0.0, S = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * B, n = std::min(B, K - k0);
    c.distances(k0, n, d);
    float gs, ws;
    metric_weights(d, n, beta, d0, local_index(z0, k0, n), w, gs, ws);
    s.bweight[b] = ws;
    Z += gs;
    S += ws;
  }
  const double lam = beta_dot * S / Z;
  if (!(lam > 0.0) || !(static_cast<double>(u1) < -std::expm1(-h * lam))) return z0;
  const double target = static_cast<double>(u2) * S;
  double before = 0.0;
  const int64_t b = find_block(s.bweight.data(), blocks, target, before);
  if (b < 0) return z0;
  const int64_t k0 = b * B, n = std::min(B, K - k0);
  c.distances(k0, n, d);
  float gs, ws;
  metric_weights(d, n, beta, d0, local_index(z0, k0, n), w, gs, ws);
  const int64_t jj = scan_block(w, n, before, target);
  return jj < 0 ? z0 : k0 + jj;
}

template <class Load, typename T, class C>
void metric_step_loop(const StepArgs& a, const C& proto) {
  const int64_t K = a.K;
  const int64_t step = a.rng.step ? *a.rng.step : 0;
  const float beta = a.params[P_BETA];
  const double beta_dot = a.params[P_BETA_DOT], h = a.params[P_H];
  const int64_t B = proto.block();
  const int64_t blocks = (K + std::min(B, kLogitBlock) - 1) / std::min(B, kLogitBlock);
#pragma omp parallel num_threads(threads(a.n_threads))
  {
    Scratch s(std::max(B, kLogitBlock), blocks);
    C c = proto;
    std::vector<float> cs(c.scratch_size() + 1);
    c.set_scratch(cs.data());
    int32_t bits = 0;
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < a.D; ++i) {
      const Words r = rng_words(a.rng, i, step, TAG_STEP);
      const int64_t z0 = a.x[i];
      if (a.error != nullptr) bits |= id_errors(a, i);
      const int64_t j = token_x1<Load, T>(a, i, to_uniform(r.w[LANE_DRAW]), s, bits);
      if (a.last) {
        a.out[i] = j;
      } else if (j == z0 || !in_range(z0, K) || !in_range(j, K)) {  // (bad ids: flagged, never addresses)
        a.out[i] = z0;  // λ = 0: the codebook pass is skipped
      } else {
        a.out[i] = metric_move(c, K, z0, j, beta, beta_dot, h, to_uniform(r.w[LANE_JUMP]),
                               to_uniform(r.w[LANE_DEST]), s);
      }
    }
    if (a.error != nullptr) error_or(a.error, bits);
  }
}

}  // namespace

std::string metric_step(const StepArgs& a) {
  if (a.D == 0) return "";
  if (a.last) return token_step(a, [](int64_t, float) { return true; });  // x̂1 itself: no codebook
  with_codes(a.codes, [&](const auto& proto) {
    with_dtype(a.logits.dtype, [&](auto load, auto ptr) {
      using Load = decltype(load);
      using T = std::remove_const_t<std::remove_pointer_t<decltype(ptr)>>;
      metric_step_loop<Load, T>(a, proto);
    });
  });
  return "";
}

std::string metric_sample(const PathArgs& a) {
  if (a.D == 0) return "";
  with_codes(a.codes, [&](const auto& proto) {
    using C = std::decay_t<decltype(proto)>;
    const int64_t B = proto.block(), K = a.K;
#pragma omp parallel num_threads(threads(a.n_threads))
    {
      Scratch s(B, (K + B - 1) / B);
      C c = proto;
      std::vector<float> cs(c.scratch_size() + 1);
      c.set_scratch(cs.data());
#pragma omp for schedule(dynamic, 4)
      for (int64_t i = 0; i < a.D; ++i) {
        const int64_t x1 = a.x1[i];
        const float beta = a.value[i];
        if (!std::isfinite(beta) || x1 < 0 || x1 >= K) {  // t = 1: x_t = x1 (invalid x1: left as is)
          a.out[i] = x1;
          continue;
        }
        const Words r = rng_words(a.rng, i, 0, TAG_PATH);
        c.target(x1);
        const auto logits = [&](int64_t k0, int64_t n, float* buf) {
          c.distances(k0, n, buf);
          float m = kNegInf;
#pragma omp simd reduction(max : m)
          for (int64_t y = 0; y < n; ++y) {
            buf[y] = -beta * buf[y];
            m = buf[y] > m ? buf[y] : m;
          }
          return m;
        };
        a.out[i] = draw_softmax(logits, K, B, to_uniform(r.w[LANE_DRAW]), s);
      }
    }
  });
  return "";
}

}  // namespace URSA_ISA
}  // namespace cpu
}  // namespace ursa
