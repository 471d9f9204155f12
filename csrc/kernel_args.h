// Plain description of one launch of an elementwise loss of the family (pointers and numbers),
// shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "family_math.h"

namespace focal {

enum class TargetKind {
  kFloat,            // (rows, cols) binary or soft targets in the logits' dtype
  kClassId,          // (rows,) int64 class ids: [0, cols) positive, background_index, ignore_index
  kClassIdSmoothed,  // class ids with label smoothing: positives 1 - eps/2, negatives eps/2
  kClassIdScore,     // class ids and a (rows,) score in the logits' dtype: the positive's target
};

struct KernelArgs {
  int64_t rows = 0;
  int64_t cols = 0;
  const void* logits = nullptr;       // (rows, cols), contiguous
  const void* targets = nullptr;      // see TargetKind
  const void* scores = nullptr;       // (rows,) for kClassIdScore, else nullptr
  const void* row_weight = nullptr;   // (rows,) or nullptr
  const void* elem_weight = nullptr;  // (cols,) shared by every row or (rows, cols), or nullptr
  int64_t elem_weight_row_stride = 0; // 0 for (cols,), cols for (rows, cols)
  void* loss = nullptr;               // (rows, cols) for reduction "none", else nullptr
  void* grad = nullptr;               // (rows, cols) d(scaled loss)/d logits, or nullptr
  double alpha = 0.25;                // < 0: no alpha weighting
  double gamma = 2.0;                 // hyper-parameters stay double: float64 math uses them as is;
                                      // gamma is QFL's beta (the exponent) for kQuality
  double beta = 0.0;                  // FL*'s shift
  double label_smoothing = 0.0;
  int64_t ignore_index = -100;
  TargetKind target_kind = TargetKind::kFloat;
  LossKind loss_kind = LossKind::kFocal;
  // Added last, so that the roofline kernels' code does not move with them:
  int64_t background_index = -1;      // the class id of background rows (negative for every class)
  const void* class_alpha = nullptr;  // (2, cols) in the math type, or nullptr: each class's alpha
                                      // weights of t = 1 and of t = 0 (row 0, row 1), in place of
                                      // those of `alpha` (loss_alpha's, per class)
};

}  // namespace focal
