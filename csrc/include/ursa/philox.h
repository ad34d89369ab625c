// Counter-based randomness shared by the CPU and CUDA kernels (DESIGN §2.5).
//
// The contract is ursa_engine/reference/rng.py, word for word:
//   key     = (seed & 0xFFFFFFFF, seed >> 32)                 seed: non-negative int64
//   counter = (index & 0xFFFFFFFF, index >> 32, step, tag)    index: position inside the row
//   Philox-4x32-10 with the standard constants gives four 32-bit lanes:
//     lane 0: categorical draw (x̂1, or the path sample)   lane 1: jump / keep decision
//     lane 2: jump destination (or the mixture noise code)   lane 3: MaskGIT Gumbel noise
//   uniform(w) = (2·(w >> 9) + 1) · 2^-24  (float32 in (0, 1), exact on every backend)
//   below(w,n) = (w · n) >> 32
// Token i of a flat tensor uses row r = i / row_len, index (i % row_len) + index_offset and
// seed seeds[r] (seeds[0] when there is a single seed); 64-bit index arithmetic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define URSA_HD __host__ __device__ __forceinline__
#else
#define URSA_HD inline
#endif

namespace ursa {

enum Tag : uint32_t { TAG_STEP = 0, TAG_PATH = 1, TAG_TIMESTEP = 2 };
enum Lane : int { LANE_DRAW = 0, LANE_JUMP = 1, LANE_DEST = 2, LANE_GUMBEL = 3 };

struct Words {
  uint32_t w[4];
};

URSA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox-4x32-10 (Salmon et al., SC'11); Random123 known answer: counter = key = 0 gives
// 0x6627e8d5 0xe169c58d 0xbc57ac4c 0x9b00dbd8.
URSA_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Words out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// The four lanes of token `index` of a row keyed by `seed`, at RNG step `step` for `tag`.
URSA_HD Words token_words(uint64_t seed, uint64_t index, uint64_t step, uint32_t tag) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(step), tag, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Row lookup of the contract: token i -> (seed, index inside its row + index_offset).
URSA_HD Words flat_token_words(const int64_t* seeds, int64_t n_seeds, int64_t row_len, int64_t index_offset,
                               int64_t i, int64_t step, uint32_t tag) {
  const int64_t len = row_len > 0 ? row_len : 1;
  const int64_t row = i / len;
  const int64_t seed = n_seeds > 1 ? seeds[row] : seeds[0];
  const uint64_t index = static_cast<uint64_t>(i - row * len) + static_cast<uint64_t>(index_offset);
  return token_words(static_cast<uint64_t>(seed), index, static_cast<uint64_t>(step), tag);
}

URSA_HD float to_uniform(uint32_t w) {
  return static_cast<float>(((w >> 9) << 1) + 1u) * 5.9604644775390625e-08f;  // 2^-24
}

URSA_HD int64_t to_below(uint32_t w, int64_t n) {
  return static_cast<int64_t>((static_cast<uint64_t>(w) * static_cast<uint64_t>(n)) >> 32);
}

}  // namespace ursa
