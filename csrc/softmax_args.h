// Plain description of one softmax focal loss launch (pointers and numbers), shared by the CPU and
// CUDA kernels.
#pragma once

#include <cstdint>

namespace focal {

// One launch, as the kernels see it: logits viewed as (outer, classes, inner).
struct SoftmaxArgs {
  int64_t outer = 0;
  int64_t classes = 0;
  int64_t inner = 1;
  const void* logits = nullptr;          // (outer, classes, inner), contiguous
  const int64_t* target = nullptr;       // (outer, inner)
  const void* class_factor = nullptr;    // (classes,) weight * alpha in the math type, or nullptr
  void* loss = nullptr;                  // (outer, inner) for reduction "none", else nullptr
  void* grad = nullptr;                  // like logits, or nullptr
  double gamma = 2.0;
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
};

}  // namespace focal
