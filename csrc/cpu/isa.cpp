// Run-time choice of the instruction set: every csrc/cpu kernel file is compiled once per ISA
// (CMake), and each op forwards to the best one the CPU supports. URSA_NATIVE_ISA=base|avx2|
// avx512 caps the choice (tests compare them).
#include <cstdlib>
#include <cstring>

#include "ursa/ops.h"

namespace ursa {
namespace cpu {

#define URSA_ISA_DECLARE(ns) \
  namespace ns {             \
  URSA_DECLARE_OPS           \
  }
URSA_ISA_DECLARE(base)
#if defined(URSA_HAVE_AVX2)
URSA_ISA_DECLARE(avx2)
#endif
#if defined(URSA_HAVE_AVX512)
URSA_ISA_DECLARE(avx512)
#endif

namespace {
enum Level { BASE = 0, AVX2 = 1, AVX512 = 2 };

int supported() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(URSA_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return AVX512;
#endif
#if defined(URSA_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
#endif
  return BASE;
}

int level() {
  static const int best = supported();
  int cap = AVX512;
  if (const char* env = std::getenv("URSA_NATIVE_ISA")) {
    if (std::strcmp(env, "base") == 0) cap = BASE;
    if (std::strcmp(env, "avx2") == 0) cap = AVX2;
  }
  return best < cap ? best : cap;
}
}  // namespace

const char* isa() {
  switch (level()) {
    case AVX512: return "avx512";
    case AVX2: return "avx2";
    default: return "base";
  }
}

#if defined(URSA_HAVE_AVX512)
#define URSA_CASE_AVX512(op) \
  case AVX512: return avx512::op(a);
#else
#define URSA_CASE_AVX512(op)
#endif
#if defined(URSA_HAVE_AVX2)
#define URSA_CASE_AVX2(op) \
  case AVX2: return avx2::op(a);
#else
#define URSA_CASE_AVX2(op)
#endif
#define URSA_FORWARD(op, Args)          \
  std::string op(const Args& a) {       \
    switch (level()) {                  \
      URSA_CASE_AVX512(op)              \
      URSA_CASE_AVX2(op)                \
      default: return base::op(a);      \
    }                                   \
  }

URSA_FORWARD(metric_step, StepArgs)
URSA_FORWARD(mixture_step, StepArgs)
URSA_FORWARD(mask_step, StepArgs)
URSA_FORWARD(metric_sample, PathArgs)
URSA_FORWARD(mixture_sample, PathArgs)
URSA_FORWARD(mask_sample, PathArgs)

}  // namespace cpu
}  // namespace ursa
