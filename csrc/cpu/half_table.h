// The lookup table of the 16-bit class-id kernel (focal_table_kernel.cpp): when it applies, and
// how it is filled.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

#include "../focal_args.h"
#include "focal_kernel.h"

namespace focal::cpu {

// Whether a launch is served by focal_rows_from_table: bfloat16 or float16 logits, class ids without
// label smoothing, no weights, and enough elements in background rows (label -1, the rows the
// table serves) that filling it (131072 evaluations at most) costs less than it saves.
// FOCAL_CPU_TABLE=0 turns it off.
bool half_table_applies(const FocalArgs& args, c10::ScalarType dtype, int64_t background_elements);

// Fills the calling thread's table for this launch with `rows_fn`'s own results for every 16-bit
// value in a background row; the pointers stay valid until the thread's next call.
HalfTable build_half_table(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                           double scale, RowsFn rows_fn);

// How many launches the table has served in this process (for tests and diagnostics).
int64_t half_table_launches();

}  // namespace focal::cpu
