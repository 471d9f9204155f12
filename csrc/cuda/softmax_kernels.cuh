// The kernels of the softmax focal loss (softmax_cuda.cu launches them). The math is
// csrc/softmax_math.h with scalar float (float64 for float64 data) and SoftmaxMathFor's primitives
// (device_math.cuh: libm's, but for 16-bit data an exp from the hardware's ex2).
//
// Three kernels, by layout and row length:
// - softmax_elements_kernel: one thread per element (n, position), its classes `inner` apart, so
//   neighbouring threads read neighbouring addresses in every pass: segmentation logits
//   (N, C, H, W), and rows of at most kThreadRowClasses classes, where a row is short enough for
//   one thread (the three passes then hit L1). Compiled in variants (kSoftmaxVariantNames) that
//   load 1 or 16 classes before they use any, or that stream the logits through shared memory
//   (softmax_elements_ring_kernel);
// - softmax_warp_rows_kernel: 16 or 32 lanes per row, for rows of up to kWarpRowClasses classes
//   (those of detection and most classification): the row read once, its maximum and exp sum in a
//   fixed tree of shuffles. Compiled in variants (kRowVariantNames) that hold the row in the
//   lanes' registers or stream the warp's rows through shared memory (RowRing);
// - softmax_rows_kernel: one block per row, for longer rows: the row's maximum and exp sum by
//   cub::BlockReduce, each thread striding over the row's classes.
// Which kernel a call takes depends on its layout and number of classes alone (and, for rows of 33 to
// 256 classes, on there being fewer than 2^31 rows).
// A reduced loss is summed in tiles fixed by the data (a warp's elements, a run of rows), whose
// sums are added in a fixed order by sum_blocks_kernel (tile_sums.cuh): no atomics, and the same
// bits for every variant and grid size. Compiled by nvcc, and for tests as host C++ against the
// emulation (kernel_runtime.cuh, README.md).
#pragma once

#include <cfloat>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include <ATen/OpMathType.h>

#include "../softmax_args.h"
#include "../softmax_math.h"
#include "device_math.cuh"
#include "kernel_runtime.cuh"
#include "row_ring.cuh"
#include "tile_sums.cuh"

namespace focal::cuda {

constexpr int kSoftmaxThreads = 128;
// Rows up to this many classes take one thread each.
constexpr int64_t kThreadRowClasses = 32;
// At most about this many tiles: their sums are added by one block. The emulation takes 8, so that
// the tests' small inputs have lanes of several elements, tiles of several rows, and more tiles than
// a block has warps (on a grid of one block, a warp then takes a second tile).
#if !defined(FOCAL_CUDA_EMULATION)
constexpr int64_t kSoftmaxMaxTiles = 8192;
#else
constexpr int64_t kSoftmaxMaxTiles = 8;
#endif

// The variants of the thread-per-element kernel, by index: the classes each thread loads before it
// uses any of them, in each pass over its element's classes, or a ring. c1 uses each class's logit
// as it comes (40 registers: 75 % occupancy at gamma 2); c16 has 64 bytes of float32 logits in
// flight in each pass's whole chunks, under 56 registers (README.md); "ring" is
// softmax_elements_ring_kernel, for the layouts ElementSteps::layout_of takes (c1 for the others).
// float64 and label smoothing take c1 in every variant.
inline constexpr int kSoftmaxVariantCount = 3;
// static: each library built from this (the extension, its emulation) has its own names, and a
// process that loads both reads each library's with its own count.
static constexpr const char* kSoftmaxVariantNames[kSoftmaxVariantCount] = {"c1", "c16", "ring"};
inline constexpr int kSoftmaxRingVariant = 2;

// f(std::integral_constant<int, classes per load>) for the variant of that index (0 for any other).
template <typename F>
decltype(auto) with_softmax_chunk(int index, F&& f) {
  switch (index) {
    case 1: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

// The factor of every loss and gradient element, in double: factor / normaliser / denominator,
// where the last two may live in device memory.
struct SoftmaxScale {
  double factor = 1.0;                 // scale * alpha, divided by a normaliser the host read
  ScalarRef normalizer;                // a normaliser in device memory, or absent
  const double* denominator = nullptr;  // the "mean" denominator in device memory, or absent
};

__device__ __forceinline__ double resolve_scale(const SoftmaxScale& s) {
  double f = s.factor;
  if (s.normalizer.ptr != nullptr) {
    const double v = load(s.normalizer);
    // The host cannot check a value it never reads: an invalid normaliser poisons the result.
    f = v > 0.0 && v <= DBL_MAX ? f / v : static_cast<double>(NAN);
  }
  if (s.denominator != nullptr) f /= *s.denominator;
  return f;
}

// How a reduced loss is cut into tiles, from the data's size alone: `per_tile` elements per lane
// (softmax_elements_kernel: a tile is a warp's 32 x per_tile elements), rounds of rows per tile
// (softmax_warp_rows_kernel: a round is the 1 or 2 rows a warp takes at a time) or rows per tile
// (softmax_rows_kernel), so that there are at most about kSoftmaxMaxTiles of them.
struct SoftmaxTiles {
  int64_t per_tile = 1;
  int64_t count = 0;

  static SoftmaxTiles make(int64_t items, int64_t item_per_unit) {
    SoftmaxTiles t;
    const int64_t units = (items + item_per_unit - 1) / item_per_unit;
    t.per_tile = units > kSoftmaxMaxTiles ? (units + kSoftmaxMaxTiles - 1) / kSoftmaxMaxTiles : 1;
    const int64_t span = item_per_unit * t.per_tile;
    t.count = (items + span - 1) / span;
    return t;
  }
};

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return softmax_max<T, Ops<T>>(a, b);
  }
};

// *out = the sum of weight[id] over the elements whose id is not ignore_index (their number
// without a weight), or 1 when there is none. An out-of-range id has no weight: NaN.
template <typename weight_t>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_denominator_kernel(const int64_t* __restrict__ ids, int64_t count, int64_t classes,
                               int64_t ignore_index, const weight_t* __restrict__ weight,
                               double* __restrict__ out) {
  double total = 0;
  double kept = 0;
  for (int64_t i = threadIdx.x; i < count; i += kSoftmaxThreads) {
    const int64_t id = ids[i];
    if (id == ignore_index) continue;
    kept += 1;
    if (id < 0 || id >= classes) {
      total += static_cast<double>(NAN);
    } else {
      total += weight ? static_cast<double>(weight[id]) : 1.0;
    }
  }
  using BlockReduce = cub::BlockReduce<double, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const double sum = BlockReduce(storage).Sum(total);
  __syncthreads();
  const double kept_sum = BlockReduce(storage).Sum(kept);
  if (threadIdx.x == 0) *out = kept_sum > 0 ? sum : 1.0;
}

// The softmax focal loss of one element (a row, or a pixel's classes), once its maximum and sums
// are known, as every kernel computes it. Without label smoothing: its loss (unscaled) and its
// gradient, the target class's target_grad() and every other class c's k() exp(x_c - max), both
// times the scale. x_y is the target's logit (the maximum for an invalid id, whose row the sums
// make NaN), weight its class's a_y.
template <GammaKind G, typename O, typename acc_t>
struct HardTerms {
  SoftmaxProb<acc_t> py;
  FocalTerm<acc_t> term;
  acc_t weight;  // a_y

  __device__ __forceinline__ HardTerms(const SoftmaxRow<acc_t>& row, acc_t x_y, acc_t weight_, acc_t gamma)
      : py(softmax_prob<acc_t, O>(row, x_y)), term(softmax_focal_term<G, acc_t, O>(py, gamma)), weight(weight_) {}
  // Those of a row whose logits are x[0], ..., x[C - 1] (a pointer, or RingRow), of class `id`
  // (`valid`: 0 <= id < C), its class's a_y from `factor` if there is one.
  template <typename Logits>
  __device__ __forceinline__ HardTerms(const SoftmaxRow<acc_t>& row, const Logits& x, int64_t id, bool valid,
                                       const acc_t* factor, acc_t gamma)
      : HardTerms(row, valid ? static_cast<acc_t>(x[id]) : row.max, factor && valid ? factor[id] : acc_t(1), gamma) {}
  __device__ __forceinline__ acc_t loss() const { return weight * term.value; }
  __device__ __forceinline__ acc_t target_grad(acc_t scale) const { return weight * term.slope * py.one_minus_p * scale; }
  __device__ __forceinline__ acc_t k(const SoftmaxRow<acc_t>& row, acc_t scale) const {
    return -(weight * term.slope) * row.inv_total * scale;
  }
};

// With label smoothing every class c is a target, of weight q_c a_c (q: 1 - eps + eps / C for the
// element's class, eps / C for the others; a: the class factor, if any): class c's share of the
// element's loss and of the sum of its slopes, then its gradient (unscaled) from that sum.
template <GammaKind G, typename O, typename acc_t>
struct SmoothedTerms {
  const acc_t* factor;  // a_c, or none
  acc_t q_other, q_target, gamma;

  __device__ __forceinline__ SmoothedTerms(const SoftmaxArgs& a, acc_t gamma_)
      : factor(static_cast<const acc_t*>(a.class_factor)),
        q_other(static_cast<acc_t>(a.label_smoothing / static_cast<double>(a.classes))),
        q_target(static_cast<acc_t>(1.0 - a.label_smoothing) + q_other),
        gamma(gamma_) {}

  __device__ __forceinline__ acc_t weight(int64_t c, int64_t id) const {
    const acc_t q = c == id ? q_target : q_other;
    return factor ? q * factor[c] : q;
  }
  __device__ __forceinline__ void add(const SoftmaxRow<acc_t>& row, int64_t c, int64_t id, acc_t xc, acc_t& loss,
                                      acc_t& slopes) const {
    const SoftmaxProb<acc_t> prob = softmax_prob<acc_t, O>(row, xc);
    const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(prob, gamma);
    const acc_t qa = weight(c, id);
    loss = O::fmadd(qa, term.value, loss);
    slopes = O::fmadd(qa, term.slope, slopes);
  }
  __device__ __forceinline__ acc_t grad(const SoftmaxRow<acc_t>& row, int64_t c, int64_t id, acc_t xc,
                                        acc_t slopes) const {
    const SoftmaxProb<acc_t> prob = softmax_prob<acc_t, O>(row, xc);
    const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(prob, gamma);
    return softmax_grad<acc_t, O>(prob, weight(c, id) * term.slope, slopes);
  }
};

// f(c, logit of class c) for c = first, first + kStep, ... below C in turn, class c's logit at
// x[c * pitch]. With kChunk > 1 whole chunks of kChunk classes are read, all of them before any is
// used, so that kChunk loads are in flight; the classes after the last whole chunk are read one by
// one. f sees the same values in the same order either way.
template <int kChunk, int kStep, typename acc_t, typename Logits, typename F>
__device__ __forceinline__ void for_strided(const Logits& x, int64_t first, int64_t C, int64_t pitch, F&& f) {
  int64_t c = first;
  if constexpr (kChunk > 1) {
    static_assert(std::is_pointer_v<Logits>, "chunks are read from memory");
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<Logits>>;
    for (; c + kChunk * kStep <= C + kStep - 1; c += kChunk * kStep) {
      scalar_t v[kChunk];
      const scalar_t* p = x + c * pitch;
#pragma unroll
      for (int i = 0; i < kChunk; ++i, p += kStep * pitch) v[i] = *p;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) f(c + i * kStep, static_cast<acc_t>(v[i]));
    }
  }
  for (; c < C; c += kStep) f(c, static_cast<acc_t>(x[c * pitch]));
}

// Every class of an element, c = 0, 1, ..., C - 1, the logits `inner` apart from x.
template <int kChunk, typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void for_classes(const scalar_t* x, int64_t C, int64_t inner, F&& f) {
  for_strided<kChunk, 1, acc_t>(x, 0, C, inner, std::forward<F>(f));
}

// One thread per element. Warp w of the grid takes tiles w, w + (the grid's warps), ...; lane l of
// a tile takes its elements l, l + 32, ..., l + 32 (tiles.per_tile - 1), adds their losses in that
// order, and the tile's 32 lane sums go to tile_sums in a fixed tree.
template <typename scalar_t, GammaKind G, bool kSmooth, int kChunk>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_elements_kernel(SoftmaxArgs a, SoftmaxScale s, SoftmaxTiles tiles,
                            at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using O = SoftmaxMathFor<scalar_t>;
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const int64_t C = a.classes, inner = a.inner, elements = a.outer * a.inner;
  const SmoothedTerms<G, O, acc_t> smoothed(a, gamma);
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  auto* loss_all = static_cast<scalar_t*>(a.loss);

  // Element e's loss (unscaled; 0 if ignored), with its gradient and, for reduction "none", its
  // scaled loss written.
  const auto element = [&](int64_t e) -> acc_t {
    const int64_t n = e / inner, pos = e - n * inner;
    const scalar_t* x = x_all + n * C * inner + pos;
    scalar_t* grad = grad_all ? grad_all + n * C * inner + pos : nullptr;
    const int64_t id = a.target[e];
    if (id == a.ignore_index) {
      if (loss_all) loss_all[e] = scalar_t(0);
      if (grad) {
        for (int64_t c = 0; c < C; ++c) grad[c * inner] = scalar_t(0);
      }
      return acc_t(0);
    }
    const bool valid = id >= 0 && id < C;  // else NaN: checking would need a host sync
    acc_t m = static_cast<acc_t>(x[0]);  // softmax_max(x0, x0) is x0: class 0 may come again
    for_classes<kChunk, acc_t>(x, C, inner, [&](int64_t, acc_t xc) { m = softmax_max<acc_t, O>(m, xc); });
    SoftmaxSums<acc_t> sums;
    for_classes<kChunk, acc_t>(x, C, inner, [&](int64_t, acc_t xc) { softmax_accumulate<acc_t, O>(sums, xc - m); });
    if (!valid) sums.below = static_cast<acc_t>(NAN);
    const SoftmaxRow<acc_t> row = softmax_row<acc_t, O>(m, sums.below, sums.ties);

    acc_t loss = 0;
    if constexpr (!kSmooth) {
      // HardTerms's math written out: through it, ptxas keeps 5 values of the float32 kernel at a
      // general gamma in local memory.
      const SoftmaxProb<acc_t> py = softmax_prob<acc_t, O>(row, valid ? static_cast<acc_t>(x[id * inner]) : m);
      const FocalTerm<acc_t> term = softmax_focal_term<G, acc_t, O>(py, gamma);
      const acc_t fy = factor && valid ? factor[id] : acc_t(1);
      loss = fy * term.value;
      if (grad) {
        const acc_t t_y = fy * term.slope;
        const acc_t k = -t_y * row.inv_total * scale;
        for_classes<kChunk, acc_t>(x, C, inner, [&](int64_t c, acc_t xc) {
          grad[c * inner] = static_cast<scalar_t>(c == id ? t_y * py.one_minus_p * scale : O::exp(xc - m) * k);
        });
      }
    } else {
      acc_t sum_t = 0;
      for_classes<kChunk, acc_t>(x, C, inner, [&](int64_t c, acc_t xc) { smoothed.add(row, c, id, xc, loss, sum_t); });
      if (grad) {
        for_classes<kChunk, acc_t>(x, C, inner, [&](int64_t c, acc_t xc) {
          grad[c * inner] = static_cast<scalar_t>(smoothed.grad(row, c, id, xc, sum_t) * scale);
        });
      }
    }
    if (loss_all) loss_all[e] = static_cast<scalar_t>(loss * scale);
    return loss;
  };

  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kSoftmaxThreads / kWarp);
  const int64_t span = int64_t{kWarp} * tiles.per_tile;  // elements per tile
  int64_t touched = 0;
  for (int64_t tile = (static_cast<int64_t>(blockIdx.x) * kSoftmaxThreads + threadIdx.x) / kWarp;
       tile < tiles.count; tile += warps) {
    acc_t lane_sum = 0;
    for (int64_t k = 0; k < tiles.per_tile; ++k) {
      const int64_t e = tile * span + k * kWarp + lane;
      if (e >= elements) break;
      touched += C;
      const acc_t loss = element(e);
      lane_sum = k == 0 ? loss : add_rn(lane_sum, loss);
    }
    if (tile_sums != nullptr) store_tile_sum(lane_sum, tile, tile_sums);
  }
  trace_elements(touched);
}

// The layouts softmax_elements_ring_kernel takes, by how a warp copies a step of a unit (a warp's
// 32 elements; a step is 16 bytes a lane):
// - kPixelPieces: segmentation logits (inner > 1) whose images hold whole units (inner a multiple
//   of 32), so that a class's 32 logits of a unit are 32 * sizeof(scalar_t) contiguous bytes,
//   kPixelPieces<scalar_t> 16-byte pieces: a step holds kWarp / kPixelPieces classes of the unit,
//   lane l copying piece l % kPixelPieces of class l / kPixelPieces;
// - kPixelWords: segmentation logits of any other image size (float32), or of an even one (16-bit
//   data), and those that are 4-byte but not 16-byte aligned: a unit may straddle two images, and a
//   class's 32 logits need not start a 16-byte block, so each lane copies the 4-byte word that holds
//   its own position's logit of each of the step's classes (in 16-bit data two neighbouring lanes'
//   one word, half the step's classes each). The step holds what kPixelPieces's does, where
//   kPixelPieces's does: every lane reads its position of each class the same way;
// - kRows: rows (inner 1) of at most kThreadRowClasses classes, 16-byte aligned, lane l's row from
//   the 16-byte block that holds its first logit; a step is the next block of each lane's row, which
//   it copies and reads itself.
enum class ElementLayout { kPixelPieces, kPixelWords, kRows };

// How softmax_elements_ring_kernel walks its steps, made by the host: a pass over a unit's classes
// takes `steps` steps, and a unit three passes (maximum, sum of exponentials, gradient).
template <typename scalar_t>
inline constexpr int kPixelPieces = kWarp * static_cast<int>(sizeof(scalar_t)) / 16;
struct ElementSteps {
  uint32_t steps = 1;
  Divider per_pass;   // q / steps
  Divider per_unit;   // q / (3 steps)
  Divider per_image;  // e / inner (segmentation logits)

  // The layout in which the ring takes logits (outer, C, inner) of `element_bytes` at `logits`, if
  // it takes them: 16- or 32-bit data, indices in 32 bits, and rows of at most kThreadRowClasses
  // classes, or segmentation logits (16-bit: an even number of positions an image); whole 16-byte
  // blocks are copied from 16-byte aligned logits, words from 4-byte aligned ones.
  static std::optional<ElementLayout> layout_of(int64_t outer, int64_t C, int64_t inner, int64_t element_bytes,
                                                const void* logits) {
    const auto address = reinterpret_cast<uintptr_t>(logits);
    if (C <= 0 || element_bytes > 4 || outer * C * inner >= (int64_t{1} << 31)) return std::nullopt;
    if (inner == 1) {
      if (C <= kThreadRowClasses && address % 16 == 0) return ElementLayout::kRows;
    } else if (inner % kWarp == 0 && address % 16 == 0) {
      return ElementLayout::kPixelPieces;
    } else if ((element_bytes == 4 || inner % 2 == 0) && address % 4 == 0) {
      return ElementLayout::kPixelWords;
    }
    return std::nullopt;
  }
  static ElementSteps make(int64_t C, int64_t inner, int64_t element_bytes) {
    ElementSteps p;
    // Segmentation logits: a step is 512 bytes, 16 / element_bytes classes of 32 positions. A row:
    // its C * element_bytes bytes, from up to 15 bytes into their first 16-byte block, 16 a step.
    const int64_t bytes = C * element_bytes + (inner == 1 ? 15 : 0);
    p.steps = static_cast<uint32_t>((bytes + 15) / 16);
    p.per_pass = Divider::make(p.steps);
    p.per_unit = Divider::make(int64_t{3} * p.steps);
    p.per_image = Divider::make(inner);
    return p;
  }
};

// softmax_elements_kernel's "ring" variant, for the logits ElementSteps::layout_of takes, without
// label smoothing: the same tiles of units, the same math in the same order for each element (the
// same bits), but the logits reach the warp through shared memory. The warp streams its tile's
// units, each unit's logits three times (once a pass), through a ring of kSteps steps of 16 bytes a
// lane (4 KiB): step q of the tile is unit q / (3 steps), pass q / steps mod 3, and its (q mod
// steps)-th step of that pass (ElementSteps); each lane's 16 bytes of it are copied (cp.async, as
// kLayout says), each step is its own group, and step q + kSteps - 1 is requested before step q is
// used, into the slot that step q - 1 held (every lane is done with it: a __syncwarp), so that
// kSteps - 1 groups of 16 bytes a lane are in flight while a step is used. An element that is
// ignored computes as the others do and writes zeros; a lane past the last element computes on
// what its slots hold and writes nothing.
template <typename scalar_t, GammaKind G, ElementLayout kLayout>
__global__ void __launch_bounds__(kSoftmaxThreads, 12)
    softmax_elements_ring_kernel(SoftmaxArgs a, SoftmaxScale s, SoftmaxTiles tiles, ElementSteps ps,
                                 at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using O = SoftmaxMathFor<scalar_t>;
  static_assert(sizeof(scalar_t) <= 4, "the ring holds 16- and 32-bit logits");
  constexpr uint32_t kSize = sizeof(scalar_t);
  constexpr bool kRowsLayout = kLayout == ElementLayout::kRows;
  constexpr int kPieces = kPixelPieces<scalar_t>;
  constexpr int kPerStep = 16 / kSize;  // classes a step, at most
  constexpr uint32_t kWordElements = 4 / kSize;  // a lane's word of segmentation logits: 1 or 2 positions
  constexpr int kSteps = 8;
  constexpr int kElementsPerPiece = 16 / static_cast<int>(kSize);
  __shared__ Bytes16 ring[kSoftmaxThreads / kWarp][kSteps * kWarp];
  Bytes16* slots = ring[threadIdx.x / kWarp];
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const auto C = static_cast<uint32_t>(a.classes), inner = static_cast<uint32_t>(a.inner);
  const auto elements = static_cast<uint32_t>(a.outer * a.inner);
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  const uint32_t lane = threadIdx.x % kWarp;
  const uint32_t S = ps.steps;
  const uint32_t warps = gridDim.x * (kSoftmaxThreads / kWarp);
  const auto per_tile = static_cast<uint32_t>(tiles.per_tile);
  const int64_t all_bytes = int64_t{elements} * C * kSize;  // rows: the logits' bytes
  int64_t touched = 0;
  for (uint32_t tile = (blockIdx.x * kSoftmaxThreads + threadIdx.x) / kWarp; tile < tiles.count; tile += warps) {
    const uint32_t first = tile * per_tile * kWarp;  // the tile's first element
    const uint32_t left = (elements - first + kWarp - 1) / kWarp;  // units from `first` on
    const uint32_t units = left < per_tile ? left : per_tile;
    const uint32_t total = units * 3 * S;  // the tile's steps
    // This lane's 16 bytes of step q, if the tile has them, and a group either way.
    const auto request = [&](uint32_t q) {
      if (q < total) {
        const uint32_t unit = ps.per_unit(q);
        const uint32_t j = q - ps.per_pass(q) * S;  // the step within its pass
        Bytes16* slot = &slots[(q % kSteps) * kWarp + lane];
        if constexpr (kRowsLayout) {
          const uint32_t e = first + unit * kWarp + lane;
          if (e < elements) {
            const int64_t block = (int64_t{e} * C * kSize & ~int64_t{15}) + int64_t{16} * j;
            if (block < all_bytes) {
              const int64_t rest = all_bytes - block;
              async_copy_head(slot, reinterpret_cast<const char*>(x_all) + block,
                              static_cast<uint32_t>(rest < 16 ? rest : 16));
            }
          }
        } else if constexpr (kLayout == ElementLayout::kPixelPieces) {
          const uint32_t c = j * kPerStep + lane / kPieces;
          if (c < C) {
            const uint32_t e = first + unit * kWarp;
            const uint32_t n = ps.per_image(e);
            async_copy<16>(slot, x_all + (int64_t{n} * C + c) * inner + (e - n * inner) +
                                     (lane % kPieces) * kElementsPerPiece);
          }
        } else {
          // The word of positions w, w + 1 (16-bit) of the unit, of the step's classes i = lane % 2,
          // lane % 2 + 2, ... (float32: position `lane`, every class i of the step), to where
          // kPixelPieces's lanes copy position w of class i: byte (i * kWarp + w) * kSize of the step.
          const uint32_t w = lane / kWordElements * kWordElements;
          const uint32_t e = first + unit * kWarp + w;
          if (e < elements) {
            const uint32_t n = ps.per_image(e);
            const scalar_t* x = x_all + (int64_t{n} * C + j * kPerStep) * inner + (e - n * inner);
            char* step = reinterpret_cast<char*>(&slots[(q % kSteps) * kWarp]) + w * kSize;
#pragma unroll
            for (uint32_t t = 0; t < kPerStep / kWordElements; ++t) {
              const uint32_t i = t * kWordElements + lane % kWordElements;
              if (j * kPerStep + i >= C) break;
              async_copy<4>(step + i * kWarp * kSize, x + int64_t{i} * inner);
            }
          }
        }
      }
      async_commit();
    };
    __syncwarp();  // every lane is done with the last tile's slots
#pragma unroll 1
    for (uint32_t q = 0; q < kSteps - 1; ++q) request(q);

    acc_t lane_sum = 0;
    uint32_t unit = 0, pass = 0, j = 0;  // step q's
    int64_t id = 0;
    bool valid = false;
    acc_t m = 0, x_y = 0, k = 0, g_y = 0, loss = 0;
    SoftmaxSums<acc_t> sums;
#pragma unroll 1
    for (uint32_t q = 0; q < total; ++q) {
      __syncwarp();  // every lane is done with step q - 1's slot
      request(q + kSteps - 1);
      async_wait<kSteps - 1>();
      __syncwarp();  // step q's bytes seen by every lane
      const uint32_t e = first + unit * kWarp + lane;
      const bool live = kLayout == ElementLayout::kPixelPieces || e < elements;  // (pieces: whole units)
      if (pass == 0 && j == 0) {
        id = live ? a.target[e] : a.ignore_index;
        valid = id >= 0 && id < static_cast<int64_t>(C);  // else NaN, as softmax_elements_kernel
        sums = SoftmaxSums<acc_t>{};
      }
      scalar_t* grad = nullptr;
      if (pass == 2 && grad_all && live) {
        if constexpr (kRowsLayout) {
          grad = grad_all + int64_t{e} * C;
        } else {
          const uint32_t n = ps.per_image(e);
          grad = grad_all + int64_t{n} * C * inner + (e - n * inner);
        }
      }
      // f(c, logit) for the step's classes c, in order: segmentation logits' classes j * kPerStep
      // on, each its 32 positions (this lane's at position `lane`); a row's those whose bytes lie in
      // the step's block of it, `skew` bytes after the block of its first logit.
      const auto for_step = [&](auto&& f) {
        const char* bytes = reinterpret_cast<const char*>(kRowsLayout ? &slots[(q % kSteps) * kWarp + lane]
                                                                       : &slots[(q % kSteps) * kWarp]);
        uint32_t c_begin = j * kPerStep, c_end = C, skew = 0;
        if constexpr (kRowsLayout) {
          skew = e * C * kSize % 16;  // the low bits of the row's byte offset
          c_begin = j == 0 ? 0 : (16 * j - skew) / kSize;
          const uint32_t past = (16 * (j + 1) - skew) / kSize;
          c_end = past < C ? past : C;
        }
#pragma unroll
        for (int i = 0; i < kPerStep; ++i) {
          const uint32_t c = c_begin + i;
          if (c >= c_end) break;
          const uint32_t at = kRowsLayout ? skew + c * kSize - 16 * j : (i * kWarp + lane) * kSize;
#if defined(FOCAL_CUDA_EMULATION)
          scalar_t raw;
          memcpy(&raw, bytes + at, sizeof(scalar_t));
#else
          const scalar_t raw = *reinterpret_cast<const scalar_t*>(bytes + at);
#endif
          f(c, static_cast<acc_t>(raw));
        }
      };
      if (pass == 0) {
        for_step([&](uint32_t c, acc_t v) {
          if (c == 0) m = v;  // softmax_max(x0, x0) is x0
          m = softmax_max<acc_t, O>(m, v);
          if (c == id) x_y = v;
        });
      } else if (pass == 1) {
        for_step([&](uint32_t, acc_t v) { softmax_accumulate<acc_t, O>(sums, v - m); });
      } else if (grad) {
        const bool kept = id != a.ignore_index;
        for_step([&](uint32_t c, acc_t v) {
          grad[int64_t{c} * inner] = kept ? static_cast<scalar_t>(c == id ? g_y : O::exp(v - m) * k) : scalar_t(0);
        });
      }
      if (j == S - 1 && pass == 1) {  // the sums are known: the element's loss and its gradient's factors
        if (!valid) sums.below = static_cast<acc_t>(NAN);
        const SoftmaxRow<acc_t> row = softmax_row<acc_t, O>(m, sums.below, sums.ties);
        const HardTerms<G, O, acc_t> h(row, valid ? x_y : m, factor && valid ? factor[id] : acc_t(1), gamma);
        loss = h.loss();
        k = h.k(row, scale);
        g_y = h.target_grad(scale);
      }
      if (j == S - 1 && pass == 2 && live) {  // the element is done
        const bool kept = id != a.ignore_index;
        if (loss_all) loss_all[e] = kept ? static_cast<scalar_t>(loss * scale) : scalar_t(0);
        const acc_t element_loss = kept ? loss : acc_t(0);
        lane_sum = unit == 0 ? element_loss : add_rn(lane_sum, element_loss);
        touched += C;
      }
      if (++j == S) {
        j = 0;
        if (++pass == 3) {
          pass = 0;
          ++unit;
        }
      }
    }
    if (tile_sums != nullptr) store_tile_sum(lane_sum, tile, tile_sums);
  }
  trace_elements(touched);
}

// Rows of kThreadRowClasses + 1 to kWarpRowClasses classes take a group of lanes each: 16 for rows
// of up to 128 classes (two rows per warp), 32 for longer ones. Lane g of a group holds classes
// g, g + G, ..., g + G (kWarpRowLoads - 1) of its row in registers, all loaded before any is used,
// for the row's three passes: one read of the logits, where a block per row reads them three times
// (with 48 of its 128 threads idle at 80 classes, and five barriers per row).
constexpr int kWarpRowLoads = 8;
constexpr int64_t kWarpRowClasses = int64_t{kWarp} * kWarpRowLoads;
// The lanes per row that rows of C classes take (kThreadRowClasses < C <= kWarpRowClasses).
inline constexpr int warp_row_lanes(int64_t C) { return C <= kWarpRowClasses / 2 ? kWarp / 2 : kWarp; }
// The warp-per-row kernel's variants, by index (the host's table per architecture and
// FOCAL_CUDA_SOFTMAX_ROWS_VARIANT name them so): where a row's logits wait between their request
// and their use. "registers": each lane requests its classes of the row, up to 8 logits, and the
// row's id into registers (40 bytes in flight in float32, 24 in 16-bit data); "ring": the warp
// streams its tile's rows through shared memory (WarpRowRing), 16 bytes a lane in each of the 6
// steps in flight, held in no register. The same names pick the block-per-row kernel's variants:
// "ring" streams a block's rows through 16 KiB (BlockRowRing). The host takes "registers" for
// float64, for logits that are not 16-byte aligned (the ring's first block would begin before
// them) and for rows longer than a ring's round.
inline constexpr int kRowVariantCount = 2;
// static: each library built from this (the extension, its emulation) has its own names, and a
// process that loads both reads each library's with its own count.
static constexpr const char* kRowVariantNames[kRowVariantCount] = {"registers", "ring"};

// f(std::bool_constant<through the ring>) for the variant of that index ("registers" for any other).
template <typename F>
decltype(auto) with_row_variant(int index, F&& f) {
  if (index == 1) return f(std::true_type{});
  return f(std::false_type{});
}

// Blocks per SM its registers must allow: 12 (40 registers, 75 % occupancy) for 16- and 32-bit
// data at gamma 0, 1 and 2; 8 (64 registers) with label smoothing (a second sum, per-class weights)
// or a general gamma (a log and an exp per class), which spill under 40; float64, whose math takes
// about twice the registers, 4.
template <typename scalar_t, GammaKind G, bool kSmooth>
inline constexpr int kWarpRowBlocksPerSm =
    sizeof(scalar_t) == 8 ? 4 : kSmooth || G == GammaKind::kGeneral ? 8 : 12;

// Each group of kLanes lanes' values combined by `op` in lanes_tree's fixed tree (tile_sums.cuh),
// and the group's first lane's result given to every lane of the group, so that all of them hold
// the same bits. Every lane of the warp calls it.
template <int kLanes, typename acc_t, typename Op>
__device__ __forceinline__ acc_t group_reduce(acc_t v, Op op) {
  v = lanes_tree<kLanes>(v, op);
  return __shfl_sync(0xffffffffu, v, static_cast<int>(threadIdx.x % kWarp) / kLanes * kLanes);
}

// The group's sum, and its maximum by softmax_max (the maximum of +0 and -0 is its first operand: a
// tree fixed by the data fixes which one).
template <int kLanes, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
  return group_reduce<kLanes>(v, [](acc_t a, acc_t b) { return add_rn(a, b); });
}
template <int kLanes, typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t v) {
  return group_reduce<kLanes>(v, MaxOp{});
}

// The warp-per-row kernel's ring: 4 KiB a warp, rounds of at most 1 KiB (kWarpRowClasses 4-byte logits).
using WarpRowRing = RowRing<kWarp, 8, 2>;
static_assert(WarpRowRing::kRoundBytes >= kWarpRowClasses * 4, "a round of 16- or 32-bit logits fits");

// A group of kLanes lanes per row. Warp w of the grid takes tiles of tiles.per_tile rounds of
// kRows = 32 / kLanes rows, w, w + (the grid's warps), ..., a round at a time (group j its j-th row,
// if the data has it); a row's sums are each lane's classes in order, then its group's lanes' sums
// in group_sum's tree; every lane of a group computes its row's loss from the same bits, and the
// warp adds a tile's rows' losses in their order (the same bits in every lane) and lane 0 writes
// the tile's sum. kRing: the logits come through the warp's RowRing, and each round's ids are
// requested a round ahead; the same values in the same order, so the same bits.
template <typename scalar_t, GammaKind G, bool kSmooth, int kLanes, bool kRing>
__global__ void __launch_bounds__(kSoftmaxThreads, kWarpRowBlocksPerSm<scalar_t, G, kSmooth>)
    softmax_warp_rows_kernel(SoftmaxArgs a, SoftmaxScale s, SoftmaxTiles tiles,
                             at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using O = SoftmaxMathFor<scalar_t>;
  static_assert(!kRing || sizeof(scalar_t) <= 4, "a round of float64 spans more steps than the ring allows");
  constexpr int K = kWarpRowLoads;
  constexpr int kRows = kWarp / kLanes;  // rows a warp takes at a time
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const int C = static_cast<int>(a.classes);  // at most kWarpRowClasses
  const SmoothedTerms<G, O, acc_t> smoothed(a, gamma);
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const auto* logits = static_cast<const scalar_t*>(a.logits);
  const int lane = threadIdx.x % kWarp;
  const int group = lane / kLanes, in_group = lane % kLanes;
  // The lane's slots i < K hold classes in_group + kLanes i: the row's below `held`; no lane has a
  // class in slot `slots` or after, which the whole warp skips by one branch.
  const int held = C > in_group ? (C - 1 - in_group) / kLanes + 1 : 0;
  const int slots = (C + kLanes - 1) / kLanes;
  const auto for_held = [&](auto&& f) {
    if constexpr (kRing) {
#pragma unroll 1
      for (int i = 0; i < held; ++i) f(i, in_group + kLanes * i);
    } else {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        if (i >= slots) break;
        if (i < held) f(i, in_group + kLanes * i);
      }
    }
  };

  // Row r's loss (unscaled; 0 if ignored; the same in every lane of the group), its logits x[c]
  // (a pointer, or RingRow) and its class id `id`, with its gradient and, for reduction "none", its
  // scaled loss written. Every lane of the warp calls it, for the shuffles: a group without a row
  // (`live` false: past a tile's last row, id ignore_index) computes on zeros (through the ring, on
  // whatever the ring holds) and writes nothing.
  const auto one_row = [&](uint32_t r, bool live, const auto& x, int64_t id) -> acc_t {
    scalar_t* grad = a.grad ? static_cast<scalar_t*>(a.grad) + int64_t{r} * C : nullptr;
    // From memory, the row's logits are requested with its class id, before either is used (an
    // ignored row's too: a few percent of rows, read for nothing, against a latency paid once per
    // row), and held in registers for the three passes; the ring's are read from it in each pass.
    acc_t v[K];
    if constexpr (!kRing) {
      scalar_t held_x[K] = {};
      if (live) for_held([&](int i, int c) { held_x[i] = x[c]; });
#pragma unroll
      for (int i = 0; i < K; ++i) v[i] = static_cast<acc_t>(held_x[i]);
    }
    const auto value = [&](int i, int c) -> acc_t {
      if constexpr (kRing) {
        return static_cast<acc_t>(x[c]);
      } else {
        return v[i];
      }
    };
    const bool kept = id != a.ignore_index;  // false for a group without a row
    if (live && !kept) {
      if (a.loss && in_group == 0) static_cast<scalar_t*>(a.loss)[r] = scalar_t(0);
      if (grad) for_held([&](int, int c) { grad[c] = scalar_t(0); });
    }
    if (!kept) grad = nullptr;
    const bool valid = kept && id >= 0 && id < C;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for_held([&](int i, int c) { m = softmax_max<acc_t, O>(m, value(i, c)); });
    m = group_max<kLanes>(m);
    SoftmaxSums<acc_t> sums;
    for_held([&](int i, int c) { softmax_accumulate<acc_t, O>(sums, value(i, c) - m); });
    const acc_t below = group_sum<kLanes>(sums.below);
    const acc_t ties = group_sum<kLanes>(sums.ties);
    const SoftmaxRow<acc_t> row = softmax_row<acc_t, O>(m, valid ? below : static_cast<acc_t>(NAN), ties);

    acc_t loss;
    if constexpr (!kSmooth) {
      const HardTerms<G, O, acc_t> h(row, x, id, valid, factor, gamma);
      loss = h.loss();
      if (grad) {
        const acc_t k = h.k(row, scale), g_y = h.target_grad(scale);
        const int y = valid ? static_cast<int>(id) : -1;  // the target's class, in 32 bits (C <= 256)
        // exp(x - m) again, the same bits as the sum's: kept, the 8 values spill under 40 registers.
        for_held([&](int i, int c) { grad[c] = static_cast<scalar_t>(c == y ? g_y : O::exp(value(i, c) - m) * k); });
      }
    } else {
      acc_t part_loss = 0, part_t = 0;
      for_held([&](int i, int c) { smoothed.add(row, c, id, value(i, c), part_loss, part_t); });
      loss = group_sum<kLanes>(part_loss);
      const acc_t sum_t = group_sum<kLanes>(part_t);
      if (grad) {
        for_held([&](int i, int c) {
          grad[c] = static_cast<scalar_t>(smoothed.grad(row, c, id, value(i, c), sum_t) * scale);
        });
      }
    }
    if (!kept) return acc_t(0);
    if (a.loss && in_group == 0) static_cast<scalar_t*>(a.loss)[r] = static_cast<scalar_t>(loss * scale);
    return loss;
  };

  // Rows and tiles in 32 bits: the host gives this kernel fewer than 2^31 rows.
  const uint32_t warps = gridDim.x * (kSoftmaxThreads / kWarp);
  // Tiles of tiles.per_tile rounds of kRows rows (SoftmaxTiles::make(rows, kRows)).
  const uint32_t rows = static_cast<uint32_t>(a.outer), per_tile = static_cast<uint32_t>(tiles.per_tile) * kRows;
  __shared__ Bytes16 ring_slots[kRing ? kSoftmaxThreads / kWarp : 1][kRing ? WarpRowRing::kSteps * kWarp : 1];
  WarpRowRing ring(ring_slots[kRing ? threadIdx.x / kWarp : 0]);
  const uint32_t row_bytes = static_cast<uint32_t>(C) * static_cast<uint32_t>(sizeof(scalar_t));
  int64_t touched = 0;
  // A tile is known by its first row alone (its number, first / per_tile, is needed once): one value
  // carried from tile to tile, not two.
  for (uint32_t first = (blockIdx.x * kSoftmaxThreads + threadIdx.x) / kWarp * per_tile; first < rows;
       first += warps * per_tile) {
    const uint32_t end = rows - first > per_tile ? first + per_tile : rows;
    uint32_t offset = 0;  // with the ring, the round's first byte from ring.from
    int64_t id_ahead = a.ignore_index;  // with the ring, the next round's id
    if constexpr (kRing) {
      offset = ring.start(reinterpret_cast<const char*>(logits + int64_t{first} * C),
                          reinterpret_cast<const char*>(logits + int64_t{end} * C));
      if (first + group < end) id_ahead = a.target[first + group];
    }
    // -0 + x is x for every x (-0 + +0 is +0): the sum starts from the first row's loss.
    acc_t sum = -acc_t(0);
    for (uint32_t base = first; base < end; base += kRows, offset += kRows * row_bytes) {
      const bool live = base + group < end;
      if (live) touched += held;
      const uint32_t r = live ? base + group : base;
      acc_t loss;
      if constexpr (kRing) {
        const int64_t id = id_ahead;
        const uint32_t ahead = base + kRows + group;
        id_ahead = ahead < end ? a.target[ahead] : a.ignore_index;
        ring.reach(offset);
        loss = one_row(r, live, RingRow<scalar_t, WarpRowRing>{&ring, offset + (r - base) * row_bytes}, id);
      } else {
        loss = one_row(r, live, logits + int64_t{r} * C, live ? a.target[r] : a.ignore_index);
      }
      // The rows' losses in their order, group j's from its first lane.
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const acc_t lj = kRows == 1 ? loss : __shfl_sync(0xffffffffu, loss, j * kLanes);
        if (base + j < end) sum = add_rn(sum, lj);
      }
    }
    if (tile_sums != nullptr && lane == 0) tile_sums[first / per_tile] = sum;
  }
  trace_elements(touched);
}

// The block-per-row kernel's ring: 16 KiB a block, rows of at most 8 KiB.
using BlockRowRing = RowRing<kSoftmaxThreads, 8, 4>;

// One block per row (rows of more than kWarpRowClasses classes). Block b takes tiles of
// tiles.per_tile rows, b, b + (the grid's blocks), ...; thread 0 adds the losses of a tile's rows
// in their order and writes the tile's sum. Thread t takes classes t, t + 128, ... of each pass,
// kRowChunk of them loaded before any is used (for_strided: the same values in the same order).
// Label smoothing and float64, whose math takes the registers, load one at a time. kRing: the
// block streams its tile's rows through its BlockRowRing (rows of at most kRoundBytes), and each
// pass reads them from there, one class at a time, in the same order (the same bits).
template <typename scalar_t, GammaKind G, bool kSmooth, bool kRing>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_kernel(SoftmaxArgs a, SoftmaxScale s, SoftmaxTiles tiles,
                        at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  static_assert(!kRing || sizeof(scalar_t) <= 4, "the ring holds 16- and 32-bit logits");
  using acc_t = at::opmath_type<scalar_t>;
  using O = SoftmaxMathFor<scalar_t>;
  using BlockReduce = cub::BlockReduce<acc_t, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  __shared__ acc_t broadcast[2];
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const int64_t C = a.classes;
  const SmoothedTerms<G, O, acc_t> smoothed(a, gamma);
  const auto* factor = static_cast<const acc_t*>(a.class_factor);
  const int tid = threadIdx.x;
  constexpr int kRowChunk = sizeof(scalar_t) == 8 || kSmooth || kRing ? 1 : 8;
  // f(c, logit of class c) for the thread's classes of the row x (a pointer, or RingRow), in turn.
  const auto for_mine = [&](const auto& x, auto&& f) {
    for_strided<kRowChunk, kSoftmaxThreads, acc_t>(x, tid, C, 1, f);
  };

  // Every thread of the block reduces `value`; all of them get the result.
  const auto block_sum = [&](acc_t value) {
    const acc_t total = BlockReduce(storage).Sum(value);
    if (tid == 0) broadcast[0] = total;
    __syncthreads();
    const acc_t result = broadcast[0];
    __syncthreads();
    return result;
  };

  // Row r's loss (unscaled; 0 if ignored, valid in thread 0), its logits x[c] (a pointer, or
  // RingRow), with its gradient and, for reduction "none", its scaled loss written.
  const auto one_row = [&](int64_t r, const auto& x) -> acc_t {
    scalar_t* grad = a.grad ? static_cast<scalar_t*>(a.grad) + r * C : nullptr;
    const int64_t id = a.target[r];
    if (id == a.ignore_index) {  // the same branch for the whole block
      if (a.loss && tid == 0) static_cast<scalar_t*>(a.loss)[r] = scalar_t(0);
      if (grad) {
        for (int64_t c = tid; c < C; c += kSoftmaxThreads) grad[c] = scalar_t(0);
      }
      return acc_t(0);
    }
    const bool valid = id >= 0 && id < C;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for_mine(x, [&](int64_t, acc_t xc) { m = softmax_max<acc_t, O>(m, xc); });
    m = BlockReduce(storage).Reduce(m, MaxOp{});
    if (tid == 0) broadcast[1] = m;
    __syncthreads();
    m = broadcast[1];
    __syncthreads();
    SoftmaxSums<acc_t> sums;
    for_mine(x, [&](int64_t, acc_t xc) { softmax_accumulate<acc_t, O>(sums, xc - m); });
    const acc_t below = block_sum(sums.below);
    const acc_t ties = block_sum(sums.ties);
    const SoftmaxRow<acc_t> row =
        softmax_row<acc_t, O>(m, valid ? below : static_cast<acc_t>(NAN), ties);

    acc_t loss;
    if constexpr (!kSmooth) {
      const HardTerms<G, O, acc_t> h(row, x, id, valid, factor, gamma);
      loss = h.loss();
      if (grad) {
        const acc_t k = h.k(row, scale);
        for_mine(x, [&](int64_t c, acc_t xc) {
          grad[c] = static_cast<scalar_t>(c == id ? h.target_grad(scale) : O::exp(xc - m) * k);
        });
      }
    } else {
      acc_t part_loss = 0, part_t = 0;
      for_mine(x, [&](int64_t c, acc_t xc) { smoothed.add(row, c, id, xc, part_loss, part_t); });
      loss = block_sum(part_loss);
      const acc_t sum_t = block_sum(part_t);
      if (grad) {
        for_mine(x, [&](int64_t c, acc_t xc) {
          grad[c] = static_cast<scalar_t>(smoothed.grad(row, c, id, xc, sum_t) * scale);
        });
      }
    }
    if (a.loss && tid == 0) static_cast<scalar_t*>(a.loss)[r] = static_cast<scalar_t>(loss * scale);
    return loss;
  };

  const auto* logits = static_cast<const scalar_t*>(a.logits);
  __shared__ Bytes16 ring_slots[kRing ? BlockRowRing::kSteps * kSoftmaxThreads : 1];
  BlockRowRing ring(ring_slots);
  const auto row_bytes = static_cast<uint32_t>(C * static_cast<int64_t>(sizeof(scalar_t)));  // with the ring
  int64_t touched = 0;
  for (int64_t tile = blockIdx.x; tile < tiles.count; tile += gridDim.x) {
    const int64_t first = tile * tiles.per_tile;
    const int64_t end = first + tiles.per_tile < a.outer ? first + tiles.per_tile : a.outer;
    uint32_t offset = 0;  // with the ring, the row's first byte from ring.from
    if constexpr (kRing) {
      offset = ring.start(reinterpret_cast<const char*>(logits + first * C),
                          reinterpret_cast<const char*>(logits + end * C));
    }
    acc_t sum = 0;  // thread 0's
    for (int64_t r = first; r < end; ++r, offset += row_bytes) {
      if (tid < C) touched += (C - 1 - tid) / kSoftmaxThreads + 1;
      acc_t loss;
      if constexpr (kRing) {
        ring.reach(offset);
        loss = one_row(r, RingRow<scalar_t, BlockRowRing>{&ring, offset});
      } else {
        loss = one_row(r, logits + r * C);
      }
      sum = r == first ? loss : add_rn(sum, loss);
    }
    if (tile_sums != nullptr && tid == 0) tile_sums[tile] = sum;
  }
  trace_elements(touched);
}

}  // namespace focal::cuda
