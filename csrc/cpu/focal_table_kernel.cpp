// The CPU kernel for bfloat16 and float16 logits with class ids and no weights, by table lookup.
//
// A 16-bit logit takes one of 65536 values, and in a row of background (label -1) every class is a
// negative, so each output of such a row depends on the logit alone. half_table.cpp fills a
// HalfTable with focal_kernel.cpp's own results for all 65536 values; this kernel then serves
// background rows with a table load per element and output instead of the math, and hands rows
// that hold a positive to focal_kernel.cpp. Every output is bitwise the direct kernel's: the table holds
// its results, and the sum goes into the same float lanes, in the same order, with the same fused
// multiply-add. Compiled once per instruction set, like focal_kernel.cpp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "focal_kernel.h"
#include "simd.h"

#ifndef CPU_CAPABILITY
#error "CPU_CAPABILITY must name the instruction set this file is compiled for"
#endif

// The element loop is scalar on purpose: loads from a table. GCC's SLP vectoriser would gather 16
// scalar loads into a vector for the lane sums, at a dozen shuffles per vector.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-slp-vectorize")
#endif

namespace focal::cpu::CPU_CAPABILITY {
namespace {

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kLittleEndian = true;
#else
constexpr bool kLittleEndian = false;
#endif

template <typename scalar_t, bool kSum, bool kLossOut, bool kGrad>
double rows_from_table(const FocalArgs& a, c10::ScalarType dtype, GammaKind gamma_kind,
                       double scale, const HalfTable& table, int64_t r0, int64_t r1) {
  using S = simd::SimdFor<scalar_t>;
  constexpr int64_t kLanes = S::kLanes;
  static_assert(std::is_same_v<typename S::acc_t, float> && kLanes % 4 == 0);

  const int64_t C = a.cols;
  const auto* ids = static_cast<const int64_t*>(a.targets);
  const auto* x_all = static_cast<const uint16_t*>(a.logits);
  auto* loss_all = static_cast<uint16_t*>(a.loss);
  auto* grad_all = static_cast<uint16_t*>(a.grad);
  // The direct kernel's weight of a background vector's loss in a sum: V(1) * alpha.neg, with
  // alpha.neg as make_alpha builds it.
  const float neg_loss_w = 1.f * (a.alpha < 0.0 ? 1.f : static_cast<float>(1.0 - a.alpha));

  // The direct kernel's accumulator, lane by lane; in registers, and copied through `spill` only
  // for the rows handed to the direct kernel.
  float acc[kLanes] = {};
  alignas(64) float spill[kLanes];

  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    const int64_t id = ids[r];
    if (id == a.ignore_index) {
      if constexpr (kLossOut) std::fill_n(loss_all + off, C, uint16_t(0));
      if constexpr (kGrad) std::fill_n(grad_all + off, C, uint16_t(0));
      continue;
    }
    if (id != -1) {  // the row's positive: the direct kernel, continuing from this kernel's lanes
      std::memcpy(spill, acc, sizeof(acc));
      focal_rows(a, dtype, gamma_kind, scale, r, r + 1, kSum ? spill : nullptr);
      std::memcpy(acc, spill, sizeof(acc));
      continue;
    }
    const uint16_t* x = x_all + off;
    const auto one = [&](int64_t i, int64_t j) FOCAL_ALWAYS_INLINE {
      const uint16_t v = x[i];
      if constexpr (kSum) acc[j] = S::lane_fmadd(table.loss[v], neg_loss_w, acc[j]);
      if constexpr (kLossOut) loss_all[off + i] = table.loss_out[v];
      if constexpr (kGrad) grad_all[off + i] = table.grad[v];
    };
    // Element c + j of a row goes into lane j, as in the direct kernel's vector at c. Four logits
    // are read, and four outputs written, 64 bits at a time (little-endian: element i + k is bits
    // 16k to 16k + 15).
    const auto four = [&](int64_t i, int64_t j) FOCAL_ALWAYS_INLINE {
      if constexpr (!kLittleEndian) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) one(i + k, j + k);
        return;
      }
      uint64_t logits;
      std::memcpy(&logits, x + i, sizeof(logits));
      uint64_t loss_bits = 0, grad_bits = 0;
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const uint16_t v = static_cast<uint16_t>(logits >> (16 * k));
        if constexpr (kSum) acc[j + k] = S::lane_fmadd(table.loss[v], neg_loss_w, acc[j + k]);
        if constexpr (kLossOut) loss_bits |= uint64_t(table.loss_out[v]) << (16 * k);
        if constexpr (kGrad) grad_bits |= uint64_t(table.grad[v]) << (16 * k);
      }
      if constexpr (kLossOut) std::memcpy(loss_all + off + i, &loss_bits, sizeof(loss_bits));
      if constexpr (kGrad) std::memcpy(grad_all + off + i, &grad_bits, sizeof(grad_bits));
    };
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
#pragma GCC unroll 16
      for (int64_t j = 0; j < kLanes; j += 4) four(c + j, j);
    }
#pragma GCC unroll 16
    for (int64_t j = 0; j < kLanes; ++j) {  // the tail; constant lane indices keep acc in registers
      if (c + j < C) one(c + j, j);
    }
  }
  double total = 0;  // the lanes in order, in double, as S::sum
  for (const float lane : acc) total += lane;
  return total;
}

template <typename scalar_t>
double dispatch_outputs(const FocalArgs& a, c10::ScalarType dtype, GammaKind g, double scale,
                        const HalfTable& table, int64_t r0, int64_t r1) {
  const bool loss_out = a.loss != nullptr, grad = a.grad != nullptr;
  if (loss_out && grad) return rows_from_table<scalar_t, false, true, true>(a, dtype, g, scale, table, r0, r1);
  if (loss_out) return rows_from_table<scalar_t, false, true, false>(a, dtype, g, scale, table, r0, r1);
  if (grad) return rows_from_table<scalar_t, true, false, true>(a, dtype, g, scale, table, r0, r1);
  return rows_from_table<scalar_t, true, false, false>(a, dtype, g, scale, table, r0, r1);
}

}  // namespace

double focal_rows_from_table(const FocalArgs& args, c10::ScalarType dtype, GammaKind gamma_kind,
                             double scale, const HalfTable& table, int64_t row_begin,
                             int64_t row_end) {
  if (dtype == c10::ScalarType::Half) {
    return dispatch_outputs<c10::Half>(args, dtype, gamma_kind, scale, table, row_begin, row_end);
  }
  return dispatch_outputs<c10::BFloat16>(args, dtype, gamma_kind, scale, table, row_begin, row_end);
}

}  // namespace focal::cpu::CPU_CAPABILITY
