// The C++ kernels of the lomo_kernels ops. Their signatures mirror the schemas declared once in
// lomo_kernels/ops.py (torch.library.define); ops.cpp registers them with TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace lomo {

#define LOMO_UPDATE_PARAMS                                                                   \
  at::Tensor &param, const at::Tensor &grad, const std::optional<at::Tensor> &clip_coef,    \
      const std::optional<at::Tensor> &found_inf, double lr, double weight_decay,            \
      double loss_scale, double clip_grad_value, std::string_view rounding, int64_t seed,     \
      int64_t step, const std::optional<at::Tensor> &grad_sq,                                \
      const std::optional<at::Tensor> &workspace

#define ADALOMO_UPDATE_PARAMS                                                                \
  at::Tensor &param, const at::Tensor &grad, const std::optional<at::Tensor> &exp_avg_sq_row, \
      const std::optional<at::Tensor> &exp_avg_sq_col,                                       \
      const std::optional<at::Tensor> &exp_avg_sq, const std::optional<at::Tensor> &clip_coef, \
      const std::optional<at::Tensor> &found_inf, double lr, double weight_decay,            \
      double loss_scale, double clip_grad_value, double beta, double eps1, double eps2,      \
      double clip_threshold, std::string_view rounding, int64_t seed, int64_t step,           \
      const std::optional<at::Tensor> &grad_sq, const std::optional<at::Tensor> &workspace,  \
      int64_t stage, int64_t global_rows, int64_t global_numel

#define GOLORE_UPDATE_PARAMS                                                                 \
  at::Tensor &r, const std::optional<at::Tensor> &param,                                    \
      const std::optional<at::Tensor> &exp_avg, const std::optional<at::Tensor> &exp_avg_sq, \
      const std::optional<at::Tensor> &momentum_buffer,                                      \
      const std::optional<at::Tensor> &clip_coef, const std::optional<at::Tensor> &found_inf, \
      std::string_view inner, double lr, double weight_decay, double scale, double beta1,    \
      double beta2, double eps, double momentum, std::string_view rounding, int64_t seed,    \
      int64_t step

// The arguments of GOLORE_UPDATE_PARAMS, in order, to pass them on.
#define GOLORE_UPDATE_ARGS                                                                   \
  r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf, inner, lr,          \
      weight_decay, scale, beta1, beta2, eps, momentum, rounding, seed, step

void lomo_update_cpu(LOMO_UPDATE_PARAMS);
void adalomo_update_cpu(ADALOMO_UPDATE_PARAMS);
void golore_update_cpu(GOLORE_UPDATE_PARAMS);

#ifdef LOMO_KERNELS_WITH_CUDA
void lomo_update_cuda(LOMO_UPDATE_PARAMS);
void adalomo_update_cuda(ADALOMO_UPDATE_PARAMS);
void golore_update_cuda(GOLORE_UPDATE_PARAMS);
#endif

}  // namespace lomo
