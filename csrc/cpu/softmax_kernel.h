// CPU softmax focal loss kernel entry points, one copy per instruction set (see setup.py and
// softmax_kernel.cpp).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "../focal_math.h"
#include "../softmax_args.h"

namespace focal::cpu {

// Processes the elements (n, position) for n in [outer_begin, outer_end) and positions in
// [inner_begin, inner_end): writes the loss (reduction "none") and the gradient when their pointers
// are set, both multiplied by `scale`, and returns the unscaled sum of those elements' losses (0 when
// the loss is written out), added up in an order fixed by the range. Class ids must already be
// checked: each is ignore_index or in [0, classes).
using SoftmaxBlockFn = double (*)(const SoftmaxArgs& args, c10::ScalarType dtype,
                                  GammaKind gamma_kind, double scale, int64_t outer_begin,
                                  int64_t outer_end, int64_t inner_begin, int64_t inner_end);

#define FOCAL_DECLARE_SOFTMAX_FN(ISA)                                                         \
  namespace ISA {                                                                             \
  double softmax_block(const SoftmaxArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,  \
                       double scale, int64_t outer_begin, int64_t outer_end,                  \
                       int64_t inner_begin, int64_t inner_end);                               \
  }

FOCAL_DECLARE_SOFTMAX_FN(DEFAULT)
FOCAL_DECLARE_SOFTMAX_FN(AVX2)
FOCAL_DECLARE_SOFTMAX_FN(AVX512)
#undef FOCAL_DECLARE_SOFTMAX_FN

}  // namespace focal::cpu
