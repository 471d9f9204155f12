// The fixed-order sums of the loss kernels: each kernel adds its elements in tiles fixed by the
// data (never by the launch), a warp's lanes' values in a fixed tree (store_tile_sum), and
// sum_blocks_kernel adds the tiles' sums in an order fixed by their number. Every launch shape,
// variant and grid size gives the same bits (README.md says what else may move them).
#pragma once

#include <cstdint>

#include "kernel_runtime.cuh"

namespace focal::cuda {

constexpr int kWarp = 32;

// Each group of kLanes lanes' values (kLanes a power of two, at most 32) combined by `op` in a
// fixed tree: lane l takes op(its value, lane l + kLanes / 2's), then l + kLanes / 4's, ..., l + 1's,
// so that a group's first lane ends with its own group's values only, for 32 lanes
// op(op(op(v0, v16), op(v8, v24)), ...). Every lane of the warp must call it.
template <int kLanes, typename acc_t, typename Op>
__device__ __forceinline__ acc_t lanes_tree(acc_t v, Op op) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;
}

// tile_sums[tile] = the 32 lanes' values added in lanes_tree's fixed tree. Every lane of the warp
// must call it.
template <typename acc_t>
__device__ __forceinline__ void store_tile_sum(acc_t v, int64_t tile, acc_t* __restrict__ tile_sums) {
  v = lanes_tree<kWarp>(v, [](acc_t a, acc_t b) { return add_rn(a, b); });
  if (threadIdx.x % kWarp == 0) tile_sums[tile] = v;
}

constexpr int kSumThreads = 256;

// *out = scale * (sum of tile_sums), the sum in an order fixed by `tiles`: thread i adds
// tile_sums[i], [i + kSumThreads], ... in turn, then cub::BlockReduce adds the threads' sums. A
// large input leaves tens of thousands of sums: each thread loads kSumsInFlight of its values
// before adding them, so that the loads overlap. `resolve_scale(s)` gives the scale, in double.
template <typename acc_t, typename Scale>
__global__ void __launch_bounds__(kSumThreads)
    sum_blocks_kernel(const acc_t* __restrict__ tile_sums, int tiles, Scale s, acc_t* __restrict__ out) {
  constexpr int kSumsInFlight = 16;
  acc_t sum = 0;
  for (int base = threadIdx.x; base < tiles; base += kSumThreads * kSumsInFlight) {
    acc_t v[kSumsInFlight];
#pragma unroll
    for (int k = 0; k < kSumsInFlight; ++k) {
      const int i = base + k * kSumThreads;
      v[k] = i < tiles ? tile_sums[i] : acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kSumsInFlight; ++k) {
      if (base + k * kSumThreads < tiles) sum = add_rn(sum, v[k]);
    }
  }
  using BlockReduce = cub::BlockReduce<acc_t, kSumThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const acc_t total = BlockReduce(storage).Sum(sum);
  // In double, as the CPU backend scales its sum.
  if (threadIdx.x == 0) *out = static_cast<acc_t>(static_cast<double>(total) * resolve_scale(s));
}

}  // namespace focal::cuda
