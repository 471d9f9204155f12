// Host C++ stand-ins for the parts of CUDA that csrc/cuda uses, so that its kernels and host code
// compile as plain C++ (-DFOCAL_CUDA_EMULATION) and run on the CPU under AddressSanitizer and
// UBSan.
// Test-only: never part of the installed package. What this cannot show is in csrc/cuda/README.md.
//
// Execution model. A launch runs its blocks one after another, in blockIdx order. A block runs on
// one OS thread per CUDA thread, taken from a pool that lives as long as the process, so the
// threads of a block really run concurrently and a missing __syncthreads() is a real data race.
// __syncthreads() is a barrier of the block's threads; a thread that returns leaves the barrier,
// as an exited thread does on the GPU. `__shared__` variables are function-local statics: one copy
// per kernel instantiation, used by the one block that runs at a time. Launches are serialised, as
// on one stream, and complete before launch() returns.
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// ---- The language -------------------------------------------------------------------------------

#define __global__
#define __grid_constant__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Set for each emulated thread before it enters the kernel.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// Additions rounded once, as the GPU's: host code is compiled with -ffp-contract=off.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline double __dadd_rn(double a, double b) { return a + b; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}

namespace focal_emu {

// The emulated device: its size (what the grid sizing of csrc/cuda sees), and what tests observe.
inline constexpr int kMultiprocessors = 2;
// Blocks an emulated SM holds at once, whatever the kernel (host_runtime.cuh's resident_blocks).
inline constexpr int kResidentBlocks = 8;
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr int kWarpThreads = 32;

struct Counters {
  std::atomic<int64_t> launches{0};
  std::atomic<int64_t> elements{0};  // reported by the kernels through trace_elements()
  std::vector<int64_t> shapes;       // blocks and threads per block of each launch, in turn
  std::atomic<int64_t> async_copies[17] = {};  // cp.async copies, by their size (4, 8 or 16 bytes)
};
inline Counters counters;

inline void trace_elements(int64_t n) { counters.elements.fetch_add(n, std::memory_order_relaxed); }

// When true, one-value tensors (a tensor normaliser, a one-value grad_output) count as device
// memory: the host code must hand them to a kernel instead of reading them. Every emulated tensor
// is in host memory, so this is the emulation's only notion of "on the device".
inline std::atomic<bool> scalars_on_device_flag{false};
inline bool scalars_on_device() { return scalars_on_device_flag.load(); }

// Waiting without spinning. A block's 32 to 1024 threads share the machine's few cores, where the
// spin-then-yield waits of std::barrier and std::binary_semaphore cost more than the kernels did:
// in a profile of the checks, sched_yield took about 16 % of the CPU time and the emulated kernels
// 12 %; with these futex waits the whole checks run took 55 core-seconds instead of 66. A waiting
// thread sleeps in the kernel at once, and only while the word still holds the value it saw, so a
// wake-up between its load and its sleep is not lost.
inline void sleep_while(const std::atomic<uint32_t>& word, uint32_t seen) {
  while (word.load(std::memory_order_acquire) == seen) {
    syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
  }
}

inline void wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// std::barrier's arrive_and_wait and arrive_and_drop: the last thread to arrive opens the next
// phase; a thread that drops counts as arrived in this phase and is not waited for in later ones.
// The arrivals are read-modify-writes of one counter, so the last one sees every thread's writes
// before its arrival, and each waiter sees them through the phase it waits on.
class Barrier {
 public:
  explicit Barrier(std::ptrdiff_t count) : count_(count), waiting_(count) {}

  void arrive_and_wait() {
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    if (!arrive()) sleep_while(phase_, phase);
  }

  void arrive_and_drop() {
    count_.fetch_sub(1, std::memory_order_relaxed);
    arrive();
  }

 private:
  bool arrive() {
    if (waiting_.fetch_sub(1, std::memory_order_acq_rel) != 1) return false;
    waiting_.store(count_.load(std::memory_order_relaxed), std::memory_order_relaxed);
    phase_.fetch_add(1, std::memory_order_release);
    wake_all(phase_);
    return true;
  }

  std::atomic<std::ptrdiff_t> count_, waiting_;
  std::atomic<uint32_t> phase_{0};
};

inline thread_local Barrier* block_barrier = nullptr;

// cp.async as the GPU may run it at its earliest and at its latest: when the copy is issued its
// destination becomes all ones bits (NaN in every floating-point dtype), as if the copy were under
// way, and its data lands only when a cp.async.wait_group lets its group go. A kernel that reads a
// slot before the wait for its copy (or another lane's copy before a __syncwarp), or that refills a
// slot another thread may still read, reads the poison. `bytes` of the 16 (or 8) come from `src`,
// the rest are zeros, as with cp.async's src-size.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, size;
};
struct AsyncCopies {
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first
  std::vector<AsyncCopy> open;                    // since the last commit
};
inline thread_local AsyncCopies async_copies;

inline void async_copy(void* dst, const void* src, int size, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0 ||
      bytes < 0 || bytes > size) {
    std::fprintf(stderr, "emulated CUDA: cp.async of %d of %d bytes from %p to %p: misaligned or oversized\n",
                 bytes, size, src, dst);
    std::abort();
  }
  std::memset(dst, 0xFF, static_cast<size_t>(size));
  async_copies.open.push_back({dst, src, bytes, size});
  counters.async_copies[size].fetch_add(1, std::memory_order_relaxed);
}

inline void async_commit() {
  async_copies.committed.push_back(std::move(async_copies.open));
  async_copies.open.clear();
}

// Lands every committed group but the `pending` most recent ones.
inline void async_wait(size_t pending) {
  auto& groups = async_copies.committed;
  const size_t landing = groups.size() > pending ? groups.size() - pending : 0;
  for (size_t g = 0; g < landing; ++g) {
    for (const AsyncCopy& c : groups[g]) {
      if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
      std::memset(static_cast<char*>(c.dst) + c.bytes, 0, static_cast<size_t>(c.size - c.bytes));
    }
  }
  groups.erase(groups.begin(), groups.begin() + static_cast<std::ptrdiff_t>(landing));
}

// The calling thread's warp: a barrier of its 32 lanes and one exchange slot per lane, for the
// warp shuffles below.
struct Warp {
  explicit Warp(std::ptrdiff_t lanes) : barrier(lanes) {}
  Barrier barrier;
  uint64_t slots[kWarpThreads] = {};
};
inline thread_local Warp* warp = nullptr;

// Runs the blocks of a grid on a pool of OS threads, one per thread of a block.
class Device {
 public:
  static Device& get() {
    // Never destroyed: its threads wait for work until the process ends.
    static Device* device = new Device;
    return *device;
  }

  void run_grid(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 ||
        threads > kMaxThreadsPerBlock || block.z > 64 || grid.y > 65535 || grid.z > 65535) {
      throw std::runtime_error("emulated CUDA launch: invalid configuration argument (grid " +
                               std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                               std::to_string(grid.z) + ", block " + std::to_string(threads) +
                               " threads)");
    }
    const std::lock_guard<std::mutex> one_launch_at_a_time(launch_mutex_);
    counters.launches.fetch_add(1);
    counters.shapes.push_back(int64_t{grid.x} * grid.y * grid.z);
    counters.shapes.push_back(static_cast<int64_t>(threads));
    grow(static_cast<unsigned>(threads));
    kernel_ = &kernel;
    grid_ = grid;
    block_ = block;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          run_block(uint3{x, y, z}, static_cast<unsigned>(threads));
        }
      }
    }
    kernel_ = nullptr;
  }

 private:
  struct Worker {
    std::atomic<uint32_t> starts{0};  // blocks handed to this thread so far
    std::thread thread;
  };

  void grow(unsigned threads) {
    while (workers_.size() < threads) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.push_back(std::make_unique<Worker>());
      Worker* w = workers_.back().get();
      w->thread = std::thread([this, id, w] { work(id, w); });
    }
  }

  void run_block(uint3 block_idx, unsigned threads) {
    block_idx_ = block_idx;
    barrier_.emplace(static_cast<std::ptrdiff_t>(threads));
    warps_.clear();
    for (unsigned first = 0; first < threads; first += kWarpThreads) {
      const unsigned lanes = threads - first < kWarpThreads ? threads - first : kWarpThreads;
      warps_.push_back(std::make_unique<Warp>(static_cast<std::ptrdiff_t>(lanes)));
    }
    {
      const std::lock_guard<std::mutex> lock(done_mutex_);
      running_ = threads;
    }
    for (unsigned t = 0; t < threads; ++t) {
      workers_[t]->starts.fetch_add(1, std::memory_order_release);
      wake_all(workers_[t]->starts);
    }
    std::unique_lock<std::mutex> lock(done_mutex_);
    done_.wait(lock, [this] { return running_ == 0; });
  }

  void work(unsigned id, Worker* w) {
    for (uint32_t started = 0;; ++started) {
      sleep_while(w->starts, started);
      threadIdx = uint3{id % block_.x, (id / block_.x) % block_.y, id / (block_.x * block_.y)};
      blockIdx = block_idx_;
      blockDim = block_;
      gridDim = grid_;
      block_barrier = &*barrier_;
      warp = warps_[id / kWarpThreads].get();
      async_copies = {};
      (*kernel_)();
      async_copies = {};  // copies never waited for land nowhere: nothing may read them
      // An exited thread no longer takes part in __syncthreads() or a shuffle, as on the GPU.
      block_barrier->arrive_and_drop();
      warp->barrier.arrive_and_drop();
      block_barrier = nullptr;
      warp = nullptr;
      const std::lock_guard<std::mutex> lock(done_mutex_);
      if (--running_ == 0) done_.notify_one();
    }
  }

  std::mutex launch_mutex_;
  std::vector<std::unique_ptr<Worker>> workers_;
  // The block being run; written by the launching thread before it releases the workers.
  const std::function<void()>* kernel_ = nullptr;
  dim3 grid_, block_;
  uint3 block_idx_;
  std::optional<Barrier> barrier_;
  std::vector<std::unique_ptr<Warp>> warps_;
  std::mutex done_mutex_;
  std::condition_variable done_;
  unsigned running_ = 0;
};

// kernel<<<grid, block>>>(args...): every thread calls the kernel with its own copy of the
// arguments, as parameters are passed on the GPU.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  Device::get().run_grid(grid, block, body);
}

}  // namespace focal_emu

inline void __syncthreads() {
  if (focal_emu::block_barrier == nullptr) {
    std::fputs("emulated CUDA: __syncthreads() outside a kernel\n", stderr);
    std::abort();
  }
  focal_emu::block_barrier->arrive_and_wait();
}

// ---- CUB --------------------------------------------------------------------------------------

namespace focal_emu {

// A shuffle over a full warp (mask 0xffffffff, which the kernels always pass): every lane writes
// `value` to its slot, all wait, each reads the slot of lane source(lane) (its own value when that
// is past the warp's end), and all wait again before a slot can be rewritten.
template <typename T, typename Source>
T warp_shuffle(const char* name, unsigned mask, T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "one register's worth");
  Warp* w = warp;
  if (w == nullptr || mask != 0xffffffffu || blockDim.x % kWarpThreads != 0) {
    std::fprintf(stderr, "emulated CUDA: %s needs a full warp inside a kernel\n", name);
    std::abort();
  }
  const unsigned lane = threadIdx.x % kWarpThreads;
  std::memcpy(&w->slots[lane], &value, sizeof(T));
  w->barrier.arrive_and_wait();
  T out = value;
  if (const unsigned from = source(lane); from < static_cast<unsigned>(kWarpThreads)) {
    std::memcpy(&out, &w->slots[from], sizeof(T));
  }
  w->barrier.arrive_and_wait();
  return out;
}

}  // namespace focal_emu

// A barrier of the calling thread's warp (mask 0xffffffff, which the kernels always pass): every
// lane's writes to shared memory before it are seen by every lane after it.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (focal_emu::warp == nullptr || mask != 0xffffffffu || blockDim.x % focal_emu::kWarpThreads != 0) {
    std::fputs("emulated CUDA: __syncwarp needs a full warp inside a kernel\n", stderr);
    std::abort();
  }
  focal_emu::warp->barrier.arrive_and_wait();
}

// Lane l receives lane l + offset's value, or its own when that lane is past the warp's end.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned offset) {
  return focal_emu::warp_shuffle("__shfl_down_sync", mask, value, [&](unsigned lane) { return lane + offset; });
}

// Every lane receives lane src_lane's value (as on the GPU, the source lane taken modulo the warp's
// width).
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane) {
  return focal_emu::warp_shuffle("__shfl_sync", mask, value, [&](unsigned) {
    return static_cast<unsigned>(src_lane) % focal_emu::kWarpThreads;
  });
}

namespace cub {

// cub::BlockReduce<T, BLOCK_THREADS> with its default algorithm, BLOCK_REDUCE_WARP_REDUCTIONS, for
// Sum() over a full 1-D block, adding in the order the GPU does (cub/block/specializations/
// block_reduce_warp_reductions.cuh, cub/warp/specializations/warp_reduce_shfl.cuh):
//  1. each warp of 32 threads reduces with five shuffle-down steps, offsets 1, 2, 4, 8, 16: at each
//     step every lane whose source lane + offset is still in the warp adds that lane's value to its
//     own (all lanes read before any writes); lane 0 then holds the warp's total;
//  2. lane 0 of each warp stores its total in shared memory, __syncthreads();
//  3. thread 0 adds the warp totals to warp 0's, in warp order: ((w0 + w1) + w2) + ...
// Only thread 0's result is the block total, as with CUB. Each step is a + b or b + a depending on
// the type in CUB's PTX; IEEE addition is commutative, so the order of the operands is immaterial.
template <typename T, int BLOCK_THREADS>
class BlockReduce {
  static constexpr int kWarp = focal_emu::kWarpThreads;
  static constexpr int kWarps = BLOCK_THREADS / kWarp;
  static_assert(BLOCK_THREADS % kWarp == 0, "the emulation handles whole warps only");

 public:
  struct TempStorage {
    T lanes[BLOCK_THREADS];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {
    if (blockDim.x * blockDim.y * blockDim.z != static_cast<unsigned>(BLOCK_THREADS)) {
      std::fputs("emulated cub::BlockReduce: block size differs from BLOCK_THREADS\n", stderr);
      std::abort();
    }
  }

  T Sum(T input) {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    storage_.lanes[tid] = input;
    __syncthreads();
    if (tid != 0) return input;
    T total = warp_total(storage_.lanes);
    for (int w = 1; w < kWarps; ++w) total = total + warp_total(storage_.lanes + w * kWarp);
    return total;
  }

  // Any associative and commutative `op` (a maximum), folded in thread order: unlike a sum, its
  // result does not depend on the order.
  template <typename Op>
  T Reduce(T input, Op op) {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    storage_.lanes[tid] = input;
    __syncthreads();
    if (tid != 0) return input;
    T v[BLOCK_THREADS];
    for (int i = 0; i < BLOCK_THREADS; ++i) v[i] = storage_.lanes[i];
    T total = v[0];
    for (int i = 1; i < BLOCK_THREADS; ++i) total = op(total, v[i]);
    return total;
  }

 private:
  static T warp_total(const T* lanes) {
    T v[kWarp];
    for (int i = 0; i < kWarp; ++i) v[i] = lanes[i];
    for (int offset = 1; offset < kWarp; offset *= 2) {
      T next[kWarp];
      for (int lane = 0; lane < kWarp; ++lane) {
        next[lane] = lane + offset <= kWarp - 1 ? v[lane] + v[lane + offset] : v[lane];
      }
      for (int lane = 0; lane < kWarp; ++lane) v[lane] = next[lane];
    }
    return v[0];
  }

  TempStorage& storage_;
};

}  // namespace cub
