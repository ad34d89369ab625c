// CUDA sampler ops (DESIGN §2.3, §2.4) on the RNG contract of philox.h: one block of 256
// threads per token (grid-stride over tokens), warp shuffle reductions, never a D×K buffer.
//
// Codes and logits are visited in tiles of 256 (8 chunks of 32 consecutive indices, one
// warp per tile). A draw keeps per-tile (max, Σ exp) or per-tile rate sums in shared memory,
// finds the tile crossing u·W with an ordered warp scan, then rescans that tile alone.
#include <string>

#include "codes.cuh"

namespace ursa {
namespace cuda {
namespace {

// The metric Euler move of a token with x̂1 ≠ z0 (§2.4): rate sums per tile, λ = β̇·S/Z, jump
// with lane 1, destination with lane 2 by the ordered tile scan and a rescan of one tile.
template <class Dist>
__device__ int64_t block_metric_move(const Dist& dist, int64_t K, int64_t z0, float beta, double beta_dot,
                                     double h, float u1, float u2, const Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = tiles_of(K);
  const float d0 = dist(z0);
  const auto rate = [&](int64_t y, float& g) -> float {
    const float d = dist(y);
    g = __expf(-beta * d);
    const float gap = d0 - d;
    return y == z0 ? 0.0f : g * (gap > 0.0f ? gap : 0.0f);
  };
  float z = 0.0f;
  for (int64_t t = warp; t < tiles; t += kWarps) {
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int64_t y = t * kTile + e * 32 + lane;
      if (y < K) {
        float g;
        s += rate(y, g);
        z += g;
      }
    }
    s = warp_sum(s);
    if (lane == 0) sh.tile_s[t] = s;
  }
  z = warp_sum(z);
  if (lane == 0) sh.warp_z[warp] = z;
  __syncthreads();
  if (warp == 0) {
    double Z = 0.0;
    for (int w = 0; w < kWarps; ++w) Z += sh.warp_z[w];
    const auto weight = [&](int64_t t) -> double { return static_cast<double>(sh.tile_s[t]); };
    const double S = warp_total(weight, tiles);
    const double lam = beta_dot * S / Z;
    int64_t result = z0;
    if (lam > 0.0 && static_cast<double>(u1) < -expm1(-h * lam)) {
      const double target = static_cast<double>(u2) * S;
      double before = 0.0;
      const int64_t t = warp_find(weight, tiles, 0.0, target, before);
      if (t >= 0) {
        const int64_t t0 = t * kTile;
        const auto elem = [&](int64_t c) -> double {
          float g;
          return t0 + c < K ? static_cast<double>(rate(t0 + c, g)) : 0.0;
        };
        double b2;
        const int64_t c = warp_find(elem, kTile, before, target, b2);
        if (c >= 0) result = t0 + c;
      }
    }
    if (lane == 0) *sh.result = result;
  }
  __syncthreads();
  const int64_t r = *sh.result;
  __syncthreads();
  return r;
}

// ----------------------------------------------------------------------------- errors (errors.h)
// ERR_X_RANGE / ERR_X1_RANGE of token i (one thread per token calls it).
__device__ void report_ids(const StepArgs& a, int64_t i) {
  int32_t e = in_range(a.x[i], a.K) ? 0 : ERR_X_RANGE;
  if (a.x1 != nullptr && !in_range(a.x1[i], a.K)) e |= ERR_X1_RANGE;
  if (e != 0) atomicOr(a.error, e);
}

// x̂1 of token i: the given one, else drawn with uniform u from its guided logits (argmax on an
// argmax last step); called by the whole block. Checking, a row the draw flagged (or every
// argmax row) is classified and its bits ORed into a.error.
template <int DT>
__device__ int64_t block_x1(const StepArgs& a, int64_t i, float u, const Shared& sh) {
  if (a.x1 != nullptr) return a.x1[i];
  const GuidedRow<DT> row = guided_row<DT>(a.logits, i);
  const bool check = a.error != nullptr && a.check_logits;
  bool suspect = false;
  int64_t j;
  if (a.last && a.argmax_last) {
    j = block_argmax(row, a.K, sh);
    suspect = check;
  } else {
    j = block_draw(row, a.K, u, sh, check, &suspect);
  }
  if (check && row.exclude >= 0 && row.exclude < a.K) suspect |= !(row.unexcluded(row.exclude) < kInf);
  if (suspect) {  // the same in every thread
    const int32_t e = block_row_errors(row, a.K);
    if (threadIdx.x == 0 && e != 0) atomicOr(a.error, e);
  }
  return j;
}

// ----------------------------------------------------------------------------- kernels
// The per-token kernels are built for kMinBlocks resident blocks an SM (<= 128 registers a thread):
// with __launch_bounds__(kThreads) alone ptxas chose 64 registers and spilled (16-68 B stores + loads) in the table
// and FSQ metric steps (issue 12, finding 7); at 2 no kernel spills (nvcc -Xptxas -v -arch=sm_90a,
// checked by tests/test_compile_report.py).
constexpr int kMinBlocks = 2;

template <int DT, int MODE>
__global__ void __launch_bounds__(kThreads, kMinBlocks) metric_step_kernel(StepArgs a, FsqSplit f) {
  const Shared sh = shared_layout(a.K, a.codes.m);
  const int64_t step = a.rng.step ? *a.rng.step : 0;
  const float beta = a.params[P_BETA];
  const double beta_dot = a.params[P_BETA_DOT], h = a.params[P_H];
  for (int64_t i = blockIdx.x; i < a.D; i += gridDim.x) {
    const Words r = rng_words(a.rng, i, step, TAG_STEP);
    const int64_t z0 = a.x[i];
    if (a.error != nullptr && threadIdx.x == 0) report_ids(a, i);
    const int64_t j = block_x1<DT>(a, i, to_uniform(r.w[LANE_DRAW]), sh);
    int64_t result = j;
    if (!a.last && j != z0 && in_range(z0, a.K) && in_range(j, a.K)) {  // bad ids: flagged, never addresses
      const auto dist = DistOf<MODE>::make(a.codes, f, j, sh);
      result = block_metric_move(dist, a.K, z0, beta, beta_dot, h, to_uniform(r.w[LANE_JUMP]),
                                 to_uniform(r.w[LANE_DEST]), sh);
    } else if (!a.last) {
      result = z0;
    }
    if (threadIdx.x == 0) a.out[i] = result;
  }
}

// Codes the token kernels keep per-tile state for (none with a given x̂1: K may then be unknown).
__host__ __device__ inline int64_t drawn_codes(const StepArgs& a) { return a.x1 != nullptr ? 1 : a.K; }

// mode 0: mixture step, 1: mask step.
template <int DT, int MODE>
__global__ void __launch_bounds__(kThreads, kMinBlocks) token_step_kernel(StepArgs a) {
  const Shared sh = shared_layout(drawn_codes(a), 0);
  const int64_t step = a.rng.step ? *a.rng.step : 0;
  const double hr = static_cast<double>(a.params[P_H]) * static_cast<double>(a.params[P_RATE]);
  const double prob = MODE == 0 ? -expm1(-hr) : (hr < 1.0 ? hr : 1.0);  // jump / unmask
  for (int64_t i = blockIdx.x; i < a.D; i += gridDim.x) {
    const Words r = rng_words(a.rng, i, step, TAG_STEP);
    const int64_t z0 = a.x[i];
    if (a.error != nullptr && threadIdx.x == 0) report_ids(a, i);
    const bool take = MODE == 0 ? (a.last || static_cast<double>(to_uniform(r.w[LANE_JUMP])) < prob)
                                : (z0 == a.mask_id && (a.last || static_cast<double>(to_uniform(r.w[LANE_JUMP])) < prob));
    if (!take) {  // uniform over the block: the result does not depend on x̂1
      if (threadIdx.x == 0) a.out[i] = z0;
      continue;
    }
    const int64_t j = block_x1<DT>(a, i, to_uniform(r.w[LANE_DRAW]), sh);
    if (threadIdx.x == 0) a.out[i] = j;
  }
}

template <int MODE>
__global__ void __launch_bounds__(kThreads, kMinBlocks) metric_sample_kernel(PathArgs a, FsqSplit f) {
  const Shared sh = shared_layout(a.K, a.codes.m);
  for (int64_t i = blockIdx.x; i < a.D; i += gridDim.x) {
    const int64_t x1 = a.x1[i];
    const float beta = a.value[i];
    if (!isfinite(beta) || x1 < 0 || x1 >= a.K) {
      if (threadIdx.x == 0) a.out[i] = x1;
      continue;
    }
    const Words r = rng_words(a.rng, i, 0, TAG_PATH);
    const auto dist = DistOf<MODE>::make(a.codes, f, x1, sh);
    const auto logit = [&](int64_t y) { return -beta * dist(y); };
    const int64_t x = block_draw(logit, a.K, to_uniform(r.w[LANE_DRAW]), sh);
    if (threadIdx.x == 0) a.out[i] = x;
  }
}

template <int MODE>  // 0: mixture (uniform noise), 1: mask
__global__ void kappa_sample_kernel(PathArgs a) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < a.D;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Words r = rng_words(a.rng, i, 0, TAG_PATH);
    const bool keep = to_uniform(r.w[LANE_JUMP]) < a.value[i];
    a.out[i] = keep ? a.x1[i] : (MODE == 0 ? to_below(r.w[LANE_DEST], a.K) : a.mask_id);
  }
}

// ----------------------------------------------------------------------------- launchers
std::string launched(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

unsigned grid_for(int64_t D) { return static_cast<unsigned>(D < (1 << 30) ? D : (1 << 30)); }

template <class Kernel, class... Args>
std::string launch_blocks(Kernel kernel, const char* what, int64_t D, size_t smem, cudaStream_t stream,
                          const Args&... args) {
  if (D == 0) return "";
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return std::string(what) + ": K too large for shared memory (" + cudaGetErrorString(err) + ")";
  }
  kernel<<<grid_for(D), kThreads, smem, stream>>>(args...);
  return launched(what);
}

template <int DT>
std::string metric_step_dt(const StepArgs& a, cudaStream_t stream) {
  FsqSplit f;
  const int mode = codes_mode(a.codes, f);
  const size_t smem = codes_shared_bytes(a.K, a.codes, f, mode);
  switch (mode) {
    case CODES_FSQ_SPLIT:
      return launch_blocks(metric_step_kernel<DT, CODES_FSQ_SPLIT>, "metric_step", a.D, smem, stream, a, f);
    case CODES_FSQ: return launch_blocks(metric_step_kernel<DT, CODES_FSQ>, "metric_step", a.D, smem, stream, a, f);
    default: return launch_blocks(metric_step_kernel<DT, CODES_TABLE>, "metric_step", a.D, smem, stream, a, f);
  }
}

}  // namespace

std::string metric_step(const StepArgs& a) {
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  switch (a.logits.dtype) {
    case DTYPE_BF16: return metric_step_dt<DTYPE_BF16>(a, stream);
    case DTYPE_F16: return metric_step_dt<DTYPE_F16>(a, stream);
    default: return metric_step_dt<DTYPE_F32>(a, stream);
  }
}

namespace {
template <int MODE>
std::string token_step(const StepArgs& a, const char* what) {
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const size_t smem = shared_bytes(drawn_codes(a), 0, 0);
  switch (a.logits.dtype) {
    case DTYPE_BF16: return launch_blocks(token_step_kernel<DTYPE_BF16, MODE>, what, a.D, smem, stream, a);
    case DTYPE_F16: return launch_blocks(token_step_kernel<DTYPE_F16, MODE>, what, a.D, smem, stream, a);
    default: return launch_blocks(token_step_kernel<DTYPE_F32, MODE>, what, a.D, smem, stream, a);
  }
}

}  // namespace

std::string mixture_step(const StepArgs& a) { return token_step<0>(a, "mixture_step"); }

std::string mask_step(const StepArgs& a) { return token_step<1>(a, "mask_step"); }

std::string metric_sample(const PathArgs& a) {
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  FsqSplit f;
  const int mode = codes_mode(a.codes, f);
  const size_t smem = codes_shared_bytes(a.K, a.codes, f, mode);
  switch (mode) {
    case CODES_FSQ_SPLIT:
      return launch_blocks(metric_sample_kernel<CODES_FSQ_SPLIT>, "metric_sample", a.D, smem, stream, a, f);
    case CODES_FSQ: return launch_blocks(metric_sample_kernel<CODES_FSQ>, "metric_sample", a.D, smem, stream, a, f);
    default: return launch_blocks(metric_sample_kernel<CODES_TABLE>, "metric_sample", a.D, smem, stream, a, f);
  }
}

std::string mixture_sample(const PathArgs& a) {
  if (a.D == 0) return "";
  const unsigned grid = static_cast<unsigned>((a.D + kThreads - 1) / kThreads < 65535 ? (a.D + kThreads - 1) / kThreads : 65535);
  kappa_sample_kernel<0><<<grid, kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(a);
  return launched("mixture_sample");
}

std::string mask_sample(const PathArgs& a) {
  if (a.D == 0) return "";
  const unsigned grid = static_cast<unsigned>((a.D + kThreads - 1) / kThreads < 65535 ? (a.D + kThreads - 1) / kThreads : 65535);
  kappa_sample_kernel<1><<<grid, kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(a);
  return launched("mask_sample");
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace cuda
}  // namespace ursa
