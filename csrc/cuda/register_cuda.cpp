// Registers the CUDA backend's operator functions (cuda_ops.h) for the focal ops on the CUDA key; in
// the test-only emulated build (-DFOCAL_CUDA_EMULATION, tests/cuda_emulation) for the same schemas
// of namespace focal_emu on the CPU key. Compiled by the host compiler alone, as the one file of the
// backend that includes torch/library.h.
#include <torch/library.h>

#include "../loss_ops.h"
#include "cuda_ops.h"

#if defined(FOCAL_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(focal_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(focal, CUDA, m) {
#endif
  focal::LossOps<&focal::cuda::run_elementwise_loss>::register_on(m);
  m.impl("softmax_focal_loss", &focal::cuda::softmax_focal_loss);
  m.impl("scale_grad_", &focal::cuda::scale_grad);
  m.impl("fcos_box_losses", &focal::cuda::fcos_box_losses);
}
