// focal::Ops for ATen's SIMD vectors, so that focal_math.h runs vectorised on the CPU.
// Must be compiled with the ISA flags of the CPU_CAPABILITY being built (see setup.py).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../focal_math.h"

namespace focal {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true
  static inline V exp(const V& x) { return x.exp(); }
  static inline V log(const V& x) { return x.log(); }
  static inline V abs(const V& x) { return x.abs(); }
  static inline V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static inline V min0(const V& x) { return at::vec::minimum(x, V(T(0))); }
  static inline Mask nonneg(const V& x) { return x >= V(T(0)); }
  static inline Mask positive(const V& x) { return x > V(T(0)); }
  static inline V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace focal
