// Block-per-token building blocks of the CUDA sampler ops: warp scans, guided logits, the
// shared-memory layout and the streaming inverse-CDF draw (see sampler.cu).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ursa/ops.h"

namespace ursa {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPer = 8;                 // chunks of 32 per tile
constexpr int kTile = 32 * kPer;        // indices per tile
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr float kInf = __builtin_huge_valf();

// ----------------------------------------------------------------------------- warp helpers
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ double warp_incl_scan(double v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double n = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Ordered inverse CDF over n non-negative weights weight(i) held by one warp: the smallest i
// with Σ_{c<=i} > target (`before` = the sum before it); else the last positive one; −1 if none.
template <class W>
__device__ int64_t warp_find(const W& weight, int64_t n, double base, double target, double& before) {
  const int lane = threadIdx.x & 31;
  double carry = base, last_before = base;
  int64_t last = -1;
  for (int64_t c0 = 0; c0 < n; c0 += 32) {
    const double w = c0 + lane < n ? weight(c0 + lane) : 0.0;
    const double incl = warp_incl_scan(w, lane) + carry;
    double excl = __shfl_up_sync(kFull, incl, 1);
    if (lane == 0) excl = carry;
    const unsigned hit = __ballot_sync(kFull, incl > target && w > 0.0);
    const unsigned pos = __ballot_sync(kFull, w > 0.0);
    if (hit) {
      const int f = __ffs(hit) - 1;
      before = __shfl_sync(kFull, excl, f);
      return c0 + f;
    }
    if (pos) {
      const int f = 31 - __clz(pos);
      last = c0 + f;
      last_before = __shfl_sync(kFull, excl, f);
    }
    carry = __shfl_sync(kFull, incl, 31);
  }
  before = last_before;
  return last;
}

// Σ weight(i) in the order warp_find accumulates it (so that u·total is always crossed).
template <class W>
__device__ double warp_total(const W& weight, int64_t n) {
  const int lane = threadIdx.x & 31;
  double carry = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += 32) {
    const double w = c0 + lane < n ? weight(c0 + lane) : 0.0;
    carry = __shfl_sync(kFull, warp_incl_scan(w, lane) + carry, 31);
  }
  return carry;
}

// ----------------------------------------------------------------------------- logits
template <int DT>
__device__ __forceinline__ float load_logit(const void* p, int64_t j) {
  if constexpr (DT == DTYPE_BF16) {
    return __uint_as_float(static_cast<unsigned>(static_cast<const unsigned short*>(p)[j]) << 16);
  } else if constexpr (DT == DTYPE_F16) {
    return __half2float(static_cast<const __half*>(p)[j]);
  } else {
    return static_cast<const float*>(p)[j];
  }
}

template <int DT>
struct GuidedRow {  // z = (u + s·(c − u)) / T, −∞ at `exclude`
  const void* cond;
  const void* uncond;
  float scale, temperature;
  int64_t exclude;
  __device__ float unexcluded(int64_t j) const {
    float z = load_logit<DT>(cond, j);
    if (uncond != nullptr) {
      const float u = load_logit<DT>(uncond, j);
      z = (z == u) ? z : u + scale * (z - u);  // c == u (e.g. both -inf) stays: no NaN
    }
    if (temperature != 1.0f) z = z / temperature;
    return z;
  }
  __device__ float operator()(int64_t j) const { return j == exclude ? -kInf : unexcluded(j); }
};

template <int DT>
__device__ GuidedRow<DT> guided_row(const Logits& L, int64_t i) {
  const int64_t es = DT == DTYPE_F32 ? 4 : 2;
  GuidedRow<DT> r;
  r.cond = static_cast<const char*>(L.cond) + i * L.cond_stride * es;
  r.uncond = L.uncond ? static_cast<const char*>(L.uncond) + i * L.uncond_stride * es : nullptr;
  r.scale = L.scale;
  r.temperature = L.temperature;
  r.exclude = L.exclude;
  return r;
}

// ----------------------------------------------------------------------------- shared state
struct Shared {
  float* tile_m;  // (tiles,)
  float* tile_s;  // (tiles,)
  float* ej;      // (m,) ê of x̂1
  float* split;   // FSQ split: in_dot, in_sq (inner,), out_dot, out_sq (outer,)
  float* warp_z;  // (kWarps,)
  int64_t* result;
  float* sqj;
  int* flag;  // block_draw's "check this row" (errors.h)
};

__host__ __device__ inline int64_t tiles_of(int64_t K) { return (K + kTile - 1) / kTile; }

// ----------------------------------------------------------------------------- draws
// x ~ softmax(zf) over [0, K) by the inverse CDF with u; called by every thread of the block.
// With `check`, *suspect (the same in every thread) tells whether the row may hold NaN / +inf
// or no finite value, at no cost per element: a NaN or +inf z makes its tile's Σ exp NaN, a
// tile whose max is −inf is tested for NaN, an all −inf row has max −inf.
template <class ZF>
__device__ int64_t block_draw(const ZF& zf, int64_t K, float u, const Shared& sh, bool check = false,
                              bool* suspect = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = tiles_of(K);
  int bad = 0;
  for (int64_t t = warp; t < tiles; t += kWarps) {
    float v[kPer];
    float m = -kInf;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int64_t j = t * kTile + e * 32 + lane;
      v[e] = j < K ? zf(j) : -kInf;
      m = fmaxf(m, v[e]);
    }
    m = warp_max(m);
    float s = 0.0f;
    if (m != -kInf) {
#pragma unroll
      for (int e = 0; e < kPer; ++e) s += __expf(v[e] - m);
    }
    s = warp_sum(s);
    if (check) {  // m and s are the same in every lane of the warp
      if (m == -kInf) {
        bool nan = false;
#pragma unroll
        for (int e = 0; e < kPer; ++e) nan |= v[e] != v[e];
        bad |= __any_sync(kFull, nan);
      } else {
        bad |= !(s == s);
      }
    }
    if (lane == 0) {
      sh.tile_m[t] = m;
      sh.tile_s[t] = m == -kInf ? 0.0f : s;
    }
  }
  const int any_bad = __syncthreads_or(bad);
  if (warp == 0) {
    float gm = -kInf;
    for (int64_t t = lane; t < tiles; t += 32) gm = fmaxf(gm, sh.tile_m[t]);
    gm = warp_max(gm);
    if (lane == 0) *sh.flag = check && (any_bad || gm == -kInf);
    const auto weight = [&](int64_t t) -> double {
      return sh.tile_s[t] > 0.0f ? static_cast<double>(sh.tile_s[t]) * exp(static_cast<double>(sh.tile_m[t]) - gm)
                                 : 0.0;
    };
    const double target = static_cast<double>(u) * warp_total(weight, tiles);
    double before = 0.0;
    const int64_t t = warp_find(weight, tiles, 0.0, target, before);
    int64_t result = 0;
    if (t >= 0) {
      const float tm = sh.tile_m[t];
      const double scale = exp(static_cast<double>(tm) - gm);
      const int64_t t0 = t * kTile;
      const auto elem = [&](int64_t c) -> double {
        const int64_t j = t0 + c;
        return j < K ? static_cast<double>(__expf(zf(j) - tm)) : 0.0;
      };
      double b2;
      const int64_t c = warp_find(elem, kTile, before / scale, target / scale, b2);
      result = t0 + (c < 0 ? 0 : c);
    }
    if (lane == 0) *sh.result = result;
  }
  __syncthreads();
  const int64_t r = *sh.result;
  if (suspect != nullptr) *suspect = *sh.flag != 0;
  __syncthreads();
  return r;
}

// The ERR_* bits of one row of raw logits (errors.h), scanned by the whole block (every thread
// calls it and gets the bits).
template <int DT>
__device__ int32_t block_row_errors(const GuidedRow<DT>& row, int64_t K) {
  int nan_c = 0, inf_c = 0, seen_c = 0, nan_u = 0, inf_u = 0, seen_u = 0;
  for (int64_t j = threadIdx.x; j < K; j += kThreads) {
    const float c = load_logit<DT>(row.cond, j);
    nan_c |= c != c;
    inf_c |= c == kInf;
    seen_c |= c != -kInf;  // NaN counts as "not −inf", as torch's (z == −inf).all() does
    if (row.uncond != nullptr) {
      const float u = load_logit<DT>(row.uncond, j);
      nan_u |= u != u;
      inf_u |= u == kInf;
      seen_u |= u != -kInf;
    }
  }
  int32_t e = 0;
  if (__syncthreads_or(nan_c)) e |= ERR_COND_NAN;
  if (__syncthreads_or(inf_c)) e |= ERR_COND_POSINF;
  if (!__syncthreads_or(seen_c)) e |= ERR_COND_ALL_NEGINF;
  if (row.uncond != nullptr) {
    if (__syncthreads_or(nan_u)) e |= ERR_UNCOND_NAN;
    if (__syncthreads_or(inf_u)) e |= ERR_UNCOND_POSINF;
    if (!__syncthreads_or(seen_u)) e |= ERR_UNCOND_ALL_NEGINF;
  }
  return e;
}

// argmax zf (first index of the maximum).
template <class ZF>
__device__ int64_t block_argmax(const ZF& zf, int64_t K, const Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float best = -kInf;
  int64_t arg = K;
  for (int64_t j = threadIdx.x; j < K; j += kThreads) {
    const float v = zf(j);
    if (v > best) {  // j increases: the first maximum of this thread stays
      best = v;
      arg = j;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, best, o);
    const int64_t oa = __shfl_xor_sync(kFull, arg, o);
    if (ov > best || (ov == best && oa < arg)) {
      best = ov;
      arg = oa;
    }
  }
  if (lane == 0) {
    sh.tile_m[warp] = best;
    reinterpret_cast<int64_t*>(sh.tile_s)[warp] = arg;  // tile_s holds >= 2·kWarps floats
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = -kInf;
    int64_t a = K;
    for (int w = 0; w < kWarps; ++w) {
      const float v = sh.tile_m[w];
      const int64_t i = reinterpret_cast<int64_t*>(sh.tile_s)[w];
      if (v > b || (v == b && i < a)) {
        b = v;
        a = i;
      }
    }
    *sh.result = a < K ? a : 0;
  }
  __syncthreads();
  const int64_t r = *sh.result;
  __syncthreads();
  return r;
}

// Tiles rounded up to an even count (8-byte alignment of tile_s, which block_argmax reuses
// as int64) and to at least 2·kWarps.
__host__ __device__ inline int64_t padded_tiles(int64_t K) {
  const int64_t t = tiles_of(K) > 2 * kWarps ? tiles_of(K) : 2 * kWarps;
  return (t + 1) / 2 * 2;
}

__device__ Shared shared_layout(int64_t K, int m) {  // m: embedding dim (0: no codebook)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t result;
  __shared__ float warp_z[kWarps];
  __shared__ float sqj;
  __shared__ int flag;
  const int64_t tiles = padded_tiles(K);
  float* base = reinterpret_cast<float*>(smem_raw);
  Shared sh;
  sh.tile_m = base;
  sh.tile_s = base + tiles;
  sh.ej = base + 2 * tiles;
  sh.split = sh.ej + (m > kMaxLevels ? m : kMaxLevels);
  sh.warp_z = warp_z;
  sh.result = &result;
  sh.sqj = &sqj;
  sh.flag = &flag;
  return sh;
}

size_t shared_bytes(int64_t K, int m, int64_t split_floats) {
  const int64_t tiles = padded_tiles(K);
  const int64_t dims = m > kMaxLevels ? m : kMaxLevels;
  return static_cast<size_t>(2 * tiles + dims + split_floats) * sizeof(float);
}

}  // namespace
}  // namespace cuda
}  // namespace ursa
