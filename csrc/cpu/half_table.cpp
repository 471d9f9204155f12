#include "half_table.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace focal::cpu {

namespace {

// Below this many elements in background rows the table costs more to fill than it saves.
constexpr int64_t kMinElements = int64_t(1) << 19;

// The 65536 values are laid out as background rows of kCols classes: whole vectors of negatives,
// which the direct kernel computes exactly as it does in any background row.
constexpr int64_t kCols = 64;
constexpr int64_t kRows = HalfTable::kSize / kCols;

std::atomic<int64_t> launches{0};

struct Storage {
  std::vector<uint16_t> patterns;  // every 16-bit pattern, as logits
  std::vector<float> widened;      // the same values in float32 (for `widened_dtype`)
  c10::ScalarType widened_dtype = c10::ScalarType::Undefined;
  std::vector<int64_t> background;  // kRows class ids of -1
  std::vector<float> loss;
  std::vector<uint16_t> loss_out, grad;

  Storage()
      : patterns(HalfTable::kSize), widened(HalfTable::kSize), background(kRows, -1),
        loss(HalfTable::kSize), loss_out(HalfTable::kSize), grad(HalfTable::kSize) {
    for (int64_t i = 0; i < HalfTable::kSize; ++i) patterns[i] = static_cast<uint16_t>(i);
  }

  const float* widened_for(c10::ScalarType dtype) {
    if (widened_dtype != dtype) {
      for (int64_t i = 0; i < HalfTable::kSize; ++i) {
        widened[i] = dtype == c10::ScalarType::Half
                         ? static_cast<float>(c10::Half(patterns[i], c10::Half::from_bits()))
                         : static_cast<float>(c10::BFloat16(patterns[i], c10::BFloat16::from_bits()));
      }
      widened_dtype = dtype;
    }
    return widened.data();
  }
};

// One table per calling thread (about 0.9 MB, kept for the thread's lifetime): launches from
// several threads never share one.
Storage& storage() {
  thread_local Storage s;
  return s;
}

// The table's rows, computed by every thread of the launch (each element's output depends on its
// logit alone, so how the rows are split changes nothing).
void fill(const FocalArgs& b, c10::ScalarType dtype, GammaKind gamma_kind, double scale, RowsFn rows_fn) {
  at::parallel_for(0, kRows, 64, [&](int64_t r0, int64_t r1) {
    rows_fn(b, dtype, gamma_kind, scale, r0, r1, nullptr);
  });
}

}  // namespace

bool half_table_applies(const FocalArgs& args, c10::ScalarType dtype, int64_t background_elements) {
  if (dtype != c10::ScalarType::BFloat16 && dtype != c10::ScalarType::Half) return false;
  if (args.target_kind != TargetKind::kClassId || args.row_weight || args.elem_weight) return false;
  if (background_elements < kMinElements) return false;
  const char* env = std::getenv("FOCAL_CPU_TABLE");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

HalfTable build_half_table(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                           double scale, RowsFn rows_fn) {
  Storage& s = storage();
  FocalArgs b = args;  // alpha, gamma and ignore_index as launched (-1 is never ignore_index)
  b.rows = kRows;
  b.cols = kCols;
  b.targets = s.background.data();
  b.row_weight = nullptr;
  b.elem_weight = nullptr;
  b.elem_weight_row_stride = 0;

  HalfTable table;
  if (args.loss || args.grad) {
    // The outputs in the dtype, from the very kernel and arguments of this launch.
    b.logits = s.patterns.data();
    b.loss = args.loss ? s.loss_out.data() : nullptr;
    b.grad = args.grad ? s.grad.data() : nullptr;
    fill(b, dtype, gamma_kind, scale, rows_fn);
    if (args.loss) table.loss_out = s.loss_out.data();
    if (args.grad) table.grad = s.grad.data();
  }
  if (!args.loss) {
    // A summed reduction adds each element's float loss times a weight into its lane. The float
    // kernel on the widened values computes the same float losses; without alpha weighting and
    // with scale 1 it writes them out unweighted.
    b.logits = s.widened_for(dtype);
    b.alpha = -1.0;
    b.loss = s.loss.data();
    b.grad = nullptr;
    fill(b, c10::ScalarType::Float, gamma_kind, 1.0, rows_fn);
    table.loss = s.loss.data();
  }
  launches.fetch_add(1, std::memory_order_relaxed);
  return table;
}

int64_t half_table_launches() { return launches.load(std::memory_order_relaxed); }

}  // namespace focal::cpu
