// CPU kernel entry points, one copy per instruction set (see setup.py and focal_kernel.cpp).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "../kernel_args.h"
#include "../focal_math.h"

namespace focal::cpu {

// Elements of a flat span (float targets without row structure, runs of class-id rows): a multiple
// of every instruction set's pair of vectors, and the most elements whose terms the lanes of a
// float sum add up before it is flushed into a double.
constexpr int64_t kFlatSpan = 512;

// Processes rows [row_begin, row_end) of `args`: writes the loss (reduction "none") and the gradient
// when their pointers are set, both multiplied by `scale`, and returns the unscaled sum of the
// weighted losses of those rows (0 when the loss is written out), accumulated in lanes of the
// kernel's vector width and added up in a fixed order.
using RowsFn = double (*)(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                          double scale, int64_t row_begin, int64_t row_end);

// focal_rows: the focal loss (focal_kernel.cpp); family_rows: FL*, QFL and VFL (family_kernel.cpp),
// the member given by args.loss_kind.
#define FOCAL_DECLARE_ROWS_FN(ISA)                                                              \
  namespace ISA {                                                                               \
  double focal_rows(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,        \
                    double scale, int64_t row_begin, int64_t row_end);                          \
  double family_rows(const KernelArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,       \
                     double scale, int64_t row_begin, int64_t row_end);                         \
  }

FOCAL_DECLARE_ROWS_FN(DEFAULT)
FOCAL_DECLARE_ROWS_FN(AVX2)
FOCAL_DECLARE_ROWS_FN(AVX512)
#undef FOCAL_DECLARE_ROWS_FN

}  // namespace focal::cpu
