// CPU codebooks of the metric ops (DESIGN §2.1): the distances d(x̂1, y) for a block of codes
// y, from the normalized table (transposed for small m, row-major for large m) or, for FSQ,
// rebuilt from the index. Part of the per-ISA kernels (see kernels.h).
#pragma once

#include "kernels.h"

namespace ursa {
namespace cpu {
namespace URSA_ISA {

// ----------------------------------------------------------------------------- codebooks
// Index of `j` inside the block [k0, k0 + n), or −1: 32-bit lane compares in the loops.
inline int local_index(int64_t j, int64_t k0, int64_t n) {
  return j >= k0 && j < k0 + n ? static_cast<int>(j - k0) : -1;
}

// f(std::integral_constant<int, power>): the distance power as a compile-time constant.
template <class F>
inline void with_power(int power, F&& f) {
  if (power == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

// Every Codes type: copied per thread, `target(j)` sets x̂1 = j, then `distances(k0, n, d)`
// writes d(j, y) for y in [k0, k0 + n) (n a multiple of `block` except at the end).

// Normalized table, transposed to (m, K) so that the loop over codes is contiguous (m <= 32).
struct TableSoA {
  static constexpr int kMaxDim = 32;
  const float* t = nullptr;   // (m, K)
  const float* sq = nullptr;  // (K,) ||ê_y||²
  int64_t K = 0;
  int m = 0, power = 2;
  int64_t j = 0;
  float ej[kMaxDim] = {0}, sqj = 0.0f;
  float* dot = nullptr;  // thread scratch (block)

  int64_t block() const { return 1024; }
  int64_t scratch_size() const { return block(); }
  void set_scratch(float* p) { dot = p; }
  void target(int64_t jj) {
    j = jj;
    for (int l = 0; l < m; ++l) ej[l] = t[l * K + j];
    sqj = sq[j];
  }
  void distances(int64_t k0, int64_t n, float* d) const {
    {
      const float e0 = ej[0];
      const float* row = t + k0;
#pragma omp simd
      for (int64_t y = 0; y < n; ++y) dot[y] = e0 * row[y];
    }
    for (int l = 1; l < m; ++l) {
      const float el = ej[l];
      const float* row = t + l * K + k0;
#pragma omp simd
      for (int64_t y = 0; y < n; ++y) dot[y] += el * row[y];
    }
    const float* sqy = sq + k0;
    const float sx = sqj;
    const int jr = local_index(j, k0, n), nn = static_cast<int>(n);
    with_power(power, [&](auto pw) {
#pragma omp simd
      for (int y = 0; y < nn; ++y) d[y] = combine_distance(sx, sqy[y], dot[y], y == jr, pw.value);
    });
  }
};

// Normalized table (K, m) read row by row (large m, e.g. IBQ's 256).
struct TableAoS {
  const float* e = nullptr;
  const float* sq = nullptr;
  int64_t K = 0;
  int m = 0, power = 2;
  int64_t j = 0;
  const float* ej = nullptr;
  float sqj = 0.0f;

  int64_t block() const { return 256; }
  int64_t scratch_size() const { return 0; }
  void set_scratch(float*) {}
  void target(int64_t jj) {
    j = jj;
    ej = e + j * m;
    sqj = sq[j];
  }
  void distances(int64_t k0, int64_t n, float* d) const {
    for (int64_t y = 0; y < n; ++y) {
      const float* ey = e + (k0 + y) * m;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int l = 0; l < m; ++l) dot += ej[l] * ey[l];
      d[y] = combine_distance(sqj, sq[k0 + y], dot, k0 + y == j, power);
    }
  }
};

// FSQ codes rebuilt from the index: the first `split` levels form an inner block of `inner`
// codes (tables of digit values shared by all tokens), the other levels an outer counter.
struct FsqCodes {
  int64_t K = 0;
  int m = 0, power = 2, split = 0;
  int64_t inner = 1;
  const int32_t* levels = nullptr;
  const float* in_val = nullptr;  // (split, inner) digit values of the inner levels
  const float* in_sq = nullptr;   // (inner,) their Σ v²
  const float* inv = nullptr;     // (K,) 1 / max(||q_y||, eps): one L2 read instead of sqrt + div
  int64_t j = 0;
  float ej[kMaxLevels] = {0}, sqj = 0.0f;
  float* c_in = nullptr;  // thread scratch (inner,): Σ_{l<split} ê_j,l · v_l

  int64_t block() const { return inner * std::max<int64_t>(1, 1024 / inner); }
  int64_t scratch_size() const { return inner; }
  void set_scratch(float* p) { c_in = p; }
  void target(int64_t jj) {
    j = jj;
    sqj = fsq_normalized(j, levels, m, ej);
    for (int64_t i = 0; i < inner; ++i) c_in[i] = 0.0f;
    for (int l = 0; l < split; ++l) {
      const float el = ej[l];
      const float* v = in_val + l * inner;
      for (int64_t i = 0; i < inner; ++i) c_in[i] += el * v[i];
    }
  }
  void distances(int64_t k0, int64_t n, float* d) const {
    int64_t digit[kMaxLevels];
    int64_t r = k0 / inner;
    for (int l = split; l < m; ++l) {
      digit[l] = r % levels[l];
      r /= levels[l];
    }
    const float sx = sqj;
    const int ni = static_cast<int>(inner);
    for (int64_t base = 0; base < n; base += inner) {
      float pdot = 0.0f, psq = 0.0f;
      for (int l = split; l < m; ++l) {
        const float v = fsq_value(digit[l], levels[l]);
        pdot += ej[l] * v;
        psq += v * v;
      }
      const int jr = local_index(j, k0 + base, inner);
      float* dd = d + base;
      const float* iv = inv + k0 + base;
      with_power(power, [&](auto pw) {
#pragma omp simd
        for (int i = 0; i < ni; ++i) {
          const float sq = psq + in_sq[i];
          const float dot = (pdot + c_in[i]) * iv[i];
          dd[i] = combine_distance(sx, sq * iv[i] * iv[i], dot, i == jr, pw.value);
        }
      });
      for (int l = split; l < m; ++l) {  // next outer index
        if (++digit[l] < levels[l]) break;
        digit[l] = 0;
      }
    }
  }
};

// The per-call data of each Codes type (built once, shared by the threads), then `f(proto)`
// with a prototype each thread copies and gives its own scratch (`scratch_size` floats).
template <class F>
void with_codes(const Codes& c, F&& f) {
  const int64_t K = c.K;
  const int m = c.m;
  if (c.n_levels > 0) {
    FsqCodes p;
    p.K = K;
    p.m = c.n_levels;
    p.power = c.power;
    p.levels = c.levels;
    while (p.split < p.m && p.inner < 16) p.inner *= c.levels[p.split++];
    std::vector<float> val(p.split * p.inner), sq(p.inner, 0.0f);
    for (int64_t i = 0; i < p.inner; ++i) {
      int64_t r = i;
      for (int l = 0; l < p.split; ++l) {
        const float v = fsq_value(r % c.levels[l], c.levels[l]);
        r /= c.levels[l];
        val[l * p.inner + i] = v;
        sq[i] += v * v;
      }
    }
    std::vector<float> inv(K);
    for (int64_t y = 0; y < K; ++y) {
      int64_t r = y;
      float s = 0.0f;
      for (int l = 0; l < p.m; ++l) {
        const float v = fsq_value(r % c.levels[l], c.levels[l]);
        r /= c.levels[l];
        s += v * v;
      }
      inv[y] = inv_norm(s);
    }
    p.in_val = val.data();
    p.in_sq = sq.data();
    p.inv = inv.data();
    f(p);
    return;
  }
  std::vector<float> sq(K);
  for (int64_t y = 0; y < K; ++y) {
    const float* e = c.table + y * m;
    float s = 0.0f;
    for (int l = 0; l < m; ++l) s += e[l] * e[l];
    sq[y] = s;
  }
  if (m <= TableSoA::kMaxDim) {
    TableSoA p;
    std::vector<float> t(static_cast<size_t>(K) * m);
    for (int64_t y = 0; y < K; ++y)
      for (int l = 0; l < m; ++l) t[l * K + y] = c.table[y * m + l];
    p.t = t.data();
    p.sq = sq.data();
    p.K = K;
    p.m = m;
    p.power = c.power;
    f(p);
    return;
  }
  TableAoS p;
  p.e = c.table;
  p.sq = sq.data();
  p.K = K;
  p.m = m;
  p.power = c.power;
  f(p);
}

}  // namespace URSA_ISA
}  // namespace cpu
}  // namespace ursa
