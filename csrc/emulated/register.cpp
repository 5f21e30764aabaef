// The emulated CUDA kernels as the ops of their own namespace, lomo_kernels_cuda_emulated (schemas
// declared in lomo_kernels/ops.py), registered for CPU tensors: they never take the CPU dispatch
// key of lomo_kernels:: from the native CPU kernels. Each call first registers the tensors it may
// touch, so the emulator can bounds-check vector accesses.
#include <torch/library.h>

#include "emulated/emulation_api.h"
#include "ops.h"

namespace lomo {
namespace {

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

void lomo_update_emulated(LOMO_UPDATE_PARAMS) {
  const emu::MemoryScope scope({{"param", &param},
                                {"grad", &grad},
                                {"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)}});
  cuda_emulated::lomo_update(param, grad, clip_coef, found_inf, lr, weight_decay, loss_scale,
                             clip_grad_value, rounding, seed, step);
}

void adalomo_update_emulated(ADALOMO_UPDATE_PARAMS) {
  const emu::MemoryScope scope({{"param", &param},
                                {"grad", &grad},
                                {"exp_avg_sq_row", opt(exp_avg_sq_row)},
                                {"exp_avg_sq_col", opt(exp_avg_sq_col)},
                                {"exp_avg_sq", opt(exp_avg_sq)},
                                {"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)}});
  cuda_emulated::adalomo_update(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef,
                                found_inf, lr, weight_decay, loss_scale, clip_grad_value, beta,
                                eps1, eps2, clip_threshold, rounding, seed, step);
}

}  // namespace
}  // namespace lomo

TORCH_LIBRARY_IMPL(lomo_kernels_cuda_emulated, CPU, m) {
  m.impl("lomo_update_", &lomo::lomo_update_emulated);
  m.impl("adalomo_update_", &lomo::adalomo_update_emulated);
}
