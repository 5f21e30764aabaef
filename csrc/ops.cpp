// lomo_kernels._C: registers the native kernels for the ops that lomo_kernels/ops.py declares
// (the schemas live there, once; importing this module only adds CPU/CUDA implementations).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(lomo_kernels, CPU, m) {
  m.impl("lomo_update_", &lomo::lomo_update_cpu);
  m.impl("adalomo_update_", &lomo::adalomo_update_cpu);
  m.impl("golore_update_", &lomo::golore_update_cpu);
}

#ifdef LOMO_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(lomo_kernels, CUDA, m) {
  m.impl("lomo_update_", &lomo::lomo_update_cuda);
  m.impl("adalomo_update_", &lomo::adalomo_update_cuda);
  m.impl("golore_update_", &lomo::golore_update_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lomo_kernels native kernels (C++/OpenMP CPU, CUDA); ops via torch.ops.lomo_kernels";
  m.def(
      "has_cuda",
      [] {
#ifdef LOMO_KERNELS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this build.");
}
