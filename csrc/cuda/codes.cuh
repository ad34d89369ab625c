// Codebooks of the CUDA metric ops (DESIGN §2.1): distance functors d(x̂1, y) from the table,
// from the FSQ digits of y, or from per-token tables of the FSQ digits split in two halves.
#pragma once

#include "block.cuh"

namespace ursa {
namespace cuda {
namespace {

// How ê_y is obtained: the table, the FSQ digits of y, or the FSQ digits split in an inner
// (first levels) and an outer part whose partial sums are tabulated per token in shared memory.
enum CodesMode : int { CODES_TABLE = 0, CODES_FSQ = 1, CODES_FSQ_SPLIT = 2 };

struct FsqSplit {
  int split = 0;  // levels [0, split) are inner
  int inner = 1, outer = 1;
  float inv_inner = 1.0f;
};

// ----------------------------------------------------------------------------- codebooks
// Known cost (issue 12, finding 6; not fixed, needs a GPU to tune): the table mode runs one block a
// token and this functor reads row y of the table for every code, so every moving token streams the
// whole (K, m) float32 table: 128 MiB at K = 131,072, m = 256, i.e. ~550 GB a step for 4,096 moving
// tokens (~0.18 s from DRAM, the table exceeding the 50 MB L2; ~0.1 s if L2 serves the blocks that
// sweep it in step), and each lane reads its own row (uncoalesced). The fix is the Triton design
// (triton_kernels/table.py): draw x̂1 first, then a tiled pass where a block of moving tokens shares
// every code tile it loads (shared memory / tensor cores). Until then `auto` never picks this mode
// (the Triton step is predicted at ~1.7 ms: benchmarks/predicted.py) and _dispatch.tune times it once.
struct TableDist {  // d(j, y) from the normalized (K, m) table
  const float* table;
  const float* ej;
  float sqj;
  int64_t j;
  int m, power;
  __device__ float operator()(int64_t y) const {
    const float* e = table + y * m;
    float dot = 0.0f, sq = 0.0f;
    for (int l = 0; l < m; ++l) {
      const float v = __ldg(e + l);
      dot += ej[l] * v;
      sq += v * v;
    }
    return combine_distance(sqj, sq, dot, y == j, power);
  }
};

struct FsqDist {  // d(j, y) with ê_y rebuilt from the index (no table traffic)
  const int32_t* levels;
  const float* ej;
  float sqj;
  int64_t j;
  int m, power;
  __device__ float operator()(int64_t y) const {
    int r = static_cast<int>(y);
    float dot = 0.0f, sq = 0.0f;
    for (int l = 0; l < m; ++l) {
      const int L = levels[l];
      const int q = r % L;
      r /= L;
      const float v = fsq_value(q, L);
      dot += ej[l] * v;
      sq += v * v;
    }
    const float inv = inv_norm(sq);
    return combine_distance(sqj, sq * inv * inv, dot * inv, y == j, power);
  }
};

// d(j, y) from the split tables: y = r·inner + i, Σ over levels = inner part + outer part.
struct FsqSplitDist {
  const float* in_dot;
  const float* in_sq;
  const float* out_dot;
  const float* out_sq;
  int inner;
  float inv_inner;
  float sqj;
  int64_t j;
  int power;
  __device__ float operator()(int64_t y) const {
    const int yi = static_cast<int>(y);  // K < 2^24 (checked by the launcher)
    // y / inner by a float reciprocal, off by at most one, then corrected
    int r = __float2int_rz((static_cast<float>(yi) + 0.5f) * inv_inner);
    int i = yi - r * inner;
    if (i < 0) {
      --r;
      i += inner;
    } else if (i >= inner) {
      ++r;
      i -= inner;
    }
    const float sq = in_sq[i] + out_sq[r];
    const float inv = sq > kNormEps * kNormEps ? rsqrtf(sq) : 1.0f / kNormEps;
    return combine_distance(sqj, sq * inv * inv, (in_dot[i] + out_dot[r]) * inv, y == j, power);
  }
};

// Loads what the distance to x̂1 = j needs into shared memory (every thread calls it) and
// returns the functor.
template <int MODE>
struct DistOf;
template <>
struct DistOf<CODES_TABLE> {
  __device__ static TableDist make(const Codes& c, const FsqSplit&, int64_t j, const Shared& sh) {
    for (int l = threadIdx.x; l < c.m; l += kThreads) sh.ej[l] = c.table[j * c.m + l];
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.0f;
      for (int l = 0; l < c.m; ++l) s += sh.ej[l] * sh.ej[l];
      *sh.sqj = s;
    }
    __syncthreads();
    TableDist d{c.table, sh.ej, *sh.sqj, j, c.m, c.power};
    return d;
  }
};
template <>
struct DistOf<CODES_FSQ> {
  __device__ static FsqDist make(const Codes& c, const FsqSplit&, int64_t j, const Shared& sh) {
    if (threadIdx.x == 0) *sh.sqj = fsq_normalized(j, c.levels, c.n_levels, sh.ej);
    __syncthreads();
    FsqDist d{c.levels, sh.ej, *sh.sqj, j, c.n_levels, c.power};
    return d;
  }
};
template <>
struct DistOf<CODES_FSQ_SPLIT> {
  __device__ static FsqSplitDist make(const Codes& c, const FsqSplit& f, int64_t j, const Shared& sh) {
    if (threadIdx.x == 0) *sh.sqj = fsq_normalized(j, c.levels, c.n_levels, sh.ej);
    __syncthreads();
    float* in_dot = sh.split;
    float* in_sq = in_dot + f.inner;
    float* out_dot = in_sq + f.inner;
    float* out_sq = out_dot + f.outer;
    for (int i = threadIdx.x; i < f.inner; i += kThreads) {
      int r = i;
      float dot = 0.0f, sq = 0.0f;
      for (int l = 0; l < f.split; ++l) {
        const float v = fsq_value(r % c.levels[l], c.levels[l]);
        r /= c.levels[l];
        dot += sh.ej[l] * v;
        sq += v * v;
      }
      in_dot[i] = dot;
      in_sq[i] = sq;
    }
    for (int o = threadIdx.x; o < f.outer; o += kThreads) {
      int r = o;
      float dot = 0.0f, sq = 0.0f;
      for (int l = f.split; l < c.n_levels; ++l) {
        const float v = fsq_value(r % c.levels[l], c.levels[l]);
        r /= c.levels[l];
        dot += sh.ej[l] * v;
        sq += v * v;
      }
      out_dot[o] = dot;
      out_sq[o] = sq;
    }
    __syncthreads();
    FsqSplitDist d{in_dot, in_sq, out_dot, out_sq, f.inner, f.inv_inner, *sh.sqj, j, c.power};
    return d;
  }
};

// The codes mode of a call and, for FSQ, the split: inner = the first levels until ≥ 32 codes.
int codes_mode(const Codes& c, FsqSplit& f) {
  if (c.n_levels == 0) return CODES_TABLE;
  while (f.split < c.n_levels && f.inner < 32) f.inner *= c.levels[f.split++];
  f.outer = static_cast<int>(c.K / f.inner);
  f.inv_inner = 1.0f / static_cast<float>(f.inner);
  const bool fits = 2 * static_cast<int64_t>(f.inner + f.outer) <= (32 << 10);  // floats of smem
  return c.K < (1 << 24) && fits ? CODES_FSQ_SPLIT : CODES_FSQ;
}


size_t codes_shared_bytes(int64_t K, const Codes& c, const FsqSplit& f, int mode) {
  return shared_bytes(K, c.m, mode == CODES_FSQ_SPLIT ? 2 * (f.inner + f.outer) : 0);
}

}  // namespace
}  // namespace cuda
}  // namespace ursa
