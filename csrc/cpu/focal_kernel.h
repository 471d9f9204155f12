// CPU kernel entry points, one copy per instruction set (see setup.py, focal_kernel.cpp and
// focal_table_kernel.cpp).
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "../focal_args.h"
#include "../focal_math.h"

namespace focal::cpu {

// Processes rows [row_begin, row_end) of `args`: writes the loss (reduction "none") and the gradient
// when their pointers are set, both multiplied by `scale`, and returns the unscaled sum of the
// weighted losses of those rows (0 when the loss is written out). The sum is accumulated in lanes of
// the kernel's vector width; with `lanes` (float and 16-bit dtypes only) the accumulation starts
// from those lanes and leaves its result there, and the function returns 0: for class ids, the
// lanes then hold what one call over these rows and the rows before them would have summed.
using RowsFn = double (*)(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                          double scale, int64_t row_begin, int64_t row_end, float* lanes);

// The kernel's results for every one of the 65536 values of a 16-bit logit, in a background row
// (every class a negative) of a launch without weights. Any pointer may be null when not needed.
struct HalfTable {
  static constexpr int64_t kSize = 65536;
  const float* loss = nullptr;         // the loss, not yet weighted (summed reductions)
  const uint16_t* loss_out = nullptr;  // the weighted, scaled loss in the dtype (reduction "none")
  const uint16_t* grad = nullptr;      // the scaled gradient in the dtype
};

// As RowsFn, for bfloat16 / float16 logits with class ids and no weights, reading the outputs of
// background rows from `table`; every output is bitwise that of RowsFn.
using TableRowsFn = double (*)(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                               double scale, const HalfTable& table, int64_t row_begin,
                               int64_t row_end);

#define FOCAL_DECLARE_ROWS_FNS(ISA)                                                             \
  namespace ISA {                                                                               \
  double focal_rows(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,         \
                    double scale, int64_t row_begin, int64_t row_end, float* lanes);            \
  double focal_rows_from_table(const FocalArgs& args, c10::ScalarType dtype,                    \
                               GammaKind gamma_kind, double scale, const HalfTable& table,      \
                               int64_t row_begin, int64_t row_end);                             \
  }

FOCAL_DECLARE_ROWS_FNS(DEFAULT)
FOCAL_DECLARE_ROWS_FNS(AVX2)
FOCAL_DECLARE_ROWS_FNS(AVX512)
#undef FOCAL_DECLARE_ROWS_FNS

}  // namespace focal::cpu
