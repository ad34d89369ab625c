// CPU building blocks of the sampler ops: logits conversion, a vectorizable exp, the streaming
// inverse-CDF draw, the error checks and the step loop over tokens (the codebooks are in
// codes.h). Included by every csrc/cpu/*.cpp, which CMake compiles once per instruction set
// (namespace URSA_ISA: base, avx2, avx512).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "ursa/ops.h"

#ifndef URSA_ISA
#define URSA_ISA base
#endif

namespace ursa {
namespace cpu {
namespace URSA_ISA {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kLogitBlock = 1024;  // codes per block of the streaming draw

template <typename To, typename From>
inline To bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
  return __builtin_bit_cast(To, v);
}

// ----------------------------------------------------------------------------- numbers
struct BF16 {
  static float get(const uint16_t* p, int64_t j) { return bits<float>(static_cast<uint32_t>(p[j]) << 16); }
};
struct F16 {  // IEEE half -> float by bit manipulation (branch-free, handles subnormals/inf/NaN)
  static float get(const uint16_t* p, int64_t j) {
    const uint32_t w = static_cast<uint32_t>(p[j]) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits<float>((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t mag = two_w < (1u << 27) ? bits<uint32_t>(denormalized) : bits<uint32_t>(normalized);
    return bits<float>(sign | mag);
  }
};
struct F32 {
  static float get(const float* p, int64_t j) { return p[j]; }
};

// exp(x) for x <= 0 (the only arguments here: z − max z and −β·d), ~1 ulp (Cephes expf), 0
// below −87 and for −inf. Plain arithmetic and bit casts, so loops over it vectorize.
inline float fast_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest by the 1.5·2^23 trick
  const float fn = t - 12582912.0f;
  const int32_t n = bits<int32_t>(t) - 0x4B400000;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float res = p * bits<float>((n + 127) << 23);
  return x < -87.0f ? 0.0f : res;
}

// ----------------------------------------------------------------------------- logits
inline float block_max(const float* v, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

// z = (u + s·(c − u)) / T for one token's row, block [k0, k0 + n) written to buf.
template <class Load, typename T>
struct GuidedRow {
  const T* cond;
  const T* uncond;  // null: no guidance
  float scale, temperature;
  int64_t exclude;  // −1: none
  bool* suspect = nullptr;  // set when z at `exclude` (overwritten by −inf) is NaN or +inf

  // Writes the block and returns its max (one pass: the draw's block max comes for free).
  float operator()(int64_t k0, int64_t n, float* buf) const {
    const T* c = cond + k0;
    const T* u = uncond != nullptr ? uncond + k0 : nullptr;
    const float s = scale, tt = temperature;
    const auto run = [&](auto guided, auto tempered) {
      float m = kNegInf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) {
        float z = Load::get(c, j);
        if constexpr (decltype(guided)::value) {
          const float uv = Load::get(u, j);
          z = (z == uv) ? z : uv + s * (z - uv);  // c == u (e.g. both -inf) stays: no NaN
        }
        if constexpr (decltype(tempered)::value) z = z / tt;
        buf[j] = z;
        m = z > m ? z : m;
      }
      return m;
    };
    float m;
    if (u != nullptr) {
      m = tt != 1.0f ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    } else {
      m = tt != 1.0f ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
    }
    if (exclude >= k0 && exclude < k0 + n) {
      if (suspect != nullptr && !(buf[exclude - k0] < std::numeric_limits<float>::infinity())) *suspect = true;
      buf[exclude - k0] = kNegInf;
      m = block_max(buf, n);
    }
    return m;
  }
};

// ----------------------------------------------------------------------------- draws
struct Scratch {
  std::vector<float> buf, aux, aux2;
  std::vector<float> bmax, bsum;
  std::vector<double> bweight;
  bool suspect = false;  // the last checked draw met a row that needs the exact check
  explicit Scratch(int64_t block, int64_t blocks)
      : buf(block), aux(block), aux2(block), bmax(blocks), bsum(blocks), bweight(blocks) {}
};

// Σ exp(v − m).
inline float block_expsum(const float* v, int64_t n, float m) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fast_exp(v[j] - m);
  return s;
}

// Σ exp(v − m), with e[j] = exp(v[j] − m) written.
inline float block_expsum(const float* v, int64_t n, float m, float* e) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float x = fast_exp(v[j] - m);
    e[j] = x;
    s += x;
  }
  return s;
}

// Smallest j of [0, n) with base + Σ_{i<=j} w_i > target (sequential, double); else the last
// positive weight (a float tie: the block sums said the crossing is here); −1 if all zero.
inline int64_t scan_block(const float* w, int64_t n, double base, double target) {
  double cum = base;
  int64_t last_pos = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (w[j] > 0.0f) last_pos = j;
    cum += static_cast<double>(w[j]);
    if (cum > target && w[j] > 0.0f) return j;
  }
  return last_pos;
}

// The smallest block b with Σ_{c<=b} weight_c > target; else the last positive block.
inline int64_t find_block(const double* weight, int64_t blocks, double target, double& before) {
  double cum = 0.0;
  int64_t last_pos = -1;
  double last_before = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (weight[b] > 0.0) {
      last_pos = b;
      last_before = cum;
    }
    if (cum + weight[b] > target && weight[b] > 0.0) {
      before = cum;
      return b;
    }
    cum += weight[b];
  }
  before = last_before;
  return last_pos;
}

inline bool any_nan(const float* v, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) bad |= v[j] != v[j];
  return bad != 0;
}

// Inverse-CDF draw from softmax(z) with z streamed by `fill(k0, n, buf) -> max` (§2.5): one pass
// keeps each block's max and Σ exp(z − max); the block crossing u·W is then rescanned alone.
// With `check`, s.suspect tells whether the row may hold NaN / +inf or no finite z, at no cost
// per element: a NaN or +inf z makes its block's Σ exp(z − max) NaN, a block whose max is −inf
// is scanned for NaN, an all −inf row has max −inf. The caller then classifies the raw values.
template <class Fill>
int64_t draw_softmax(const Fill& fill, int64_t K, int64_t block, float u, Scratch& s, bool check = false) {
  const int64_t blocks = (K + block - 1) / block;
  float gmax = kNegInf;
  bool suspect = false;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * block, n = std::min(block, K - k0);
    const float m = fill(k0, n, s.buf.data());
    s.bmax[b] = m;
    s.bsum[b] = m == kNegInf ? 0.0f : block_expsum(s.buf.data(), n, m);
    if (check) suspect |= m == kNegInf ? any_nan(s.buf.data(), n) : !(s.bsum[b] == s.bsum[b]);
    gmax = std::max(gmax, m);
  }
  if (check && (suspect || gmax == kNegInf)) s.suspect = true;
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    s.bweight[b] = s.bsum[b] > 0.0f ? s.bsum[b] * std::exp(static_cast<double>(s.bmax[b]) - gmax) : 0.0;
    total += s.bweight[b];
  }
  const double target = static_cast<double>(u) * total;
  double before = 0.0;
  const int64_t b = find_block(s.bweight.data(), blocks, target, before);
  if (b < 0) return 0;  // no finite logit: not reachable with validated inputs
  const int64_t k0 = b * block, n = std::min(block, K - k0);
  fill(k0, n, s.buf.data());
  block_expsum(s.buf.data(), n, s.bmax[b], s.aux.data());
  const double scale = std::exp(static_cast<double>(s.bmax[b]) - gmax);
  const int64_t j = scan_block(s.aux.data(), n, before / scale, target / scale);
  return k0 + std::max<int64_t>(j, 0);
}

// argmax z (first index of the maximum), streamed like draw_softmax.
template <class Fill>
int64_t argmax_stream(const Fill& fill, int64_t K, int64_t block, Scratch& s) {
  float best = kNegInf;
  int64_t arg = 0;
  for (int64_t k0 = 0; k0 < K; k0 += block) {
    const int64_t n = std::min(block, K - k0);
    const float m = fill(k0, n, s.buf.data());
    if (m > best) {
      best = m;
      for (int64_t j = 0; j < n; ++j) {
        if (s.buf[j] == m) {
          arg = k0 + j;
          break;
        }
      }
    }
  }
  return arg;
}

// f(Load{}, (const T*)nullptr) for the logits dtype.
template <class F>
void with_dtype(int dtype, F&& f) {
  if (dtype == DTYPE_BF16) {
    f(BF16{}, static_cast<const uint16_t*>(nullptr));
  } else if (dtype == DTYPE_F16) {
    f(F16{}, static_cast<const uint16_t*>(nullptr));
  } else {
    f(F32{}, static_cast<const float*>(nullptr));
  }
}

inline int threads(int n) { return n > 0 ? n : omp_get_max_threads(); }

// ----------------------------------------------------------------------------- errors (errors.h)
inline void error_or(int32_t* error, int32_t bits) {
  if (bits != 0) __atomic_fetch_or(error, bits, __ATOMIC_RELAXED);
}

// The ERR_* bits of one row of raw logits: NaN, +inf, every value −inf (exact, vectorized).
template <class Load, typename T>
int32_t value_errors(const T* p, int64_t K, int32_t nan_bit, int32_t posinf_bit, int32_t all_neginf_bit) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  int nan = 0, posinf = 0, above = 0;
#pragma omp simd reduction(| : nan, posinf, above)
  for (int64_t j = 0; j < K; ++j) {
    const float v = Load::get(p, j);
    nan |= v != v;
    posinf |= v == inf;
    above |= v != -inf;  // NaN counts as "not −inf", as torch's (z == −inf).all() does
  }
  return (nan ? nan_bit : 0) | (posinf ? posinf_bit : 0) | (above ? 0 : all_neginf_bit);
}

template <class Load, typename T>
int32_t row_errors(const GuidedRow<Load, T>& row, int64_t K) {
  int32_t e = value_errors<Load>(row.cond, K, ERR_COND_NAN, ERR_COND_POSINF, ERR_COND_ALL_NEGINF);
  if (row.uncond != nullptr) e |= value_errors<Load>(row.uncond, K, ERR_UNCOND_NAN, ERR_UNCOND_POSINF,
                                                      ERR_UNCOND_ALL_NEGINF);
  return e;
}

// ERR_X_RANGE / ERR_X1_RANGE of token i.
inline int32_t id_errors(const StepArgs& a, int64_t i) {
  int32_t e = in_range(a.x[i], a.K) ? 0 : ERR_X_RANGE;
  if (a.x1 != nullptr && !in_range(a.x1[i], a.K)) e |= ERR_X1_RANGE;
  return e;
}

// x̂1 of token i: the given one, else drawn with uniform u from its guided logits (argmax on an
// argmax last step). Checking, the raw logits of a row the draw flagged (or of every argmax
// row) are classified into `bits`: normal rows cost nothing more than the draw.
template <class Load, typename T>
int64_t token_x1(const StepArgs& a, int64_t i, float u, Scratch& s, int32_t& bits) {
  if (a.x1 != nullptr) return a.x1[i];
  const Logits& L = a.logits;
  const bool check = a.error != nullptr && a.check_logits;
  s.suspect = false;
  const GuidedRow<Load, T> row{static_cast<const T*>(L.cond) + i * L.cond_stride,
                               L.uncond ? static_cast<const T*>(L.uncond) + i * L.uncond_stride : nullptr,
                               L.scale, L.temperature, L.exclude, check ? &s.suspect : nullptr};
  int64_t j;
  if (a.last && a.argmax_last) {
    j = argmax_stream(row, a.K, kLogitBlock, s);
    s.suspect = check;
  } else {
    j = draw_softmax(row, a.K, kLogitBlock, u, s, check);
  }
  if (s.suspect) bits |= row_errors(row, a.K);
  return j;
}

// ----------------------------------------------------------------------------- steps
// For each token: `decide(z0, u1)` says whether it takes x̂1 (else it keeps z0, and its logits
// are never read); x̂1 is the given one or drawn from the guided logits (token_x1).
template <class Load, typename T, class Decide>
void token_step_loop(const StepArgs& a, Decide decide) {
  const int64_t step = a.rng.step ? *a.rng.step : 0;
  const int64_t blocks = a.x1 != nullptr ? 1 : (a.K + kLogitBlock - 1) / kLogitBlock;  // (x1: K may be unknown)
#pragma omp parallel num_threads(threads(a.n_threads))
  {
    Scratch s(kLogitBlock, blocks);
    int32_t bits = 0;
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < a.D; ++i) {
      const Words r = rng_words(a.rng, i, step, TAG_STEP);
      const int64_t z0 = a.x[i];
      if (a.error != nullptr) bits |= id_errors(a, i);
      a.out[i] = decide(z0, to_uniform(r.w[LANE_JUMP])) ? token_x1<Load, T>(a, i, to_uniform(r.w[LANE_DRAW]), s, bits)
                                                         : z0;
    }
    if (a.error != nullptr) error_or(a.error, bits);
  }
}

template <class Decide>
std::string token_step(const StepArgs& a, Decide decide) {
  if (a.D == 0) return "";
  with_dtype(a.logits.dtype, [&](auto load, auto ptr) {
    using Load = decltype(load);
    using T = std::remove_const_t<std::remove_pointer_t<decltype(ptr)>>;
    token_step_loop<Load, T>(a, decide);
  });
  return "";
}

}  // namespace URSA_ISA
}  // namespace cpu
}  // namespace ursa
