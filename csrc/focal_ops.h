// Shared by the backends: the operator schemas, the argument checks and the translation of op
// arguments into KernelArgs.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include "family_math.h"
#include "kernel_args.h"

namespace focal {

// Schemas, registered once by module.cpp; a test-only build registers the same ones in another
// namespace.
//
// sigmoid_focal_loss: loss and, when compute_grad, d(loss)/d(logits) from one pass over the logits.
//   logits (..., C), contiguous; targets of the logits' shape and dtype, or int64 class ids of shape
//   logits.shape[:-1]; weight (C,) or of the logits' shape and row_weight of shape logits.shape[:-1],
//   in the logits' dtype; normalizer: a one-element tensor dividing the loss; scale: a number
//   multiplying it. Returns loss (the logits' shape and dtype for "none", else a 0-dim float32
//   tensor, float64 for float64 logits) and grad (the logits' shape and dtype, or an empty (0,)
//   tensor when compute_grad is false). The arguments after compute_grad came later and have
//   defaults, so that callers of the first schema keep working: class_alpha, a float (C,) tensor,
//   gives each class c its own alpha in place of `alpha` (alpha_c for t = 1, 1 - alpha_c for
//   t = 0); background_index is the class id of background rows (negative for every class), -1 by
//   default. Class ids are [0, C), background_index or ignore_index; both of those lie outside
//   [0, C) and differ.
inline constexpr const char* kSigmoidFocalLossSchema =
    "sigmoid_focal_loss(Tensor logits, Tensor targets, Tensor? weight, Tensor? row_weight, "
    "Tensor? normalizer, float alpha, float gamma, float label_smoothing, int ignore_index, "
    "str reduction, float scale, bool compute_grad, Tensor? class_alpha=None, "
    "int background_index=-1) -> (Tensor, Tensor)";
// The other elementwise losses of the family (family_math.h), with the same arguments, outputs and
// conventions; alpha < 0 disables FL*'s alpha weighting. QFL and VFL take float targets of the
// logits' shape, or int64 class ids of shape logits.shape[:-1] together with `scores` of that shape
// in the logits' dtype: the target of a row's class (not read for background and ignored rows).
// VFL's class_alpha weights each class's negatives (its positives carry their target).
inline constexpr const char* kSigmoidFocalLossStarSchema =
    "sigmoid_focal_loss_star(Tensor logits, Tensor targets, Tensor? weight, Tensor? row_weight, "
    "Tensor? normalizer, float alpha, float gamma, float beta, float label_smoothing, "
    "int ignore_index, str reduction, float scale, bool compute_grad, Tensor? class_alpha=None, "
    "int background_index=-1) -> (Tensor, Tensor)";
inline constexpr const char* kQualityFocalLossSchema =
    "quality_focal_loss(Tensor logits, Tensor targets, Tensor? scores, Tensor? weight, "
    "Tensor? row_weight, Tensor? normalizer, float beta, int ignore_index, str reduction, "
    "float scale, bool compute_grad, int background_index=-1) -> (Tensor, Tensor)";
inline constexpr const char* kVarifocalLossSchema =
    "varifocal_loss(Tensor logits, Tensor targets, Tensor? scores, Tensor? weight, "
    "Tensor? row_weight, Tensor? normalizer, float alpha, float gamma, int ignore_index, "
    "str reduction, float scale, bool compute_grad, Tensor? class_alpha=None, "
    "int background_index=-1) -> (Tensor, Tensor)";
// scale_grad_: grad *= grad_output (broadcast to grad). When grad_output holds one value (one
// element, or every stride 0) equal to 1, no element of grad is touched; on CUDA that test runs on
// the device, so the call never waits for the GPU.
inline constexpr const char* kScaleGradSchema =
    "scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()";

// An operator's name: its schema up to the argument list.
inline std::string op_name(std::string_view schema) { return std::string(schema.substr(0, schema.find('('))); }

enum class Reduction { kNone, kMean, kSum };

// Every schema above, in the order they are defined.
inline constexpr const char* kSchemas[] = {kSigmoidFocalLossSchema, kSigmoidFocalLossStarSchema,
                                           kQualityFocalLossSchema, kVarifocalLossSchema,
                                           kScaleGradSchema};

// The arguments of one of the elementwise loss ops, checked once.
struct FocalCall {
  at::Tensor logits;
  at::Tensor targets;
  std::optional<at::Tensor> scores;
  std::optional<at::Tensor> weight;
  std::optional<at::Tensor> row_weight;
  std::optional<at::Tensor> normalizer;
  double alpha;
  double gamma;
  double label_smoothing;
  int64_t ignore_index;
  int64_t background_index;
  // With a tensor alpha: the (2, C) table of each class's alpha weights (KernelArgs::class_alpha)
  // in the math type, made from it by make_call.
  std::optional<at::Tensor> class_alpha;
  Reduction reduction;
  double scale;
  bool compute_grad;
  LossKind loss_kind = LossKind::kFocal;
  double beta = 0.0;  // FL*'s shift

  bool class_ids() const { return !targets.is_floating_point(); }
  int64_t cols() const { return logits.dim() == 0 ? 1 : logits.size(-1); }
  // Leading dimensions flattened (1 for 0-dim and 1-D logits).
  int64_t rows() const {
    return logits.dim() <= 1 ? 1 : c10::multiply_integers(logits.sizes().slice(0, logits.dim() - 1));
  }
  GammaKind gamma_kind() const;
  // `scale`, divided by the normaliser when that is a CPU tensor (read here, on the host, and
  // checked to be finite and > 0). A normaliser on the GPU is left to the CUDA backend.
  double host_scale() const;
  // The normaliser when it lives on the logits' (non-CPU) device, else nullopt.
  std::optional<at::Tensor> device_normalizer() const;
  // Kernel arguments pointing into this call's tensors and the given outputs (either may be undefined).
  KernelArgs kernel_args(const at::Tensor& loss_out, const at::Tensor& grad_out) const;
  // dtype of a reduced loss: float32 for float32/bfloat16/float16 inputs, float64 for float64.
  at::ScalarType reduced_dtype() const;
  // The loss of reduction "mean" over no element: NaN for float targets (as torch.mean), 0 with
  // class ids (every row ignored).
  double empty_mean() const;
};

// The loss-specific arguments of make_call: which loss, FL*'s shift, and the scores of QFL / VFL
// with class ids.
struct LossSpec {
  LossKind kind = LossKind::kFocal;
  double beta = 0.0;
  std::optional<at::Tensor> scores;
};

// The arguments every schema gained after compute_grad: a tensor alpha (None for QFL) and the
// background's class id.
struct LabelSpec {
  std::optional<at::Tensor> class_alpha;
  int64_t background_index = -1;
};

// Checks what the kernels rely on for memory safety (dtypes, shapes, contiguity, devices) and parses
// the reduction. The values of alpha, gamma, beta, label_smoothing and ignore_index are validated,
// with messages for users, by the Python functions (focal.sigmoid_focal_loss, ...). For QFL and VFL
// `gamma` is the focusing exponent (QFL's beta, VFL's gamma).
FocalCall make_call(const at::Tensor& logits, const at::Tensor& targets,
                    const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& row_weight,
                    const std::optional<at::Tensor>& normalizer, double alpha, double gamma,
                    double label_smoothing, int64_t ignore_index, std::string_view reduction,
                    double scale, bool compute_grad, const LabelSpec& labels,
                    const LossSpec& spec = {});

// Pieces of the argument checks that every loss op shares (focal_ops.cpp; softmax_ops.cpp uses them
// too): the reduction's name, gamma's fast-path kind, the logits' dtype, a normaliser tensor's shape,
// device and dtype, and `factor` divided by a normaliser that lives on the CPU (read and checked
// to be finite and > 0 there; one on the GPU is left to the CUDA kernels).
Reduction parse_reduction(std::string_view reduction);
GammaKind gamma_kind_of(double gamma);
void check_logits_dtype(const at::Tensor& logits);
void check_normalizer(const at::Tensor& logits, const at::Tensor& normalizer);
double divide_by_host_normalizer(double factor, const std::optional<at::Tensor>& normalizer);

// A reduced loss as the CPU backends return it: a 0-dim tensor of `options` (float32 or float64)
// holding `value`, rounded once.
at::Tensor reduced_loss_tensor(double value, const at::TensorOptions& options);

// For scale_grad_: true when grad_output is one value broadcast over grad (one element, or every
// stride 0); checks that it broadcasts to grad and lives on grad's device (or is a CPU scalar).
bool check_scale_grad(const at::Tensor& grad, const at::Tensor& grad_output);

}  // namespace focal
