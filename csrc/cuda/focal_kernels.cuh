// The loss kernels of the CUDA backend (focal_ids_kernel: class ids, the roofline case;
// focal_float_kernel: unweighted float targets; focal_kernel: everything else); their tiles' sums
// are added by tile_sums.cuh. Compiled by nvcc, and for tests as host C++ against the emulation
// (kernel_runtime.cuh, README.md).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include <ATen/OpMathType.h>

#include "../family_math.h"
#include "../kernel_args.h"
#include "device_math.cuh"
#include "kernel_runtime.cuh"
#include "tile_sums.cuh"

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
// kClassAlpha: whether a tensor alpha may be set (the host never gives one to the roofline kernels,
// whose slow path calls this without it).
template <typename scalar_t, TargetKind TK, GammaKind G, LossKind L, bool kClassAlpha = true>
__device__ __forceinline__ LossAndGrad<at::opmath_type<scalar_t>> element(
    const KernelArgs& a, const LaunchLoss<scalar_t, G, L>& loss, int64_t row, int64_t col,
    at::opmath_type<scalar_t> x, at::opmath_type<scalar_t> t) {
  using acc_t = at::opmath_type<scalar_t>;
  LossAndGrad<acc_t> r;
  acc_t target = 0;  // the element's target in [0, 1], for a tensor alpha's weight
  if constexpr (TK == TargetKind::kFloat) {
    const acc_t eps = static_cast<acc_t>(a.label_smoothing);
    target = t * (acc_t(1) - eps) + eps / 2;
    r = loss.soft(x, target);
  } else {
    const int64_t id = static_cast<const int64_t*>(a.targets)[row];
    if (id == a.ignore_index) return {acc_t(0), acc_t(0)};
    // Background (outside [0, cols)) is a positive of no column.
    if ((id < 0 || id >= a.cols) && id != a.background_index) {
      // An invalid class id cannot raise without a host sync: make it impossible to miss.
      const acc_t nan = static_cast<acc_t>(NAN);
      return {nan, nan};
    }
    const bool positive = id == col;
    if constexpr (TK == TargetKind::kClassId) {
      r = loss.binary(x, positive);
      target = positive ? acc_t(1) : acc_t(0);
    } else if constexpr (TK == TargetKind::kClassIdScore) {
      if (positive) {
        target = static_cast<acc_t>(static_cast<const scalar_t*>(a.scores)[row]);
        r = loss.soft(x, target);
      } else {
        r = loss.negative(x);
        r.loss *= loss.alpha.neg;
        r.grad *= loss.alpha.neg;
      }
    } else {
      const acc_t eps = static_cast<acc_t>(a.label_smoothing);
      target = positive ? acc_t(1) - eps / 2 : eps / 2;
      r = loss.soft(x, target);
    }
  }
  acc_t w = acc_t(1);
  if (a.row_weight) w = static_cast<acc_t>(static_cast<const scalar_t*>(a.row_weight)[row]);
  if (a.elem_weight) {
    w *= static_cast<acc_t>(
        static_cast<const scalar_t*>(a.elem_weight)[row * a.elem_weight_row_stride + col]);
  }
  if (kClassAlpha && a.class_alpha != nullptr) {
    // A tensor alpha (make_call made the launch's alpha weigh nothing): this class's weights of
    // t = 1 and t = 0, as the loss applies its alpha: VFL's by the target's sign, the others' linearly.
    const auto* table = static_cast<const acc_t*>(a.class_alpha);
    const acc_t pos = table[col], neg = table[a.cols + col];
    w *= L == LossKind::kVarifocal ? (target > acc_t(0) ? pos : neg) : neg + (pos - neg) * target;
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


// ---- The roofline kernels: launch shapes and tiles ------------------------------------------------
//
// focal_ids_kernel and focal_float_kernel split the logits into tiles of kTilePacks 16-byte packs.
// A warp takes whole tiles, grid-stride; lane l of the warp takes the tile's packs l, l + 32, ...,
// l + 32 * (kLanePacks - 1) (each load of the warp reads 512 contiguous bytes), a few of them at a
// time (the launch shape's bytes in flight). The sum of a reduced loss is ordered by the data alone:
// each pack's elements left to right, each lane's packs in that order, the 32 lanes' sums in a fixed
// tree (store_tile_sum), one sum per tile written to memory, and the tiles' sums added by
// sum_blocks_kernel in an order fixed by their number. Threads per block, bytes in flight, the
// register cap and the grid size change which thread does what and when, never what is added to
// what: every launch shape and grid size gives the same bits (tests/cuda_emulation checks it).

constexpr int kLanePacks = 16;                     // packs of one lane in one tile
constexpr int kTilePacks = kWarp * kLanePacks;     // 512 packs, 8 KiB of logits

// Elements per tile for data of type scalar_t.
template <typename scalar_t>
inline constexpr int64_t kTileElements = int64_t{kTilePacks} * (16 / static_cast<int>(sizeof(scalar_t)));

// Tiles of `numel` elements: the length of the tile sums' buffer.
template <typename scalar_t>
__host__ __device__ inline int64_t tile_count(int64_t numel) {
  return (numel + kTileElements<scalar_t> - 1) / kTileElements<scalar_t>;
}

// A launch shape of the roofline kernels: threads per block, bytes of logits (and, for float
// targets, of targets) each thread loads before it uses any, and the blocks per SM that
// __launch_bounds__ makes fit in the register file (65536 registers per SM from sm_70 to sm_120:
// at most 65536 / (Threads * BlocksPerSm) registers per thread, rounded down to a multiple of 8).
template <int Threads, int InFlightBytes, int BlocksPerSm, bool AsyncLoads = false>
struct LaunchShape {
  static constexpr int kThreads = Threads;
  static constexpr int kInFlightBytes = InFlightBytes;
  static constexpr int kBlocksPerSm = BlocksPerSm;
  // The roofline kernels' loads of whole tiles go through a ring in shared memory (cp.async),
  // which holds them in no register: what lets a thread keep its bytes in flight under a small
  // register cap.
  static constexpr bool kAsyncLoads = AsyncLoads;
};

// The launch shapes compiled, by index (the host's table per architecture and FOCAL_CUDA_VARIANT
// name them so): 0, the default, 64 bytes in flight under a 64-register cap (4 blocks of 256, 50 %
// occupancy: the cap the kernels had before they had shapes); 1, 32 bytes in flight under 40
// registers in blocks of 128 (12 blocks, 75 %); 2, 64 bytes in flight under 40 registers (6 blocks
// of 256, 75 %), through shared memory. README.md says what each costs in registers and spills.
inline constexpr int kLaunchShapeCount = 3;
// static: each library built from this (the extension, its emulation) has its own names, and a
// process that loads both reads each library's with its own count.
static constexpr const char* kLaunchShapeNames[kLaunchShapeCount] = {"t256_f64_b4", "t128_f32_b12",
                                                                     "t256_f64_b6"};

// f(LaunchShape<...>{}) for the shape of that index (0 for any other).
template <typename F>
decltype(auto) with_launch_shape(int index, F&& f) {
  switch (index) {
    case 1: return f(LaunchShape<128, 32, 12>{});
    case 2: return f(LaunchShape<256, 64, 6, true>{});
    default: return f(LaunchShape<256, 64, 4>{});
  }
}
using DefaultLaunchShape = LaunchShape<256, 64, 4>;
// float64 needs up to about 80 registers: 3 blocks of 256 threads per SM (85), one shape only.
using Float64LaunchShape = LaunchShape<256, 64, 3>;

// The default shape of scalar_t data: DefaultLaunchShape, float64's own for float64.
template <typename scalar_t>
using DefaultLaunchShapeFor =
    std::conditional_t<sizeof(scalar_t) == 8, Float64LaunchShape, DefaultLaunchShape>;

// The shape a launch of scalar_t data takes: `index`'s for 16- and 32-bit data, float64's own.
template <typename scalar_t, typename F>
decltype(auto) with_launch_shape_for(int index, F&& f) {
  if constexpr (sizeof(scalar_t) == 8) {
    return f(Float64LaunchShape{});
  } else {
    return with_launch_shape(index, std::forward<F>(f));
  }
}

// Blocks of `Shape` for `tiles` tiles (one per warp), at most `max_blocks`.
template <typename Shape>
inline int tile_blocks(int64_t tiles, int64_t max_blocks) {
  constexpr int64_t warps = Shape::kThreads / kWarp;
  const int64_t wanted = (tiles + warps - 1) / warps;
  return static_cast<int>(wanted < max_blocks ? wanted : max_blocks);
}

// The most elements focal_ids_kernel takes (the host sends larger ones to focal_kernel): its element
// indices, up to a tile past the last element, stay below 2^31.
inline constexpr int64_t kIdsKernelElements = (int64_t{1} << 31) - (int64_t{1} << 16);

// How focal_ids_kernel finds rows: n / cols for 0 <= n < 2^31 and 1 <= cols < 2^31 (a Divider,
// kernel_runtime.cuh), and `ids_from`, the first of the cols + 1 class ids the fast path takes for
// classes and background: -1, or 0 when background_index is cols (the host sends any other
// background_index to the general kernel). Made by the host, so that the kernel reads all of it
// from its parameters rather than holding it in registers.
struct RowWalk {
  Divider rows_in;  // rows_in(n): the whole rows in n elements
  int32_t cols = 1;
  uint32_t minus_cols = ~uint32_t{0};  // -cols as unsigned: a column is n + row * minus_cols, one multiply-add
  uint32_t ids_from = ~uint32_t{0};  // -1 as unsigned: the id arithmetic wraps, never overflows
  // Row r's weight is the kernel's weights[r * weight_stride]: 1 with row weights, 0 without, where
  // every row reads one weight of 1 (focal_ids_kernel). A parameter rather than a test of the
  // weights' pointer in the kernel, so that nvcc cannot turn the product back into a test per pack.
  uint32_t weight_stride = 0;

  static RowWalk make(int64_t cols, int64_t background_index = -1, bool row_weights = false) {
    RowWalk w;
    w.weight_stride = row_weights ? 1 : 0;
    w.ids_from = background_index == cols ? 0 : ~uint32_t{0};
    w.cols = static_cast<int32_t>(cols);
    w.minus_cols = uint32_t{0} - static_cast<uint32_t>(cols);
    w.rows_in = Divider::make(cols);
    return w;
  }
};

// Loss (reduction "none") and gradient of every element, times the scale; with `tile_sums`, also
// each tile's sum of the unscaled losses, in the tiles' order (above), so that its sums are bitwise
// those of focal_float_kernel. Each warp takes tiles, grid-stride, and each lane its packs of kVec
// consecutive elements (16 bytes) in the tile, read and written with 128-bit accesses when
// `aligned` (every pointer accessed in packs is 16-byte aligned); the last, partial pack takes
// element accesses.
template <typename scalar_t, TargetKind TK, GammaKind G, LossKind L>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<scalar_t>)
    focal_kernel(KernelArgs a, bool aligned, ScaleArgs s,
                 at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  const int64_t tiles = tile_count<scalar_t>(n);
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const auto loss_fn = launch_loss<scalar_t, G, L>(a);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);
  const bool packs = aligned || kFaultAssumeAligned;

  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  int64_t touched = 0;
  for (int64_t tile = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp; tile < tiles;
       tile += warps) {
    acc_t lane_sum = 0;
    for (int k = 0; k < kLanePacks; ++k) {
      const int64_t base = (tile * kTilePacks + lane + int64_t{kWarp} * k) * kVec;
      if (base >= n) break;
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
      acc_t pack_sum = 0;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (base + j < n) {
          const acc_t tj = TK == TargetKind::kFloat ? static_cast<acc_t>(t.v[j]) : acc_t(0);
          const auto r = element<scalar_t, TK, G, L>(a, loss_fn, row, col, static_cast<acc_t>(x.v[j]), tj);
          pack_sum = j == 0 ? r.loss : add_rn(pack_sum, r.loss);
          loss.v[j] = static_cast<scalar_t>(r.loss * scale);
          grad.v[j] = static_cast<scalar_t>(r.grad * scale);
        }
        if (++col == a.cols) {
          col = 0;
          ++row;
        }
      }
      lane_sum = add_rn(lane_sum, pack_sum);
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
    if (tile_sums) store_tile_sum(lane_sum, tile, tile_sums);
  }
  trace_elements(touched);
}

// Float targets (torchvision's form) without weights or label smoothing, fewer than 2^31 16-byte
// packs of them, 16-byte aligned logits, targets and outputs: no rows at all. Each lane loads
// Shape::kInFlightBytes / 32 packs of logits and as many of targets (at least one of each) before
// computing any (a shape with AsyncLoads keeps them in flight through a ring in shared memory); a
// pack's losses are added left to right, each with a round-to-nearest addition that nvcc never
// fuses, so the GPU's sums are bitwise those of the emulation and of the model in
// tests/cuda_cases.py. The partial last pack, if any, is its lane's last, taken element by element
// after the others.
template <typename scalar_t, GammaKind G, typename Shape = DefaultLaunchShape>
__global__ void __launch_bounds__(Shape::kThreads, Shape::kBlocksPerSm)
    focal_float_kernel(KernelArgs a, ScaleArgs s, at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = MathFor<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kInFlight = Shape::kInFlightBytes >= 64 ? Shape::kInFlightBytes / 32 : 1;
  static_assert(kLanePacks % kInFlight == 0, "a lane's packs come in equal rounds");
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  // Pack and tile indices in 32 bits: the host gives this kernel fewer than 2^31 packs.
  const uint32_t full_packs = static_cast<uint32_t>(n / kVec);
  const uint32_t tiles = static_cast<uint32_t>(tile_count<scalar_t>(n));
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  const AlphaWeights<acc_t> alpha = make_alpha<acc_t, acc_t>(a.alpha);
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const auto* x_all = static_cast<const scalar_t*>(a.logits);
  const auto* t_all = static_cast<const scalar_t*>(a.targets);
  auto* loss_all = static_cast<scalar_t*>(a.loss);
  auto* grad_all = static_cast<scalar_t*>(a.grad);

  const auto one = [&](acc_t x, acc_t t) {
    // No label smoothing here (the host sends it to focal_kernel, whose t (1 - 0) + 0 / 2 is t + 0:
    // a target of -0 made +0; focal_target gives -0 the same loss and gradient bits as +0).
    return focal_target<G, acc_t, M>(x, t, gamma, alpha);
  };
  const int lane = threadIdx.x % kWarp;
  const uint32_t warps = gridDim.x * (Shape::kThreads / kWarp);
  int64_t touched = 0;
  // The ring of the shapes that load through shared memory (only they use it): a slot per pack of
  // logits and of targets in flight, per thread.
  __shared__ P ring_x[Shape::kAsyncLoads ? kInFlight : 1][Shape::kThreads];
  __shared__ P ring_t[Shape::kAsyncLoads ? kInFlight : 1][Shape::kThreads];
  // The loop once per output written (the loss of reduction "none", the gradient), so that no
  // pack tests for them.
  const auto run = [&](auto writes_loss, auto writes_grad) {
    for (uint32_t tile = (blockIdx.x * Shape::kThreads + threadIdx.x) / kWarp; tile < tiles; tile += warps) {
      acc_t lane_sum = 0;
      // Whole pack p, loaded: its losses added to the lane's sum, its outputs written.
      const auto take = [&](uint32_t p, const P& x, const P& t) {
        acc_t xf[kVec], tf[kVec];
        unpack(x, xf);
        unpack(t, tf);
        P loss, grad;
        acc_t pack_sum = 0;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const LossAndGrad<acc_t> e = one(xf[j], tf[j]);
          pack_sum = j == 0 ? e.loss : add_rn(pack_sum, e.loss);
          loss.v[j] = static_cast<scalar_t>(e.loss * scale);
          grad.v[j] = static_cast<scalar_t>(e.grad * scale);
        }
        lane_sum = add_rn(lane_sum, pack_sum);
        if constexpr (decltype(writes_loss)::value) reinterpret_cast<P*>(loss_all)[p] = loss;
        if constexpr (decltype(writes_grad)::value) reinterpret_cast<P*>(grad_all)[p] = grad;
        touched += kVec;
      };
      if constexpr (Shape::kAsyncLoads) {
        if (tile * kTilePacks + kTilePacks <= full_packs) {
          // A tile of whole packs through a ring of kInFlight slots per thread in shared memory, as
          // focal_ids_kernel's: pack k + kInFlight is requested as soon as pack k has left its slot.
          const P* x_packs = reinterpret_cast<const P*>(x_all);
          const P* t_packs = reinterpret_cast<const P*>(t_all);
          uint32_t p = tile * kTilePacks + lane;  // the lane's next pack to take
          // Pack p + ahead, into slot i.
          const auto request = [&](int i, uint32_t ahead) {
            async_copy<16>(&ring_x[i][threadIdx.x], x_packs + (p + ahead));
            async_copy<16>(&ring_t[i][threadIdx.x], t_packs + (p + ahead));
            async_commit();
          };
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) request(i, kWarp * i);
          // Every round but the last refills each slot as soon as its pack has left it.
#pragma unroll 1
          for (int r = 0; r < kLanePacks - kInFlight; r += kInFlight) {
#pragma unroll
            for (int i = 0; i < kInFlight; ++i) {
              async_wait<kInFlight - 1>();  // pack p has arrived: the oldest request
              const P x = ring_x[i][threadIdx.x];
              const P t = ring_t[i][threadIdx.x];
              request(i, kWarp * kInFlight);
              take(p, x, t);
              p += kWarp;
            }
          }
          async_wait<0>();  // the last round's packs
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            take(p, ring_x[i][threadIdx.x], ring_t[i][threadIdx.x]);
            p += kWarp;
          }
        } else {
          // The lane's last, partial tile, a pack at a time.
#pragma unroll 1
          for (uint32_t p = tile * kTilePacks + lane; p < full_packs; p += kWarp) {
            take(p, reinterpret_cast<const P*>(x_all)[p], reinterpret_cast<const P*>(t_all)[p]);
          }
        }
      } else {
        // The lane's packs tile * kTilePacks + lane + 32 k, k < kLanePacks, in rounds of kInFlight
        // loaded into registers; the round's first pack is the one loop variable (its place in the
        // tile tells when the tile is done). The loads' tests keep them in a block of their own,
        // which ptxas issues before the math.
#pragma unroll 1
        for (uint32_t first = tile * kTilePacks + lane;;) {
          P x[kInFlight], t[kInFlight];
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            const uint32_t p = first + kWarp * i;
            if (p < full_packs) {
              x[i] = reinterpret_cast<const P*>(x_all)[p];
              t[i] = reinterpret_cast<const P*>(t_all)[p];
            }
          }
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            const uint32_t p = first + kWarp * i;
            if (p < full_packs) take(p, x[i], t[i]);
          }
          first += kWarp * kInFlight;
          if (first % kTilePacks < kWarp) break;  // past the lane's last pack in the tile
        }
      }
      const int64_t tail = int64_t{full_packs} * kVec;  // the partial last pack's first element
      const int64_t ahead = int64_t{full_packs} - (int64_t{tile} * kTilePacks + lane);
      if (tail < n && ahead >= 0 && ahead % kWarp == 0 && ahead < int64_t{kTilePacks}) {
        acc_t pack_sum = 0;
        for (int64_t e = tail; e < n; ++e) {
          const LossAndGrad<acc_t> r = one(static_cast<acc_t>(x_all[e]), static_cast<acc_t>(t_all[e]));
          pack_sum = e == tail ? r.loss : add_rn(pack_sum, r.loss);
          if (loss_all) loss_all[e] = static_cast<scalar_t>(r.loss * scale);
          if (grad_all) grad_all[e] = static_cast<scalar_t>(r.grad * scale);
          ++touched;
        }
        lane_sum = add_rn(lane_sum, pack_sum);
      }
      if (tile_sums) store_tile_sum(lane_sum, tile, tile_sums);
    }
  };
  const auto with_grad = [&](auto writes_loss) {
    if (grad_all != nullptr) {
      run(writes_loss, std::true_type{});
    } else {
      run(writes_loss, std::false_type{});
    }
  };
  if (loss_all != nullptr) {
    with_grad(std::true_type{});
  } else {
    with_grad(std::false_type{});
  }
  trace_elements(touched);
}

// A weight of 1 in device memory, in the bits of each dtype: the row weight of every row of a
// launch without row weights (focal_ids_kernel), so that no pack tests for them.
__device__ const float kUnitFloat = 1.f;
__device__ const double kUnitDouble = 1.0;
__device__ const uint16_t kUnitBFloat16 = 0x3f80;
__device__ const uint16_t kUnitHalf = 0x3c00;

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* unit_weight() {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return &kUnitFloat;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return &kUnitDouble;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return reinterpret_cast<const scalar_t*>(&kUnitBFloat16);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "a weight of 1 in the bits of this dtype");
    return reinterpret_cast<const scalar_t*>(&kUnitHalf);
  }
}

// Elements [e0, e0 + len) of a class-id launch, one at a time (row, col: those of e0): their
// loss (reduction "none") and gradient times `scale` written out; returns the sum of their
// alpha-weighted losses, left to right. What focal_ids_kernel leaves to the general code, after
// its hot loop. Inlined: a call there would make every value live across it (the lane's sums, its
// element index) a stack slot for the whole kernel, loaded and stored in the hot loop too.
template <typename scalar_t, GammaKind G, LossKind L>
__device__ __forceinline__ at::opmath_type<scalar_t> focal_pack_slow(
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
    const auto r = element<scalar_t, TK, G, L, false>(a, loss, row, col, static_cast<acc_t>(x_all[e0 + j]), acc_t(0));
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

// Class-id targets without label smoothing or per-element weights (a weight per row is taken), a
// reduced loss, 16-byte aligned logits and gradient: the loss of dense detection, written for the
// memory roofline (csrc/cuda/README.md). Tiles as above; each lane loads Shape::kInFlightBytes / 16
// packs and their rows' class ids (and weights) before it uses any (a shape with AsyncLoads keeps
// that many packs and ids on their way through a ring in shared memory). Element indices are 32-bit
// (at most kIdsKernelElements elements); each pack's row is its first element's index divided by
// the columns with RowWalk's multiply-high, so that a lane carries no row or column from pack to
// pack or tile to tile. A pack within one row whose row has no positive in it
// (nearly every pack: a row has at most one positive among its C classes, a background row none)
// runs focal_hard with z = x on every element, alpha's negative weight, the row's weight and the
// scale folded into one factor; a pack of an ignored row writes zeros; any other pack (a positive,
// an invalid id, a row boundary, the tail) goes to focal_pack_slow. Which path a pack takes depends
// on the data alone, and each lane keeps two sums in pack order (the fast packs' losses before
// alpha's negative weight, and the others'), joined once per tile.
//
// The launch's arguments are a __grid_constant__: focal_pack_slow reads them where they are, in the
// kernel's parameter space, rather than from a copy the kernel would otherwise make on its stack
// (whose size, with every field KernelArgs has, moved the register allocation of the loop below).
//
// L is the focal loss, or QFL / VFL with class ids and scores: their negatives are focal_hard with
// z = x too (with QFL's beta or VFL's gamma as the exponent and VFL's alpha as the negatives'
// weight), and a positive's score is read by focal_pack_slow alone.
template <typename scalar_t, GammaKind G, LossKind L, typename Shape = DefaultLaunchShape>
__global__ void __launch_bounds__(Shape::kThreads, Shape::kBlocksPerSm)
    focal_ids_kernel(const __grid_constant__ KernelArgs a, ScaleArgs s, RowWalk walk,
                     at::opmath_type<scalar_t>* __restrict__ tile_sums) {
  using acc_t = at::opmath_type<scalar_t>;
  using M = MathFor<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kInFlight = Shape::kInFlightBytes / 16;
  static_assert(kInFlight >= 1 && kLanePacks % kInFlight == 0, "a lane's packs come in equal rounds");
  constexpr int32_t kTile = static_cast<int32_t>(kTileElements<scalar_t>);
  using P = Pack<scalar_t, kVec>;
  const int64_t n = a.rows * a.cols;
  const int32_t cols = walk.cols;
  const acc_t scale = static_cast<acc_t>(resolve_scale(s));
  static_assert(L != LossKind::kFocalStar, "FL*'s negatives are not focal_hard");
  const AlphaWeights<acc_t> alpha = loss_alpha<L, acc_t, acc_t>(a.alpha);
  const acc_t gamma = static_cast<acc_t>(a.gamma);
  const acc_t negative_grad_w = alpha.neg * scale;
  const auto* ids = static_cast<const int64_t*>(a.targets);
  // Row r's weight: the row weights', or a 1 shared by every row (RowWalk::weight_stride).
  const auto* weights = a.row_weight != nullptr ? static_cast<const scalar_t*>(a.row_weight) : unit_weight<scalar_t>();
  const uint32_t weight_stride = walk.weight_stride;
  const auto* x_all = static_cast<const P*>(a.logits);
  auto* grad_all = static_cast<P*>(a.grad);

  const int lane = threadIdx.x % kWarp;
  // Elements, rows and tiles in 32 bits: the host gives this kernel at most kIdsKernelElements
  // elements and a grid of at most one warp per tile, so that every element index below (up to a
  // tile past the end) stays under 2^31, as RowWalk::rows_in needs.
  const uint32_t n32 = static_cast<uint32_t>(n);
  const uint32_t first_tile = (blockIdx.x * Shape::kThreads + threadIdx.x) / kWarp;
  // The lane's first element in its tile (the tile is e_lane / kTile); the rows and columns of its
  // packs follow from it.
  uint32_t e_lane = first_tile * kTile + lane * kVec;
  const uint32_t step = gridDim.x * (Shape::kThreads / kWarp) * kTile;
  int64_t touched = 0;
  // A lane's packs lie kWarp packs apart; its last one in a tile ends here, past its first element.
  constexpr int32_t kLaneEnd = (kLanePacks - 1) * kWarp * kVec + kVec;
  // The ring of the shapes that load through shared memory (only they use it): a slot per pack in
  // flight and thread.
  __shared__ P ring_packs[Shape::kAsyncLoads ? kInFlight : 1][Shape::kThreads];
  __shared__ int64_t ring_ids[Shape::kAsyncLoads ? kInFlight : 1][Shape::kThreads];

  // The loop twice, with and without the gradient (a forward under no_grad), so that neither
  // tests for it per pack.
  const auto run = [&](auto writes_grad) {
    for (; e_lane - lane * kVec < n32; e_lane += step) {
      const int32_t left_all = static_cast<int32_t>(n32 - e_lane);  // from the lane's first to the end
      const int32_t left = left_all < kTile ? left_all : kTile;
      const uint32_t pack0 = e_lane / kVec;
      const P* x_lane = x_all + pack0;
      acc_t negatives = 0;  // the fast packs' losses, before alpha's negative weight
      acc_t others = 0;     // the other packs' alpha-weighted losses
      uint32_t slow = 0;    // bit k: the lane's pack k is one of the others
      // A round of kInFlight packs marks its others in the top bits of `slow` (one OR of a
      // constant each), after moving the rounds before down to make room: after the last round,
      // bit k is pack k's.
      constexpr int kRoundMarks = kLanePacks - kInFlight;
      const auto next_round = [&]() { slow >>= kInFlight; };
      // The row of the lane's pack k's first element, and its column there.
      const auto row_of = [&](int k) { return walk.rows_in(e_lane + k * kWarp * kVec); };
      const auto col_of = [&](int k, uint32_t row) {
        return static_cast<int32_t>(e_lane + k * kWarp * kVec + row * walk.minus_cols);
      };
      // The lane's pack k, whose first element lies in row `row` (loaded: its logits, its row's
      // class id and weight; for a pack that is not whole, none of them is used), taken here, or
      // left for after the loop by setting its bit `mark` in `slow`. `whole_tile`: every pack of
      // the lane's tile is known to be whole.
      const auto take = [&](auto whole_tile, int k, uint32_t row, const P& x, int64_t label,
                            scalar_t weight, uint32_t mark) {
        const int32_t offset = k * kWarp * kVec;  // elements past the lane's first
        bool whole = true;
        if constexpr (!decltype(whole_tile)::value) {
          if (offset >= left) return;  // past the end
          whole = offset + kVec <= left;
        }
        touched += whole ? kVec : left - offset;
        const int32_t col = col_of(k, row);
        // Within one row; ignored, or a class or background (walk.ids_from) outside [col, col + kVec).
        // Tested in 32 bits (the host sends an ignore_index outside int32 to the general kernel):
        // a label whose upper word is not its lower word's sign, an invalid one, is never fast.
        // `&` rather than `&&`: every test is cheap, and none is a branch.
        // Unsigned throughout: a pack that is not whole may have any row, so any column.
        const uint32_t id = static_cast<uint32_t>(label);
        const bool candidate = whole &
                               (static_cast<uint32_t>(col) + kVec <= static_cast<uint32_t>(cols)) &
                               (static_cast<uint32_t>(static_cast<uint64_t>(label) >> 32) ==
                                static_cast<uint32_t>(static_cast<int32_t>(id) >> 31));
        const bool ignored = candidate & (id == static_cast<uint32_t>(a.ignore_index));
        const bool fast = candidate & (id - walk.ids_from <= static_cast<uint32_t>(cols)) &
                          (id - static_cast<uint32_t>(col) >= static_cast<uint32_t>(kVec));
        if (ignored) {
          // An ignored row (a few percent of anchors in detection) stays in this loop, with no
          // loss and a zero gradient whatever its logits.
          if constexpr (decltype(writes_grad)::value) grad_all[pack0 + offset / kVec] = P{};
        } else if (fast) {
          // The row's weight scales the pack's gradient factor and its sum (exactly, without row
          // weights: a product by 1).
          const acc_t w = static_cast<acc_t>(weight);
          const acc_t grad_w = negative_grad_w * w;
          acc_t xf[kVec];
          unpack(x, xf);
          P grad;
          acc_t pack_sum = 0;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const LossAndGrad<acc_t> e = focal_hard<G, acc_t, M>(xf[j], gamma);
            pack_sum += e.loss;
            grad.v[j] = static_cast<scalar_t>(e.grad * grad_w);
          }
          negatives = add_rn(negatives, pack_sum * w);
          if constexpr (decltype(writes_grad)::value) grad_all[pack0 + offset / kVec] = grad;
        } else {
          slow |= mark;
        }
      };
      if (left < kLaneEnd) {
        // The lane's last, partial tile, a pack at a time, in every shape (the fast path's packs
        // are still taken by it: which path a pack takes depends on the data alone, never on the
        // shape).
#pragma unroll 1
        for (int k = 0; k < kLanePacks; ++k) {
          const int32_t offset = k * kWarp * kVec;
          const bool whole = offset + kVec <= left;
          const uint32_t row = row_of(k);
          take(std::false_type{}, k, row, whole ? x_lane[offset / kVec] : P{},
               whole ? ids[row] : int64_t{0}, weights[(whole ? row : 0) * weight_stride], 1u << k);
        }
      } else if constexpr (Shape::kAsyncLoads) {
        // A ring of kInFlight slots in shared memory per thread, each holding a pack and its row's
        // class id: pack k + kInFlight is requested as soon as pack k has left its slot, so
        // kInFlight packs are always on their way, in no register.
        const auto request = [&](int k, int slot) {
          async_copy<16>(&ring_packs[slot][threadIdx.x], x_lane + k * kWarp);
          async_copy<8>(&ring_ids[slot][threadIdx.x], ids + row_of(k));
          async_commit();
        };
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) request(i, i);
        // Pack k, out of slot i.
        const auto take_slot = [&](int k, int i, const P& x, int64_t label) {
          const uint32_t row = row_of(k);
          take(std::true_type{}, k, row, x, label, weights[row * weight_stride], 1u << (kRoundMarks + i));
        };
        // Every round but the last refills each slot as soon as its pack has left it.
#pragma unroll 1
        for (int r = 0; r < kLanePacks - kInFlight; r += kInFlight) {
          next_round();
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            async_wait<kInFlight - 1>();  // pack r + i has arrived: the oldest request
            const P x = ring_packs[i][threadIdx.x];
            const int64_t label = ring_ids[i][threadIdx.x];
            request(r + i + kInFlight, i);
            take_slot(r + i, i, x, label);
          }
        }
        async_wait<0>();  // the last round's packs
        next_round();
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
          take_slot(kLanePacks - kInFlight + i, i, ring_packs[i][threadIdx.x], ring_ids[i][threadIdx.x]);
        }
      } else {
        // The lane's packs in rounds of kInFlight, loaded into registers.
#pragma unroll 1
        for (int r = 0; r < kLanePacks; r += kInFlight) {
          next_round();
          P x[kInFlight];
          int64_t label[kInFlight];
          scalar_t weight[kInFlight];
          uint32_t rows[kInFlight];  // of each pack's first element
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            rows[i] = row_of(r + i);
            label[i] = ids[rows[i]];
            x[i] = load_here(x_lane + (r + i) * kWarp);
            weight[i] = weights[rows[i] * weight_stride];
          }
#pragma unroll
          for (int i = 0; i < kInFlight; ++i) {
            take(std::true_type{}, r + i, rows[i], x[i], label[i], weight[i], 1u << (kRoundMarks + i));
          }
        }
      }
      // The other packs, in the lane's order, after the loop above: the call, and the registers
      // it needs saved, stay out of it.
      while (slow != 0) {
        const int k = __ffs(slow) - 1;
        slow &= slow - 1;
        const int32_t offset = k * kWarp * kVec;
        const uint32_t row = row_of(k);
        const int len = left - offset < kVec ? left - offset : kVec;
        others = add_rn(others, focal_pack_slow<scalar_t, G, L>(a, scale, e_lane + offset, len,
                                                                row, col_of(k, row)));
      }
      // alpha = 1 gives negatives no weight: their sum, even an overflowed one, counts 0 (inf * 0
      // is NaN).
      store_tile_sum(alpha.neg == acc_t(0) ? others : add_rn(negatives * alpha.neg, others),
                     e_lane / kTile, tile_sums);
    }
  };
  if (grad_all != nullptr) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
  trace_elements(touched);
}

}  // namespace focal::cuda
