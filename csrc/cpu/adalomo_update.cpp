// AdaLomo on the CPU (docs/spec.md): the op's entry point and workspace size. The passes live in
// adalomo_factored.cpp (dim >= 2) and adalomo_flat.cpp (0-d / 1-d, and the multi-tensor op).
#include "checks.h"
#include "cpu/adalomo_cpu.h"
#include "cpu/cpu_workspace.h"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cpu {

int64_t adalomo_workspace_numel_cpu(const std::vector<std::vector<int64_t>>& shapes,
                                    bool multi) {
  int64_t need = 0, units = 0;
  for (const auto& s : shapes) {
    const int64_t chunks = ceil_div(numel_of(s), kChunk);
    units += chunks;
    if (!multi)
      need = std::max(need, s.size() >= 2 ? factored_workspace_numel(s)
                                          : flat_workspace_numel(1, chunks, false));
  }
  return multi ? flat_workspace_numel(static_cast<int64_t>(shapes.size()), units, true) : need;
}

}  // namespace cpu

void adalomo_update_cpu(ADALOMO_UPDATE_PARAMS) {
  constexpr const char* op = "adalomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  CHECK_CPU(op, param);
  check_scalar_out(op, "grad_sq", grad_sq, param);
  check_adalomo_state(param, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq);
  const bool sr = parse_rounding(op, rounding);
  TORCH_CHECK(stage >= 0 && stage <= 3, op, ": stage must be 0 (all passes) or 1, 2, 3, got ",
              stage);
  TORCH_CHECK(stage == 0 || workspace.has_value(), op, ": stage ", stage,
              " needs a workspace (ops.workspace_numel)");
  const int64_t numel = param.numel();
  TORCH_CHECK(global_rows >= 0 && global_numel >= 0 &&
                  (global_numel == 0 || global_numel >= numel),
              op, ": global_rows / global_numel must be 0 (local) or the unsharded sizes, got ",
              global_rows, ", ", global_numel);
  if (stage == 0 && numel == 0) return;

  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  cpu::AdaCall a{};
  a.s = make_adalomo_scalars(pre, lr, weight_decay, beta, eps1, eps2, clip_threshold, seed, step);
  a.coef = clip_coef.has_value() ? clip_coef->data_ptr<float>()[0] : 1.0f;
  a.sr = sr;
  a.div = pre.divide;
  a.clip = clip_grad_value > 0 || clip_coef.has_value();
  a.grad_sq = grad_sq.has_value() ? grad_sq->data_ptr<float>() : nullptr;
  a.found = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  a.stage = stage;
  a.numel_g = global_numel ? global_numel : numel;
  if (param.dim() >= 2)
    cpu::factored_adalomo(a, param, grad, exp_avg_sq_row->data_ptr<float>(),
                          exp_avg_sq_col->data_ptr<float>(), global_rows, workspace);
  else
    cpu::flat_adalomo(a, param, grad, exp_avg_sq->data_ptr<float>(), workspace);
}

}  // namespace lomo
