// The C++ kernels of the lomo_kernels ops. Their signatures mirror the schemas declared once in
// lomo_kernels/ops.py (torch.library.define); ops.cpp registers them with TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

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

#define LOMO_UPDATE_MULTI_PARAMS                                                             \
  at::TensorList params, at::TensorList grads, const std::optional<at::Tensor> &clip_coef,   \
      const std::optional<at::Tensor> &found_inf, c10::ArrayRef<double> lr,                  \
      c10::ArrayRef<double> weight_decay, double loss_scale,                                 \
      c10::ArrayRef<double> clip_grad_value, std::string_view rounding,                      \
      c10::ArrayRef<int64_t> seed, c10::ArrayRef<int64_t> step,                              \
      const std::optional<at::Tensor> &grad_sq, const std::optional<at::Tensor> &workspace

#define ADALOMO_UPDATE_MULTI_PARAMS                                                          \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avg_sqs,                   \
      const std::optional<at::Tensor> &clip_coef, const std::optional<at::Tensor> &found_inf, \
      c10::ArrayRef<double> lr, c10::ArrayRef<double> weight_decay, double loss_scale,       \
      c10::ArrayRef<double> clip_grad_value, c10::ArrayRef<double> beta,                     \
      c10::ArrayRef<double> eps1, c10::ArrayRef<double> eps2,                                \
      c10::ArrayRef<double> clip_threshold, std::string_view rounding,                       \
      c10::ArrayRef<int64_t> seed, c10::ArrayRef<int64_t> step,                              \
      const std::optional<at::Tensor> &grad_sq, const std::optional<at::Tensor> &workspace

#define GOLORE_UPDATE_PARAMS                                                                 \
  at::Tensor &r, const std::optional<at::Tensor> &param,                                    \
      const std::optional<at::Tensor> &exp_avg, const std::optional<at::Tensor> &exp_avg_sq, \
      const std::optional<at::Tensor> &momentum_buffer,                                      \
      const std::optional<at::Tensor> &clip_coef, const std::optional<at::Tensor> &found_inf, \
      std::string_view inner, double lr, double weight_decay, double scale, double beta1,    \
      double beta2, double eps, double momentum, std::string_view rounding, int64_t seed,    \
      int64_t step

#define GRAD_ACCUMULATE_PARAMS                                                               \
  at::Tensor &buf, const at::Tensor &grad, const std::optional<at::Tensor> &found_inf,      \
      double loss_scale, bool first, std::string_view rounding, int64_t seed, int64_t step,  \
      const std::optional<at::Tensor> &buf_sq, const std::optional<at::Tensor> &workspace

// The arguments of GOLORE_UPDATE_PARAMS, in order, to pass them on.
#define GOLORE_UPDATE_ARGS                                                                   \
  r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef, found_inf, inner, lr,          \
      weight_decay, scale, beta1, beta2, eps, momentum, rounding, seed, step

// float32 elements of the workspace the CUDA kernels need for `op` on `shapes` (single ops: any
// one shape; multi ops: the whole list), ops.workspace_numel's native part.
using Shapes = std::vector<std::vector<int64_t>>;

void lomo_update_cpu(LOMO_UPDATE_PARAMS);
void adalomo_update_cpu(ADALOMO_UPDATE_PARAMS);
void lomo_update_multi_cpu(LOMO_UPDATE_MULTI_PARAMS);
void adalomo_update_multi_cpu(ADALOMO_UPDATE_MULTI_PARAMS);
void golore_update_cpu(GOLORE_UPDATE_PARAMS);
void grad_accumulate_cpu(GRAD_ACCUMULATE_PARAMS);

// float32 workspace elements the CPU kernels of `op` need for `shapes` (op contract:
// single-tensor ops, any one of the shapes; multi-tensor ops, the whole list in one call).
int64_t workspace_numel_cpu(const std::string &op, const std::vector<std::vector<int64_t>> &shapes);

// The benchmarks' same-bytes reference (csrc/cpu/same_bytes.cpp): streams the bytes of `op`'s
// fewest passes over `param`, `grad` (and a 1-d AdaLomo parameter's exp_avg_sq), leaving them
// unchanged; returns an xor of what it read.
namespace cpu {
int64_t same_bytes_cpu(const std::string &op, at::Tensor &param, const at::Tensor &grad,
                       const std::optional<at::Tensor> &exp_avg_sq);
}

// csrc/cuda/*.cu, compiled by nvcc ...
namespace cuda {
void lomo_update(LOMO_UPDATE_PARAMS);
void adalomo_update(ADALOMO_UPDATE_PARAMS);
void lomo_update_multi(LOMO_UPDATE_MULTI_PARAMS);
void adalomo_update_multi(ADALOMO_UPDATE_MULTI_PARAMS);
void golore_update(GOLORE_UPDATE_PARAMS);
void grad_accumulate(GRAD_ACCUMULATE_PARAMS);
int64_t workspace_numel(std::string_view op, const Shapes& shapes);
}  // namespace cuda

// ... and the same source compiled as host C++ for the SIMT emulation (csrc/emulated/), CPU tensors.
namespace cuda_emulated {
void lomo_update(LOMO_UPDATE_PARAMS);
void adalomo_update(ADALOMO_UPDATE_PARAMS);
void lomo_update_multi(LOMO_UPDATE_MULTI_PARAMS);
void adalomo_update_multi(ADALOMO_UPDATE_MULTI_PARAMS);
void golore_update(GOLORE_UPDATE_PARAMS);
void grad_accumulate(GRAD_ACCUMULATE_PARAMS);
int64_t workspace_numel(std::string_view op, const Shapes& shapes);
}  // namespace cuda_emulated

}  // namespace lomo
