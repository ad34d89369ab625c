// pybind11 bindings over raw pointers (no torch headers): the Python wrapper
// (ursa_engine/_native.py) validates tensors and passes data_ptr() plus sizes and dtype codes.
// Compiled twice by CMake: module _native_cpu (namespace ursa::cpu) and, where nvcc exists,
// _native_cuda (ursa::cuda, with the CUDA stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "ursa/ops.h"

#if defined(URSA_BIND_CUDA)
#define URSA_MODULE _native_cuda
namespace backend = ursa::cuda;
#else
#define URSA_MODULE _native_cpu
namespace backend = ursa::cpu;
#endif

#ifndef URSA_CUDA_BUILT
#define URSA_CUDA_BUILT 0
#endif
#ifndef URSA_CUDA_NOTE
#define URSA_CUDA_NOTE ""
#endif
#ifndef URSA_CPU_ISAS
#define URSA_CPU_ISAS "base"
#endif

namespace py = pybind11;
using ursa::Codes;
using ursa::PathArgs;
using ursa::StepArgs;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

Codes make_codes(std::uintptr_t table, int64_t K, int m, const std::vector<int>& levels, int power) {
  Codes c;
  c.table = ptr<const float>(table);
  c.K = K;
  c.m = m;
  c.power = power;
  if (levels.size() > static_cast<size_t>(ursa::kMaxLevels))
    throw std::invalid_argument("levels: at most " + std::to_string(ursa::kMaxLevels) + " FSQ levels");
  c.n_levels = static_cast<int>(levels.size());
  for (size_t l = 0; l < levels.size(); ++l) c.levels[l] = levels[l];
  return c;
}

// Arguments common to the three steps, in the order of the Python wrapper.
StepArgs make_step(std::uintptr_t cond, std::uintptr_t uncond, int dtype, int64_t cond_stride,
                   int64_t uncond_stride, float scale, float temperature, int64_t exclude, std::uintptr_t x,
                   std::uintptr_t out, int64_t D, int64_t K, std::uintptr_t params, std::uintptr_t seeds,
                   int64_t n_seeds, int64_t row_len, int64_t index_offset, std::uintptr_t step, bool last,
                   bool argmax_last, std::uintptr_t x1, std::uintptr_t error, bool check_logits, int n_threads,
                   std::uintptr_t stream) {
  StepArgs a;
  a.D = D;
  a.K = K;
  a.logits.cond = ptr<const void>(cond);
  a.logits.uncond = ptr<const void>(uncond);
  a.logits.dtype = dtype;
  a.logits.cond_stride = cond_stride;
  a.logits.uncond_stride = uncond_stride;
  a.logits.scale = scale;
  a.logits.temperature = temperature;
  a.logits.exclude = exclude;
  a.x = ptr<const int64_t>(x);
  a.x1 = ptr<const int64_t>(x1);
  a.out = ptr<int64_t>(out);
  a.error = ptr<int32_t>(error);
  a.check_logits = check_logits;
  a.params = ptr<const float>(params);
  a.rng.seeds = ptr<const int64_t>(seeds);
  a.rng.n_seeds = n_seeds;
  a.rng.row_len = row_len;
  a.rng.index_offset = index_offset;
  a.rng.step = ptr<const int64_t>(step);
  a.last = last;
  a.argmax_last = argmax_last;
  a.n_threads = n_threads;
  a.stream = ptr<void>(stream);
  return a;
}

PathArgs make_path(std::uintptr_t x1, std::uintptr_t value, std::uintptr_t out, int64_t D, int64_t K,
                   std::uintptr_t seeds, int64_t n_seeds, int64_t row_len, int64_t index_offset, int n_threads,
                   std::uintptr_t stream) {
  PathArgs a;
  a.D = D;
  a.K = K;
  a.x1 = ptr<const int64_t>(x1);
  a.value = ptr<const float>(value);
  a.out = ptr<int64_t>(out);
  a.rng.seeds = ptr<const int64_t>(seeds);
  a.rng.n_seeds = n_seeds;
  a.rng.row_len = row_len;
  a.rng.index_offset = index_offset;
  a.n_threads = n_threads;
  a.stream = ptr<void>(stream);
  return a;
}

#define URSA_STEP_ARGS                                                                                    \
  std::uintptr_t cond, std::uintptr_t uncond, int dtype, int64_t cond_stride, int64_t uncond_stride,      \
      float scale, float temperature, int64_t exclude, std::uintptr_t x, std::uintptr_t out, int64_t D,  \
      int64_t K, std::uintptr_t params, std::uintptr_t seeds, int64_t n_seeds, int64_t row_len,          \
      int64_t index_offset, std::uintptr_t step, bool last, bool argmax_last, std::uintptr_t x1,         \
      std::uintptr_t error, bool check_logits, int n_threads, std::uintptr_t stream
#define URSA_STEP_VALUES                                                                                 \
  cond, uncond, dtype, cond_stride, uncond_stride, scale, temperature, exclude, x, out, D, K, params,     \
      seeds, n_seeds, row_len, index_offset, step, last, argmax_last, x1, error, check_logits, n_threads, \
      stream
#define URSA_STEP_PYARGS                                                                                  \
  py::arg("cond"), py::arg("uncond"), py::arg("dtype"), py::arg("cond_stride"), py::arg("uncond_stride"), \
      py::arg("scale"), py::arg("temperature"), py::arg("exclude"), py::arg("x"), py::arg("out"),         \
      py::arg("D"), py::arg("K"), py::arg("params"), py::arg("seeds"), py::arg("n_seeds"),                \
      py::arg("row_len"), py::arg("index_offset"), py::arg("step"), py::arg("last"),                      \
      py::arg("argmax_last"), py::arg("x1"), py::arg("error"), py::arg("check_logits"),                   \
      py::arg("n_threads"), py::arg("stream")
#define URSA_PATH_ARGS                                                                                      \
  std::uintptr_t x1, std::uintptr_t value, std::uintptr_t out, int64_t D, int64_t K, std::uintptr_t seeds, \
      int64_t n_seeds, int64_t row_len, int64_t index_offset, int n_threads, std::uintptr_t stream
#define URSA_PATH_VALUES x1, value, out, D, K, seeds, n_seeds, row_len, index_offset, n_threads, stream
#define URSA_PATH_PYARGS                                                                                 \
  py::arg("x1"), py::arg("value"), py::arg("out"), py::arg("D"), py::arg("K"), py::arg("seeds"),         \
      py::arg("n_seeds"), py::arg("row_len"), py::arg("index_offset"), py::arg("n_threads"),             \
      py::arg("stream")

}  // namespace

PYBIND11_MODULE(URSA_MODULE, mod) {
  mod.doc() = "ursa-engine native sampler ops over raw pointers (see ursa_engine/_native.py)";
  using Release = py::call_guard<py::gil_scoped_release>;

  mod.def(
      "metric_step",
      [](URSA_STEP_ARGS, std::uintptr_t table, int m, const std::vector<int>& levels, int power) {
        StepArgs a = make_step(URSA_STEP_VALUES);
        a.codes = make_codes(table, K, m, levels, power);
        py::gil_scoped_release release;
        check(backend::metric_step(a));
      },
      URSA_STEP_PYARGS, py::arg("table"), py::arg("m"), py::arg("levels"), py::arg("power"));
  mod.def(
      "mixture_step", [](URSA_STEP_ARGS) { check(backend::mixture_step(make_step(URSA_STEP_VALUES))); },
      URSA_STEP_PYARGS, Release());
  mod.def(
      "mask_step",
      [](URSA_STEP_ARGS, int64_t mask_id) {
        StepArgs a = make_step(URSA_STEP_VALUES);
        a.mask_id = mask_id;
        check(backend::mask_step(a));
      },
      URSA_STEP_PYARGS, py::arg("mask_id"), Release());
  mod.def(
      "metric_sample",
      [](URSA_PATH_ARGS, std::uintptr_t table, int m, const std::vector<int>& levels, int power) {
        PathArgs a = make_path(URSA_PATH_VALUES);
        a.codes = make_codes(table, K, m, levels, power);
        py::gil_scoped_release release;
        check(backend::metric_sample(a));
      },
      URSA_PATH_PYARGS, py::arg("table"), py::arg("m"), py::arg("levels"), py::arg("power"));
  mod.def(
      "mixture_sample", [](URSA_PATH_ARGS) { check(backend::mixture_sample(make_path(URSA_PATH_VALUES))); },
      URSA_PATH_PYARGS, Release());
  mod.def(
      "mask_sample",
      [](URSA_PATH_ARGS, int64_t mask_id) {
        PathArgs a = make_path(URSA_PATH_VALUES);
        a.mask_id = mask_id;
        check(backend::mask_sample(a));
      },
      URSA_PATH_PYARGS, py::arg("mask_id"), Release());
  mod.def(
      "random_words",
      [](std::uintptr_t seeds, int64_t n_seeds, int64_t row_len, int64_t numel, int64_t step, uint32_t tag,
         std::uintptr_t out, int64_t index_offset) {
        int64_t* o = ptr<int64_t>(out);
        for (int64_t i = 0; i < numel; ++i) {
          const ursa::Words w =
              ursa::flat_token_words(ptr<const int64_t>(seeds), n_seeds, row_len, index_offset, i, step, tag);
          for (int l = 0; l < 4; ++l) o[4 * i + l] = w.w[l];
        }
      },
      "Host philox.h: the four lanes of flat tokens 0..numel-1 into int64 out (numel, 4)",
      py::arg("seeds"), py::arg("n_seeds"), py::arg("row_len"), py::arg("numel"), py::arg("step"),
      py::arg("tag"), py::arg("out"), py::arg("index_offset") = 0);
  mod.def(
      "philox_raw",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const ursa::Words w = ursa::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(w.w[0], w.w[1], w.w[2], w.w[3]);
      },
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"));
  py::dict errors;  // errors.h, for the test against ursa_engine.reference.sampler's ERR_*
  for (const ursa::ErrorName& e : ursa::kErrors) errors[e.name] = e.bit;
  mod.attr("errors") = errors;
#if defined(URSA_BIND_CUDA)
  mod.def("device_count", &ursa::cuda::device_count, "CUDA devices visible to the runtime (0 without a driver)");
#else
  mod.def("isa", &ursa::cpu::isa, "The instruction set picked at run time (base, avx2, avx512)");
  py::dict info;
  info["cuda"] = URSA_CUDA_BUILT != 0;
  info["cuda_note"] = URSA_CUDA_NOTE;
  info["isas"] = URSA_CPU_ISAS;
  mod.attr("build_info") = info;
#endif
}
