// The primitives of focal_math.h for the CUDA kernels, in two precision tiers (README.md,
// "Precision"). Each tier is an Ops policy that focal_math.h's functions take as their O parameter.
//
// float32 data (AccurateFloatOps): CUDA's expf (within 2 ulp), log(1 + e) from a degree-8
// polynomial (within 2 ulp), and the hardware's reciprocal for sigmoid's 1 / (1 + e) (within 1 ulp):
// outputs within a few float32 ulp of the exact values.
// bfloat16 / float16 data (FastFloatOps): exp from the hardware's ex2, log(1 + e) from a
// degree-5 polynomial (focal_hard: -log(1 - s) on [0, 1/2], hard_parts) and quotients from its
// full-range division (2 ulp), every intermediate within
// about 2^-16 of its exact value, far below the spacing of the stored results (2^-8 for bfloat16,
// 2^-11 for float16); reduced sums, kept in float32, inherit that relative accuracy.
// float64 data: the libm functions of Ops<double>, as on the CPU.
#pragma once

#include "../focal_math.h"
#include "kernel_runtime.cuh"

namespace focal::cuda {

// log(1 + e) = e P(e) for e in [0, 1], P fitted for the smallest relative error after rounding of
// the coefficients to float: below 1.5e-7 (degree 8) and 1e-5 (degree 5) over every float e.
template <int kDegree>
__device__ __forceinline__ float log1p_unit_polynomial(float e);

template <>
__device__ __forceinline__ float log1p_unit_polynomial<8>(float e) {
  float p = 0.005364729557186365f;
  p = fmaf(p, e, -0.030065415427088737f);
  p = fmaf(p, e, 0.07920392602682114f);
  p = fmaf(p, e, -0.13753750920295715f);
  p = fmaf(p, e, 0.1915363073348999f);
  p = fmaf(p, e, -0.24857157468795776f);
  p = fmaf(p, e, 0.333213210105896f);
  p = fmaf(p, e, -0.49999648332595825f);
  return fmaf(p * e, e, e);  // e + e^2 (P(e) - 1) / e: exactly e for tiny e
}

template <>
__device__ __forceinline__ float log1p_unit_polynomial<5>(float e) {
  float p = -0.024734117090702057f;
  p = fmaf(p, e, 0.10359159857034683f);
  p = fmaf(p, e, -0.2124033272266388f);
  p = fmaf(p, e, 0.32622578740119934f);
  p = fmaf(p, e, -0.49953943490982056f);
  return fmaf(p * e, e, e);
}

// -log(1 - s) = log(1 + s / (1 - s)) for s in [0, 1/2] as s + s^2 Q(s), Q of degree 4 fitted for the
// smallest relative error after rounding of the coefficients to float: below 7.1e-6 (2^-17.1) over
// every float s.
__device__ __forceinline__ float log1m_half_polynomial(float s) {
  float p = 0.8238962292671204f;
  p = fmaf(p, s, -0.2804429829120636f);
  p = fmaf(p, s, 0.3882231116294861f);
  p = fmaf(p, s, 0.3169211149215698f);
  p = fmaf(p, s, 0.5006147623062134f);
  return fmaf(p * s, s, s);  // exactly s for tiny s
}

// log2(e): exp(z) = 2^(z log2 e), the argument rounded once, for the hardware's ex2.
constexpr float kLog2E = 1.4426950408889634f;

struct AccurateFloatOps : Ops<float> {
  static __device__ __forceinline__ float exp_neg_abs(float z) { return expf(-fabsf(z)); }
  static __device__ __forceinline__ float log1p_unit(float e, float, float) {
    return log1p_unit_polynomial<8>(e);
  }
  // 1 / (1 + e) with e in [0, 1]: never subnormal, never overflowing. Quotients of other numbers
  // (soft targets' p (1 - p) / q, where q can be subnormal) keep the IEEE division, which neither
  // flushes them nor overflows on the way.
  static __device__ __forceinline__ float recip(float x) { return approx_reciprocal(x); }
};

struct FastFloatOps : AccurateFloatOps {
  // Quotients of any two numbers (the soft-target p (1 - p) / q, whose q can be subnormal) within
  // 2 ulp: no IEEE division, whose exact rounding 16-bit results cannot show.
  static __device__ __forceinline__ float div(float a, float b) { return approx_divide(a, b); }
  static __device__ __forceinline__ float exp_neg_abs(float z) {
    return approx_exp2(fabsf(z) * -kLog2E);
  }
  static __device__ __forceinline__ float log1p_unit(float e, float, float) {
    return log1p_unit_polynomial<5>(e);
  }
  // focal_hard's parts (focal_math.h, HasHardParts) with no select: sigmoid(z) = 1 / (1 + 2^(-z
  // log2 e)) (0 once the power overflows, 1 once it underflows), sigmoid(-z) = 1 - sigmoid(z)
  // (within 2^-24 absolute), and log(1 + exp(-|z|)) = -log(1 - sigmoid(-|z|)), the smaller of the
  // two taken from whichever is relatively exact: sigmoid(z) itself below 1/2, and 1 - sigmoid(z)
  // above, where log(1 + exp(-|z|)) only adds to CE = z + log(1 + exp(-z)) >= z.
  static __device__ __forceinline__ SigmoidParts<float> hard_parts(float z) {
    SigmoidParts<float> s;
    s.sig = approx_reciprocal(1.f + approx_exp2(z * -kLog2E));
    s.sig_neg = 1.f - s.sig;
    s.log1p_e = log1m_half_polynomial(fminf(s.sig, s.sig_neg));
    return s;
  }
};

// The softmax focal loss's primitives (softmax_kernels.cuh): libm's (Ops) for float32 and float64
// data; for 16-bit data, exp from the hardware's ex2 with the argument rounded once, as FastFloatOps
// (where the softmax takes it, z = x - max <= 0: within 2^-21 + |z| 2^-24 relative, the second term
// the argument's rounding, at worst 2^-17.5 near z = -87, below which results flush to 0): two
// instructions where expf takes about ten, and the softmax takes two exponentials per element.
struct FastSoftmaxOps : Ops<float> {
  static __device__ __forceinline__ float exp(float z) { return approx_exp2(z * kLog2E); }
};

template <typename scalar_t>
struct SoftmaxMathForImpl {
  using type = FastSoftmaxOps;  // bfloat16, float16
};
template <>
struct SoftmaxMathForImpl<float> {
  using type = Ops<float>;
};
template <>
struct SoftmaxMathForImpl<double> {
  using type = Ops<double>;
};

// The primitives the softmax kernels use for data of type scalar_t.
template <typename scalar_t>
using SoftmaxMathFor = typename SoftmaxMathForImpl<scalar_t>::type;

template <typename scalar_t>
struct MathForImpl {
  using type = FastFloatOps;  // bfloat16, float16
};
template <>
struct MathForImpl<float> {
  using type = AccurateFloatOps;
};
template <>
struct MathForImpl<double> {
  using type = Ops<double>;
};

// The primitives the kernels use for data of type scalar_t.
template <typename scalar_t>
using MathFor = typename MathForImpl<scalar_t>::type;

}  // namespace focal::cuda
