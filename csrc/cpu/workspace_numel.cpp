// _C.workspace_numel for the CPU kernels: the float32 elements a caller's workspace needs.
#include "cpu/cpu_workspace.h"
#include "ops.h"

namespace lomo {

int64_t workspace_numel_cpu(const std::string& op,
                            const std::vector<std::vector<int64_t>>& shapes) {
  for (const auto& s : shapes)
    for (int64_t d : s) TORCH_CHECK(d >= 0, "workspace_numel: negative size in a shape");
  if (op == "lomo_update_") return cpu::lomo_workspace_numel_cpu(shapes, false);
  if (op == "lomo_update_multi_") return cpu::lomo_workspace_numel_cpu(shapes, true);
  if (op == "adalomo_update_") return cpu::adalomo_workspace_numel_cpu(shapes, false);
  if (op == "adalomo_update_multi_") return cpu::adalomo_workspace_numel_cpu(shapes, true);
  if (op == "grad_accumulate_") return cpu::grad_accumulate_workspace_numel_cpu(shapes);
  TORCH_CHECK(false, "workspace_numel: unknown op '", op, "'");
}

}  // namespace lomo
