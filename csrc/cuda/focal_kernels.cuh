// The loss kernels of the CUDA backend (focal_ids_kernel: class ids, the roofline case;
// focal_float_kernel: unweighted float targets; focal_kernel: everything else) and the kernel that
// adds up their per-block totals. Compiled by nvcc, and for tests as host C++ against the emulation
// (kernel_runtime.cuh, README.md).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/OpMathType.h>

#include "../family_math.h"
#include "../kernel_args.h"
#include "device_math.cuh"
#include "kernel_runtime.cuh"

namespace focal::cuda {

constexpr int kThreads = 256;

// Blocks per SM that __launch_bounds__ guarantees to fit in the register file, and the grid's cap
// per SM, so that a full grid is exactly one wave. The float64 kernels need up to 76 registers:
// at 4 blocks (64 registers) they would spill, so they run 3 blocks per SM.
template <typename scalar_t>
inline constexpr int kBlocksPerSm = sizeof(scalar_t) == 8 ? 3 : 4;

// Blocks of kThreads threads for `items` work items (one per thread), at most `max_blocks`.
inline int grid_blocks(int64_t items, int64_t max_blocks) {
  const int64_t wanted = (items + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
}

// The factor applied to every loss and gradient element and to a reduced loss, in double and in
// the CPU backend's order: factor / normaliser / count. The normaliser and the count of the rows
// that are not ignored (the "mean" of class-id targets) may only be known on the device.
struct ScaleArgs {
  double factor = 1.0;                 // the op's scale, divided by a normaliser the host read
  ScalarRef normalizer;                // a normaliser in device memory, or absent
  double count = 1.0;                  // the "mean" denominator when the host knows it
  const int64_t* kept_rows = nullptr;  // else: count = max(*kept_rows * cols, 1)
  int64_t cols = 1;
};

__device__ __forceinline__ double resolve_scale(const ScaleArgs& s) {
  double f = s.factor;
  if (s.normalizer.ptr != nullptr) {
    const double v = load(s.normalizer);
    // The host cannot check a value it never reads: an invalid normaliser poisons the result.
    f = v > 0.0 && v <= DBL_MAX ? f / v : static_cast<double>(NAN);
  }
  double count = s.count;
  if (s.kept_rows != nullptr) {
    const int64_t kept = *s.kept_rows * s.cols;
    count = static_cast<double>(kept > 0 ? kept : 1);
  }
  return f / count;
}

// The loss L of a launch, in the math type of scalar_t with its precision tier's primitives.
template <typename scalar_t, GammaKind G, LossKind L>
using LaunchLoss = ElementLoss<L, G, at::opmath_type<scalar_t>, MathFor<scalar_t>>;

template <typename scalar_t, GammaKind G, LossKind L>
__device__ __forceinline__ LaunchLoss<scalar_t, G, L> launch_loss(const KernelArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  return make_loss<L, G, acc_t, acc_t, MathFor<scalar_t>>(a.alpha, a.gamma, a.beta);
}

// Loss and gradient of element (row, col), alpha- and weight-scaled, not yet times the scale.
template <typename scalar_t, TargetKind TK, GammaKind G, LossKind L>
__device__ __forceinline__ LossAndGrad<at::opmath_type<scalar_t>> element(
    const KernelArgs& a, const LaunchLoss<scalar_t, G, L>& loss, int64_t row, int64_t col,
    at::opmath_type<scalar_t> x, at::opmath_type<scalar_t> t) {
  using acc_t = at::opmath_type<scalar_t>;
  LossAndGrad<acc_t> r;
  if constexpr (TK == TargetKind::kFloat) {
    const acc_t eps = static_cast<acc_t>(a.label_smoothing);
    r = loss.soft(x, t * (acc_t(1) - eps) + eps / 2);
  } else {
    const int64_t id = static_cast<const int64_t*>(a.targets)[row];
    if (id == a.ignore_index) return {acc_t(0), acc_t(0)};
    if (id < -1 || id >= a.cols) {
      // An invalid class id cannot raise without a host sync: make it impossible to miss.
      const acc_t nan = static_cast<acc_t>(NAN);
      return {nan, nan};
    }
    const bool positive = id == col;
    if constexpr (TK == TargetKind::kClassId) {
      r = loss.binary(x, positive);
    } else if constexpr (TK == TargetKind::kClassIdScore) {
      if (positive) {
        r = loss.soft(x, static_cast<acc_t>(static_cast<const scalar_t*>(a.scores)[row]));
      } else {
        r = loss.negative(x);
        r.loss *= loss.alpha.neg;
        r.grad *= loss.alpha.neg;
      }
    } else {
      const acc_t eps = static_cast<acc_t>(a.label_smoothing);
      r = loss.soft(x, positive ? acc_t(1) - eps / 2 : eps / 2);
    }
  }
  acc_t w = acc_t(1);
  if (a.row_weight) w = static_cast<acc_t>(static_cast<const scalar_t*>(a.row_weight)[row]);
  if (a.elem_weight) {
    w *= static_cast<acc_t>(
        static_cast<const scalar_t*>(a.elem_weight)[row * a.elem_weight_row_stride + col]);
  }
  r.loss *= w;
  r.grad *= w;
  return r;
}

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// The elements of a pack in the math type. bfloat16 is the upper half of a float: a shift for the
// even elements and a mask for the odd ones, one instruction each.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void unpack(const Pack<scalar_t, kVec>& p, at::opmath_type<scalar_t> (&out)[kVec]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t words[kVec / 2];
    memcpy(words, p.v, sizeof(words));
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) {
      out[2 * k] = __uint_as_float(words[k] << 16);
      out[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = static_cast<at::opmath_type<scalar_t>>(p.v[j]);
  }
}


// block_sums[blockIdx.x] = the sum of every thread's `sum` in the block, in CUB's order. Every
// thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ void store_block_sum(acc_t sum, acc_t* __restrict__ block_sums) {
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const acc_t total = BlockReduce(storage).Sum(sum);
  if (threadIdx.x == 0) block_sums[blockIdx.x] = total;
}

// Loss (reduction "none") and gradient of every element, times the scale; with `block_sums`, also
// each block's sum of the unscaled losses. Each thread handles packs of kVec consecutive elements
// (16 bytes), grid-stride, read and written with 128-bit accesses when `aligned` (every pointer
// accessed in packs is 16-byte aligned); the last, partial pack takes element accesses.
template <typename scalar_t, TargetKind TK, GammaKind G, LossKind L>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    focal_kernel(KernelArgs a, bool aligned, ScaleArgs s,
                 at::opmath_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const auto loss_fn = launch_loss<scalar_t, G, L>(a);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  const bool packs = aligned || kFaultAssumeAligned;

  acc_t sum = 0;
  int64_t touched = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec; base < n;
       base += stride) {
    const bool vector_io = packs && (base + kVec <= n || kFaultVectorTail);
    P x, t, loss, grad;
    if (vector_io) {
      x = *reinterpret_cast<const P*>(x_all + base);
      if constexpr (TK == TargetKind::kFloat) t = *reinterpret_cast<const P*>(t_all + base);
    } else {
      for (int j = 0; j < kVec; ++j) {
        if (base + j < n) {
          x.v[j] = x_all[base + j];
          if constexpr (TK == TargetKind::kFloat) t.v[j] = t_all[base + j];
        }
      }
    }
    int64_t row = base / a.cols;
    int64_t col = base - row * a.cols;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (base + j < n) {
        const acc_t tj = TK == TargetKind::kFloat ? static_cast<acc_t>(t.v[j]) : acc_t(0);
        const auto r = element<scalar_t, TK, G, L>(a, loss_fn, row, col, static_cast<acc_t>(x.v[j]), tj);
        sum = add_rn(sum, r.loss);
        loss.v[j] = static_cast<scalar_t>(r.loss * scale);
        grad.v[j] = static_cast<scalar_t>(r.grad * scale);
      }
      if (++col == a.cols) {
        col = 0;
        ++row;
      }
    }
    if (vector_io) {
      if (loss_all) *reinterpret_cast<P*>(loss_all + base) = loss;
      if (grad_all) *reinterpret_cast<P*>(grad_all + base) = grad;
    } else {
      for (int j = 0; j < kVec; ++j) {
        if (base + j < n) {
          if (loss_all) loss_all[base + j] = loss.v[j];
          if (grad_all) grad_all[base + j] = grad.v[j];
        }
      }
    }
    touched += n - base < kVec ? n - base : kVec;
  }
  trace_elements(touched);
  if (block_sums) store_block_sum(sum, block_sums);
}

// Float targets (torchvision's form) without weights, 16-byte aligned logits, targets and outputs:
// no rows at all. Each thread takes one pack of logits and one of targets per step, grid-stride, in
// the order of focal_kernel (so its sums are bitwise focal_kernel's: tests/cuda_cases.py models
// both); the partial last pack, if any, falls to the thread whose turn it is, after the loop.
template <typename scalar_t, GammaKind G>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    focal_float_kernel(KernelArgs a, ScaleArgs s, at::opmath_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = MathFor<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const AlphaWeights<acc_t> alpha = make_alpha<acc_t, acc_t>(a.alpha);
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const acc_t eps = static_cast<acc_t>(a.label_smoothing);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);

  const auto one = [&](acc_t x, acc_t t) {
    return focal_target<G, acc_t, M>(x, t * (acc_t(1) - eps) + eps / 2, gamma, alpha);
  };
  const int64_t full_packs = n / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0;
  int64_t touched = 0;
  for (; p < full_packs; p += stride) {
    const P x = reinterpret_cast<const P*>(x_all)[p];
    const P t = reinterpret_cast<const P*>(t_all)[p];
    acc_t xf[kVec], tf[kVec];
    unpack(x, xf);
    unpack(t, tf);
    P loss, grad;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const LossAndGrad<acc_t> r = one(xf[j], tf[j]);
      sum = add_rn(sum, r.loss);
      loss.v[j] = static_cast<scalar_t>(r.loss * scale);
      grad.v[j] = static_cast<scalar_t>(r.grad * scale);
    }
    if (loss_all) reinterpret_cast<P*>(loss_all)[p] = loss;
    if (grad_all) reinterpret_cast<P*>(grad_all)[p] = grad;
    touched += kVec;
  }
  for (int64_t e = p * kVec; e < n; ++e) {  // the partial last pack: only one thread gets here
    const LossAndGrad<acc_t> r = one(static_cast<acc_t>(x_all[e]), static_cast<acc_t>(t_all[e]));
    sum = add_rn(sum, r.loss);
    if (loss_all) loss_all[e] = static_cast<scalar_t>(r.loss * scale);
    if (grad_all) grad_all[e] = static_cast<scalar_t>(r.grad * scale);
    ++touched;
  }
  trace_elements(touched);
  if (block_sums) store_block_sum(sum, block_sums);
}

// Elements [e0, e0 + len) of a class-id launch, one at a time (row, col: those of e0): their
// loss (reduction "none") and gradient times `scale` written out; returns the sum of their
// alpha-weighted losses. What focal_ids_kernel leaves to the general code; not inlined, so that
// the fast loop stays short.
template <typename scalar_t, GammaKind G, LossKind L>
__device__ __noinline__ at::opmath_type<scalar_t> focal_chunk_slow(
    const KernelArgs& a, at::opmath_type<scalar_t> scale, int64_t e0, int len, int64_t row,
    int64_t col) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr TargetKind TK = L == LossKind::kFocal ? TargetKind::kClassId : TargetKind::kClassIdScore;
  const auto loss = launch_loss<scalar_t, G, L>(a);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  acc_t sum = 0;
  for (int j = 0; j < len; ++j) {
    const auto r = element<scalar_t, TK, G, L>(a, loss, row, col, static_cast<acc_t>(x_all[e0 + j]), acc_t(0));
    sum += r.loss;
    if (loss_all) loss_all[e0 + j] = static_cast<scalar_t>(r.loss * scale);
    if (grad_all) grad_all[e0 + j] = static_cast<scalar_t>(r.grad * scale);
    if (++col == a.cols) {
      col = 0;
      ++row;
    }
  }
  return sum;
}

// Elements each thread of focal_ids_kernel takes per step: two 16-byte packs.
template <typename scalar_t>
inline constexpr int kIdsChunk = 2 * 16 / static_cast<int>(sizeof(scalar_t));

// Class-id targets without label smoothing or per-element weights, a reduced loss, 16-byte aligned
// logits and gradient: the loss of dense detection, written for the memory roofline
// (csrc/cuda/README.md). Each thread takes chunks of two 16-byte packs, grid-stride, and follows
// its chunk's row and column incrementally (no division in the loop); each trip loads the next
// chunk's class id with this chunk's logits. A chunk within one row and without a positive (nearly
// every chunk: a row has at most one positive among its C classes, a background row none) runs
// focal_hard with z = x on every element, alpha's negative weight and the scale folded into one
// factor; a chunk of an ignored row writes zeros; any other chunk (a positive, an invalid id, a row
// boundary, the tail) goes to focal_chunk_slow.
//
// L is the focal loss, or QFL / VFL with class ids and scores: their negatives are focal_hard with
// z = x too (with QFL's beta or VFL's gamma as the exponent and VFL's alpha as the negatives'
// weight), and a positive's score is read by focal_chunk_slow alone.
template <typename scalar_t, GammaKind G, LossKind L>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    focal_ids_kernel(KernelArgs a, ScaleArgs s, at::opmath_type<scalar_t>* __restrict__ block_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = MathFor<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kChunk = kIdsChunk<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  const int64_t cols = a.cols;
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  static_assert(L != LossKind::kFocalStar, "FL*'s negatives are not focal_hard");
  const AlphaWeights<acc_t> alpha = loss_alpha<L, acc_t, acc_t>(a.alpha);
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const acc_t negative_grad_w = alpha.neg * scale;
  const auto* ids = static_cast<const int64_t*>(a.targets);
  const auto* x_all = static_cast<const P*>(a.logits);
  auto* grad_all = static_cast<P*>(a.grad);

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kChunk;
  // Columns in 32 bits: the host takes this kernel only for rows of fewer than 2^30 elements, so
  // that col + stride_cols (both below cols) never reaches 2^31.
  const int64_t stride_rows = stride / cols;
  const int32_t stride_cols = static_cast<int32_t>(stride - stride_rows * cols);
  const int32_t cols32 = static_cast<int32_t>(cols);
  int64_t e0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kChunk;
  int64_t row = e0 / cols;
  int32_t col = static_cast<int32_t>(e0 - row * cols);
  acc_t negatives = 0;  // losses of the fast chunks, before alpha's negative weight
  acc_t others = 0;     // alpha- and weight-scaled losses of the other chunks
  int64_t touched = 0;
  const auto next_chunk = [&]() {
    e0 += stride;
    col += stride_cols;
    row += stride_rows;
    if (col >= cols32) {
      col -= cols32;
      ++row;
    }
  };
  // The loop twice, with and without the gradient (a forward under no_grad), so that neither
  // tests for it per chunk.
  const auto run = [&](auto writes_grad) {
    while (e0 < n) {
      // The fast chunks, one after another: the loop that runs for nearly every element. The call
      // to focal_chunk_slow stays outside it, so nothing in it waits for or spills around a call.
      // Each trip loads the next chunk's class id together with this chunk's logits: the branch on
      // a class id never waits for memory, and a trip costs one memory latency, not two.
      int64_t label = ids[row];
      while (true) {
        // The chunk ends in this row (so both packs lie inside the logits), and the row is
        // ignored, or -1 <= label < cols with label outside [col, col + kChunk).
        const bool ignored = label == a.ignore_index;
        const bool negative =
            static_cast<uint64_t>(label) + 1 <= static_cast<uint64_t>(cols) &&
            static_cast<uint64_t>(label - col) >= static_cast<uint64_t>(kChunk);
        const bool fast = col + kChunk <= cols32 && (ignored || negative);
        if (!fast) break;
        const uint64_t p = static_cast<uint64_t>(e0) / kVec;  // unsigned: a shift, no sign fix-up
        const P x[2] = {x_all[p], x_all[p + 1]};
        next_chunk();
        const bool more = e0 < n;
        const int64_t next_label = more ? ids[row] : 0;
        if (ignored) {
          // An ignored row (a few percent of anchors in detection) stays in this loop, with no
          // loss and a zero gradient whatever its logits: a thread that left the loop for it
          // would idle the rest of its warp until every thread had left.
          if constexpr (decltype(writes_grad)::value) {
            grad_all[p] = P{};
            grad_all[p + 1] = P{};
          }
        } else {
          P grad[2];
          acc_t pack_sums[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            acc_t xf[kVec];
            unpack(x[h], xf);
            pack_sums[h] = 0;
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
              const LossAndGrad<acc_t> r = focal_hard<G, acc_t, M>(xf[j], gamma);
              pack_sums[h] += r.loss;
              grad[h].v[j] = static_cast<scalar_t>(r.grad * negative_grad_w);
            }
          }
          // Summed per pack first: the thread's running sum takes one rounding per chunk rather
          // than one per element (8 to 16 times fewer on a sum over billions of elements).
          negatives += pack_sums[0] + pack_sums[1];
          if constexpr (decltype(writes_grad)::value) {
            grad_all[p] = grad[0];
            grad_all[p + 1] = grad[1];
          }
        }
        touched += kChunk;
        if (!more) break;
        label = next_label;
      }
      if (e0 >= n) break;
      const int len = n - e0 < kChunk ? static_cast<int>(n - e0) : kChunk;
      others += focal_chunk_slow<scalar_t, G, L>(a, scale, e0, len, row, col);
      touched += len;
      next_chunk();
    }
  };
  if (grad_all != nullptr) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
  trace_elements(touched);
  if (block_sums) {
    // alpha = 1 gives negatives no weight: their sum, even an overflowed one, counts 0 (inf * 0 is NaN).
    store_block_sum(alpha.neg == acc_t(0) ? others : negatives * alpha.neg + others, block_sums);
  }
}

// *out = scale * (sum of block_sums), the sum in an order fixed by `blocks`: thread i adds
// block_sums[i], [i + kThreads], ... in turn, then cub::BlockReduce adds the threads' sums.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_blocks_kernel(const acc_t* __restrict__ block_sums, int blocks, ScaleArgs s,
                      acc_t* __restrict__ out) {
  acc_t sum = 0;
  for (int i = threadIdx.x; i < blocks; i += kThreads) sum = add_rn(sum, block_sums[i]);
  using BlockReduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const acc_t total = BlockReduce(storage).Sum(sum);
  // In double, as the CPU backend scales its sum.
  if (threadIdx.x == 0) *out = static_cast<acc_t>(static_cast<double>(total) * resolve_scale(s));
}

}  // namespace focal::cuda
