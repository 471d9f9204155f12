// The operator library of the emulated CUDA backend (test-only): the schemas of namespace
// focal_emu, the same as focal's (focal_ops.h), and the emulation's controls. The CUDA backend,
// compiled into the same library, registers its operator functions for them on the CPU key
// (csrc/cuda/register_cuda.cpp).
#include <cstdint>
#include <vector>

#include <torch/library.h>

#include "box_ops.h"
#include "cuda_emulation.h"
#include "focal_ops.h"
#include "softmax_ops.h"

namespace {

// [kernel launches, elements the kernels reported touching] since the last reset.
std::vector<int64_t> emulation_counters() {
  return {focal_emu::counters.launches.load(), focal_emu::counters.elements.load()};
}

void reset_emulation_counters() {
  focal_emu::counters.launches = 0;
  focal_emu::counters.elements = 0;
  focal_emu::counters.shapes.clear();
  for (auto& copies : focal_emu::counters.async_copies) copies = 0;
}

// [cp.async copies of 4, 8 and 16 bytes] since the last reset.
std::vector<int64_t> emulated_async_copies() {
  const auto& c = focal_emu::counters.async_copies;
  return {c[4].load(), c[8].load(), c[16].load()};
}

// [blocks, threads per block] of each launch since the last reset, flattened.
std::vector<int64_t> emulated_launch_shapes() { return focal_emu::counters.shapes; }

int64_t emulated_multiprocessors() { return focal_emu::kMultiprocessors; }

// Sets whether one-value tensors count as device memory (cuda_emulation.h); returns the old value.
bool set_scalars_on_device(bool on) { return focal_emu::scalars_on_device_flag.exchange(on); }

}  // namespace

TORCH_LIBRARY(focal_emu, m) {
  for (const char* schema : focal::kSchemas) m.def(schema);
  m.def(focal::kSoftmaxFocalLossSchema);
  m.def(focal::kFcosBoxLossesSchema);
  m.def("emulation_counters() -> int[]", &emulation_counters);
  m.def("reset_emulation_counters() -> ()", &reset_emulation_counters);
  m.def("emulated_launch_shapes() -> int[]", &emulated_launch_shapes);
  m.def("emulated_async_copies() -> int[]", &emulated_async_copies);
  m.def("set_scalars_on_device(bool on) -> bool", &set_scalars_on_device);
  m.def("emulated_multiprocessors() -> int", &emulated_multiprocessors);
}
