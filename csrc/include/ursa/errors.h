// Error bits of the step ops (issue 11, contract item 3): a kernel given an int32 error word ORs
// one bit per kind of bad value it met among the values it reads anyway (no extra pass over the
// logits). The names and values are those of ursa_engine/reference/sampler.py (ERR_*), checked
// by tests/test_native.py::test_error_bits_equal_the_python_constants.
#pragma once

#include <cstdint>

#include "philox.h"  // URSA_HD

namespace ursa {

enum ErrorBit : int32_t {
  ERR_X_RANGE = 1,             // an id of x outside [0, K)
  ERR_COND_NAN = 2,            // NaN in the conditional logits
  ERR_COND_POSINF = 4,         // +inf in the conditional logits
  ERR_COND_ALL_NEGINF = 8,     // a token whose conditional logits are all −inf
  ERR_UNCOND_NAN = 16,         // the same three for the unconditional logits
  ERR_UNCOND_POSINF = 32,
  ERR_UNCOND_ALL_NEGINF = 64,
  ERR_X1_RANGE = 128,          // an id of a given x̂1 outside [0, K)
};

// Name and value of every bit (the bindings export them for the test against the Python ones).
struct ErrorName {
  const char* name;
  int32_t bit;
};
constexpr ErrorName kErrors[] = {
    {"ERR_X_RANGE", ERR_X_RANGE},
    {"ERR_COND_NAN", ERR_COND_NAN},
    {"ERR_COND_POSINF", ERR_COND_POSINF},
    {"ERR_COND_ALL_NEGINF", ERR_COND_ALL_NEGINF},
    {"ERR_UNCOND_NAN", ERR_UNCOND_NAN},
    {"ERR_UNCOND_POSINF", ERR_UNCOND_POSINF},
    {"ERR_UNCOND_ALL_NEGINF", ERR_UNCOND_ALL_NEGINF},
    {"ERR_X1_RANGE", ERR_X1_RANGE},
};

// Whether an id addresses a code: out-of-range ids are flagged, never used as addresses.
URSA_HD bool in_range(int64_t id, int64_t K) { return id >= 0 && id < K; }

}  // namespace ursa
