// Argument checks shared by the CPU and CUDA entry points. Every message names the argument, so
// a wrong call fails with "lomo_update_: grad must be contiguous", not with a crash in a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

#include "update_args.h"

#define LOMO_CHECK_DEVICE_TYPE(op, x, dev_type)                                              \
  TORCH_CHECK((x).device().type() == (dev_type), op, ": " #x " must be a ", (dev_type),     \
              " tensor, got one on ", (x).device())
#define CHECK_CPU(op, x) LOMO_CHECK_DEVICE_TYPE(op, x, c10::DeviceType::CPU)
#define CHECK_CUDA(op, x) LOMO_CHECK_DEVICE_TYPE(op, x, c10::DeviceType::CUDA)
#define CHECK_CONTIGUOUS(op, x) TORCH_CHECK((x).is_contiguous(), op, ": " #x " must be contiguous")
#define CHECK_FLOAT32(op, x)                                                                 \
  TORCH_CHECK((x).scalar_type() == at::kFloat, op, ": " #x " must be float32, got ",        \
              (x).scalar_type())

namespace lomo {

// True for "stochastic", false for "nearest"; anything else is an error.
inline bool parse_rounding(const char* op, std::string_view rounding) {
  TORCH_CHECK(rounding == "nearest" || rounding == "stochastic", op,
              ": rounding must be 'nearest' or 'stochastic', got '", std::string(rounding), "'");
  return rounding == "stochastic";
}

// A gradient's dtype for a parameter of dtype dt: dt itself, or float32 for a 16-bit parameter
// (an accumulation buffer, read as float32 by the update kernels).
inline bool grad_dtype_ok(at::ScalarType grad, at::ScalarType dt) {
  return grad == dt || (grad == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16));
}

// param/grad: supported dtypes (grad_dtype_ok), same shape and device, contiguous. clip_coef /
// found_inf: one float32 element on param's device.
inline void check_common(const char* op, const at::Tensor& param, const at::Tensor& grad,
                         const std::optional<at::Tensor>& clip_coef,
                         const std::optional<at::Tensor>& found_inf) {
  auto dt = param.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": param must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(grad_dtype_ok(grad.scalar_type(), dt), op, ": grad dtype ", grad.scalar_type(),
              " must be param's (", dt, ") or float32 (an accumulation buffer)");
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grad shape ", grad.sizes(),
              " != param shape ", param.sizes());
  TORCH_CHECK(grad.device() == param.device(), op, ": grad is on ", grad.device(),
              ", param on ", param.device());
  CHECK_CONTIGUOUS(op, param);
  CHECK_CONTIGUOUS(op, grad);
  if (clip_coef.has_value()) {
    const at::Tensor& c = *clip_coef;
    TORCH_CHECK(c.numel() == 1 && c.scalar_type() == at::kFloat && c.device() == param.device(),
                op, ": clip_coef must be a 1-element float32 tensor on ", param.device(), ", got ",
                c.scalar_type(), " ", c.sizes(), " on ", c.device());
  }
  if (found_inf.has_value()) {
    const at::Tensor& f = *found_inf;
    TORCH_CHECK(f.numel() == 1 && f.scalar_type() == at::kFloat && f.device() == param.device(),
                op, ": found_inf must be a 1-element float32 tensor on ", param.device(), ", got ",
                f.scalar_type(), " ", f.sizes(), " on ", f.device());
  }
}

// grad_accumulate_: buf float32 or grad's dtype (a supported one), same shape and device, both
// contiguous; found_inf / buf_sq one float32 element on buf's device.
inline void check_accumulate(const char* op, const at::Tensor& buf, const at::Tensor& grad,
                             const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& buf_sq) {
  const auto gt = grad.scalar_type(), bt = buf.scalar_type();
  TORCH_CHECK(gt == at::kFloat || gt == at::kHalf || gt == at::kBFloat16, op,
              ": grad must be float32, float16 or bfloat16, got ", gt);
  TORCH_CHECK(bt == at::kFloat || bt == gt, op, ": buf must be float32 or grad's dtype (", gt,
              "), got ", bt);
  TORCH_CHECK(grad.sizes() == buf.sizes(), op, ": grad shape ", grad.sizes(), " != buf shape ",
              buf.sizes());
  TORCH_CHECK(grad.device() == buf.device(), op, ": grad is on ", grad.device(), ", buf on ",
              buf.device());
  CHECK_CONTIGUOUS(op, buf);
  CHECK_CONTIGUOUS(op, grad);
  for (const auto* t : {&found_inf, &buf_sq}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->numel() == 1 && (*t)->scalar_type() == at::kFloat &&
                    (*t)->device() == buf.device(),
                op, ": ", t == &found_inf ? "found_inf" : "buf_sq",
                " must be a 1-element float32 tensor on ", buf.device());
  }
}

// An optional 1-element float32 output on param's device (grad_sq).
inline void check_scalar_out(const char* op, const char* name,
                             const std::optional<at::Tensor>& t, const at::Tensor& param) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == param.device(),
              op, ": ", name, " must be a 1-element float32 tensor on ", param.device(), ", got ",
              t->scalar_type(), " ", t->sizes(), " on ", t->device());
}

// The per-tensor lists of a multi-tensor op have one entry per parameter.
inline void check_multi_lists(const char* op, at::TensorList params, at::TensorList grads,
                              std::initializer_list<const c10::ArrayRef<double>*> floats,
                              std::initializer_list<const c10::ArrayRef<int64_t>*> ints) {
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k, op, ": ", k, " params but ", grads.size(), " grads");
  for (const auto* f : floats)
    TORCH_CHECK(f->size() == k, op, ": a per-tensor float list has ", f->size(), " values for ",
                k, " tensors");
  for (const auto* i : ints)
    TORCH_CHECK(i->size() == k, op, ": a per-tensor int list has ", i->size(), " values for ", k,
                " tensors");
}

// The op contract's newer arguments that a kernel does not implement yet fail clearly.
inline void check_not_implemented(const char* op, const std::optional<at::Tensor>& grad_sq,
                                  int64_t stage = 0) {
  TORCH_CHECK(!grad_sq.has_value(), op, ": grad_sq is not implemented by this backend yet");
  TORCH_CHECK(stage == 0, op, ": stage ", stage, " is not implemented by this backend yet");
}

// AdaLomo state: factored (row, col) for dim >= 2, unfactored (v) otherwise, float32 contiguous
// of the documented shapes on param's device.
inline void check_adalomo_state(const at::Tensor& param,
                                const std::optional<at::Tensor>& row,
                                const std::optional<at::Tensor>& col,
                                const std::optional<at::Tensor>& v) {
  constexpr const char* op = "adalomo_update_";
  auto check = [&](const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape) {
    TORCH_CHECK(t.has_value(), op, ": ", name, " is required for a ", param.dim(),
                "-d parameter");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == shape &&
                    t->device() == param.device(),
                op, ": ", name, " must be float32 of shape ", shape, " on ", param.device(),
                ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  };
  auto none = [&](const char* name, const std::optional<at::Tensor>& t) {
    TORCH_CHECK(!t.has_value(), op, ": ", name, " must be None for a ", param.dim(),
                "-d parameter");
  };
  auto sizes = param.sizes();
  if (param.dim() >= 2) {
    std::vector<int64_t> col_shape(sizes.begin(), sizes.end() - 2);
    col_shape.push_back(sizes.back());
    check("exp_avg_sq_row", row, sizes.slice(0, sizes.size() - 1));
    check("exp_avg_sq_col", col, col_shape);
    none("exp_avg_sq", v);
  } else {
    check("exp_avg_sq", v, sizes);
    none("exp_avg_sq_row", row);
    none("exp_avg_sq_col", col);
  }
}

// golore_update_: r float32 (projected mode) or, full-rank mode, param's shape and device and a
// dtype grad_dtype_ok allows (param's, or float32 for a 16-bit param); the
// state tensors the inner optimizer needs, float32 of r's shape, the others None. Returns the
// inner kind.
inline Inner check_golore(const at::Tensor& r, const std::optional<at::Tensor>& param,
                          const std::optional<at::Tensor>& exp_avg,
                          const std::optional<at::Tensor>& exp_avg_sq,
                          const std::optional<at::Tensor>& momentum_buffer,
                          const std::optional<at::Tensor>& clip_coef,
                          const std::optional<at::Tensor>& found_inf, std::string_view inner,
                          double momentum, int64_t step) {
  constexpr const char* op = "golore_update_";
  TORCH_CHECK(inner == "adamw" || inner == "sgd", op, ": inner must be 'adamw' or 'sgd', got '",
              std::string(inner), "'");
  if (param.has_value()) {
    const at::Tensor& p = *param;
    auto dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                ": param must be float32, float16 or bfloat16, got ", dt);
    TORCH_CHECK(grad_dtype_ok(r.scalar_type(), dt) && r.sizes() == p.sizes() &&
                    r.device() == p.device(),
                op, ": r (the gradient) must have param's dtype (or float32), shape and device: got ",
                r.scalar_type(), " ", r.sizes(), " on ", r.device(), ", param ", dt, " ",
                p.sizes(), " on ", p.device());
    CHECK_CONTIGUOUS(op, p);
  } else {
    TORCH_CHECK(r.scalar_type() == at::kFloat, op,
                ": r (the projected gradient) must be float32, got ", r.scalar_type());
  }
  CHECK_CONTIGUOUS(op, r);
  auto scalar = [&](const char* name, const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == r.device(),
                op, ": ", name, " must be a 1-element float32 tensor on ", r.device(), ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  };
  scalar("clip_coef", clip_coef);
  scalar("found_inf", found_inf);
  const Inner kind = inner == "adamw" ? Inner::AdamW
                     : momentum != 0.0 ? Inner::SgdMomentum
                                       : Inner::Sgd;
  auto state = [&](const char* name, const std::optional<at::Tensor>& t, bool needed) {
    if (!needed) {
      TORCH_CHECK(!t.has_value(), op, ": ", name, " must be None for inner='",
                  std::string(inner), "' with momentum=", momentum);
      return;
    }
    TORCH_CHECK(t.has_value(), op, ": ", name, " is required for inner='", std::string(inner),
                "'");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->sizes() == r.sizes() &&
                    t->device() == r.device(),
                op, ": ", name, " must be float32 of shape ", r.sizes(), " on ", r.device(),
                ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
    CHECK_CONTIGUOUS(op, *t);
  };
  state("exp_avg", exp_avg, kind == Inner::AdamW);
  state("exp_avg_sq", exp_avg_sq, kind == Inner::AdamW);
  state("momentum_buffer", momentum_buffer, kind == Inner::SgdMomentum);
  TORCH_CHECK(kind != Inner::AdamW || step >= 1, op,
              ": step must be >= 1 for inner='adamw' (bias correction), got ", step);
  return kind;
}

// What both golore_update_ entry points need after the checks.
struct GoloreSetup {
  Inner kind;
  bool stochastic;
  GoloreScalars s;
};

inline GoloreSetup golore_setup(const at::Tensor& r, const std::optional<at::Tensor>& param,
                                const std::optional<at::Tensor>& exp_avg,
                                const std::optional<at::Tensor>& exp_avg_sq,
                                const std::optional<at::Tensor>& momentum_buffer,
                                const std::optional<at::Tensor>& clip_coef,
                                const std::optional<at::Tensor>& found_inf,
                                std::string_view inner, double lr, double weight_decay,
                                double scale, double beta1, double beta2, double eps,
                                double momentum, std::string_view rounding, int64_t seed,
                                int64_t step) {
  const Inner kind = check_golore(r, param, exp_avg, exp_avg_sq, momentum_buffer, clip_coef,
                                  found_inf, inner, momentum, step);
  const bool sr = parse_rounding("golore_update_", rounding);
  return {kind, sr,
          make_golore_scalars(kind, lr, weight_decay, scale, beta1, beta2, eps, momentum, seed,
                              step)};
}

// The float32 data of an optional tensor, or nullptr.
inline float* float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace lomo
