// The sampler ops of ursa_engine/reference/sampler.py over raw pointers: one argument struct per
// kind of op, implemented by the CPU (csrc/cpu) and the CUDA (csrc/cuda) backends.
// Every function returns an empty string on success, else the error (nothing written).
#pragma once

#include <cstdint>
#include <string>

#include "codebook.h"
#include "errors.h"

namespace ursa {

enum DType : int { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 };
enum Param : int { P_H = 0, P_BETA = 1, P_BETA_DOT = 2, P_RATE = 3 };

// RNG rows of the contract (philox.h). `step` points to the int64 step counter (device memory
// on CUDA so that one captured graph serves every step); null means step 0. `index_offset` is
// added to every token's index inside its row: tokens [s, e) of each row run as a call of
// row_len = e − s with index_offset = s give exactly the tokens of the whole call.
struct Rng {
  const int64_t* seeds = nullptr;
  int64_t n_seeds = 1;
  int64_t row_len = 1;
  const int64_t* step = nullptr;
  int64_t index_offset = 0;
};

// The four lanes of flat token i under `r` (the row lookup of philox.h).
URSA_HD Words rng_words(const Rng& r, int64_t i, int64_t step, uint32_t tag) {
  return flat_token_words(r.seeds, r.n_seeds, r.row_len, r.index_offset, i, step, tag);
}

// Logits of D tokens: z = (u + s·(c − u)) / T (u absent: z = c / T); `exclude` (the mask id, or
// −1) is never drawn. Rows are contiguous in K, `*_stride` elements apart.
struct Logits {
  const void* cond = nullptr;
  const void* uncond = nullptr;
  int dtype = DTYPE_F32;
  int64_t cond_stride = 0;
  int64_t uncond_stride = 0;
  float scale = 1.0f;
  float temperature = 1.0f;
  int64_t exclude = -1;
};

// The metric: the normalized table ê (K, m) row-major, or FSQ levels (n_levels > 0: codes are
// rebuilt from the index; the table is then Codebook.fsq(levels).normalized and unused).
struct Codes {
  const float* table = nullptr;
  int64_t K = 0;
  int m = 0;
  int n_levels = 0;
  int32_t levels[kMaxLevels] = {0};
  int power = 2;
};

// `x1` (D,), when given, is x̂1 drawn elsewhere: the logits are never read (lane 0 unused).
// `error`, when given, receives ERR_* bits (errors.h) for the values the op reads: ids of x and
// x1, and (with `check_logits`) the raw cond / uncond logits of every row it draws from. A bad
// id is never used as an address (the token keeps its id).
struct StepArgs {
  int64_t D = 0, K = 0;
  Logits logits;
  const int64_t* x = nullptr;  // (D,) current tokens
  const int64_t* x1 = nullptr;  // (D,) given x̂1, or null: drawn from the logits
  int64_t* out = nullptr;      // (D,) may alias x
  int32_t* error = nullptr;    // (1,) ERR_* bits ORed in, or null: nothing checked
  bool check_logits = true;    // with `error`: check the logits read (off for prefiltered ones)
  const float* params = nullptr;  // P_H, P_BETA, P_BETA_DOT, P_RATE
  Rng rng;
  bool last = false, argmax_last = false;
  int64_t mask_id = -1;  // mask step
  Codes codes;           // metric step
  int n_threads = 0;     // CPU: 0 = OpenMP default
  void* stream = nullptr;  // CUDA stream
};

struct PathArgs {
  int64_t D = 0, K = 0;
  const int64_t* x1 = nullptr;
  const float* value = nullptr;  // per token: β (metric) or κ (mixture, mask)
  int64_t mask_id = -1;
  Codes codes;  // metric
  Rng rng;      // TAG_PATH, step 0
  int64_t* out = nullptr;
  int n_threads = 0;
  void* stream = nullptr;
};

#define URSA_DECLARE_OPS                                  \
  std::string metric_step(const StepArgs& a);             \
  std::string mixture_step(const StepArgs& a);            \
  std::string mask_step(const StepArgs& a);               \
  std::string metric_sample(const PathArgs& a);           \
  std::string mixture_sample(const PathArgs& a);          \
  std::string mask_sample(const PathArgs& a);

namespace cpu {
URSA_DECLARE_OPS
const char* isa();  // the instruction set picked at run time
}  // namespace cpu

namespace cuda {
URSA_DECLARE_OPS
int device_count();
}  // namespace cuda

}  // namespace ursa
