// The emulated CUDA kernels as the ops of their own namespace, lomo_kernels_cuda_emulated (schemas
// declared in lomo_kernels/ops.py), registered for CPU tensors by register_kernels() (csrc/ops.cpp):
// they never take the CPU dispatch key of lomo_kernels:: from the native CPU kernels. Each call
// first registers the tensors it may touch, so the emulator can bounds-check vector accesses.
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "emulated/emulation_api.h"
#include "ops.h"

namespace lomo {
namespace {

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

void lomo_update_emulated(LOMO_UPDATE_PARAMS) {
  const emu::MemoryScope scope({{"param", &param},
                                {"grad", &grad},
                                {"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)},
                                {"grad_sq", opt(grad_sq)},
                                {"workspace", opt(workspace)}});
  cuda_emulated::lomo_update(param, grad, clip_coef, found_inf, lr, weight_decay, loss_scale,
                             clip_grad_value, rounding, seed, step, grad_sq, workspace);
}

void adalomo_update_emulated(ADALOMO_UPDATE_PARAMS) {
  const emu::MemoryScope scope({{"param", &param},
                                {"grad", &grad},
                                {"exp_avg_sq_row", opt(exp_avg_sq_row)},
                                {"exp_avg_sq_col", opt(exp_avg_sq_col)},
                                {"exp_avg_sq", opt(exp_avg_sq)},
                                {"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)},
                                {"grad_sq", opt(grad_sq)},
                                {"workspace", opt(workspace)}});
  cuda_emulated::adalomo_update(param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, clip_coef,
                                found_inf, lr, weight_decay, loss_scale, clip_grad_value, beta,
                                eps1, eps2, clip_threshold, rounding, seed, step, grad_sq,
                                workspace, stage, global_rows, global_numel);
}

// The multi-tensor ops register the shared tensors, then every tensor of the lists.
void add_all(emu::MemoryScope& scope, const char* name, at::TensorList ts) {
  for (const at::Tensor& t : ts) scope.add(name, &t);
}

void lomo_update_multi_emulated(LOMO_UPDATE_MULTI_PARAMS) {
  emu::MemoryScope scope({{"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)},
                                {"grad_sq", opt(grad_sq)},
                                {"workspace", opt(workspace)}});
  add_all(scope, "params", params);
  add_all(scope, "grads", grads);
  cuda_emulated::lomo_update_multi(params, grads, clip_coef, found_inf, lr, weight_decay,
                                   loss_scale, clip_grad_value, rounding, seed, step, grad_sq,
                                   workspace);
}

void adalomo_update_multi_emulated(ADALOMO_UPDATE_MULTI_PARAMS) {
  emu::MemoryScope scope({{"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)},
                                {"grad_sq", opt(grad_sq)},
                                {"workspace", opt(workspace)}});
  add_all(scope, "params", params);
  add_all(scope, "grads", grads);
  add_all(scope, "exp_avg_sqs", exp_avg_sqs);
  cuda_emulated::adalomo_update_multi(params, grads, exp_avg_sqs, clip_coef, found_inf, lr,
                                      weight_decay, loss_scale, clip_grad_value, beta, eps1, eps2,
                                      clip_threshold, rounding, seed, step, grad_sq, workspace);
}

void golore_update_emulated(GOLORE_UPDATE_PARAMS) {
  const emu::MemoryScope scope({{"r", &r},
                                {"param", opt(param)},
                                {"exp_avg", opt(exp_avg)},
                                {"exp_avg_sq", opt(exp_avg_sq)},
                                {"momentum_buffer", opt(momentum_buffer)},
                                {"clip_coef", opt(clip_coef)},
                                {"found_inf", opt(found_inf)}});
  cuda_emulated::golore_update(GOLORE_UPDATE_ARGS);
}

void grad_accumulate_emulated(GRAD_ACCUMULATE_PARAMS) {
  const emu::MemoryScope scope({{"buf", &buf},
                                {"grad", &grad},
                                {"found_inf", opt(found_inf)},
                                {"buf_sq", opt(buf_sq)},
                                {"workspace", opt(workspace)}});
  cuda_emulated::grad_accumulate(buf, grad, found_inf, loss_scale, first, rounding, seed, step,
                                 buf_sq, workspace);
}

}  // namespace

namespace emu {
void register_emulated_kernels(torch::Library& lib) {
  lib.impl("lomo_update_", &lomo_update_emulated);
  lib.impl("adalomo_update_", &adalomo_update_emulated);
  lib.impl("lomo_update_multi_", &lomo_update_multi_emulated);
  lib.impl("adalomo_update_multi_", &adalomo_update_multi_emulated);
  lib.impl("golore_update_", &golore_update_emulated);
  lib.impl("grad_accumulate_", &grad_accumulate_emulated);
}
}  // namespace emu

}  // namespace lomo
