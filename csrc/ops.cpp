// lomo_kernels._C: registers the native kernels for the ops that lomo_kernels/ops.py declares
// (the schemas live there, once; importing this module only adds CPU/CUDA implementations).
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

#ifdef LOMO_KERNELS_WITH_CUDA_EMULATION
#include "emulated/emulation_api.h"
namespace lomo::cuda_emulated {
void emulation_probe(const std::string& name, at::Tensor out, int64_t arg, int64_t arg2);
}
#endif

#define LOMO_STR_(...) #__VA_ARGS__
#define LOMO_STR(...) LOMO_STR_(__VA_ARGS__)

TORCH_LIBRARY_IMPL(lomo_kernels, CPU, m) {
  m.impl("lomo_update_", &lomo::lomo_update_cpu);
  m.impl("adalomo_update_", &lomo::adalomo_update_cpu);
}

#ifdef LOMO_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(lomo_kernels, CUDA, m) {
  m.impl("lomo_update_", &lomo::cuda::lomo_update);
  m.impl("adalomo_update_", &lomo::cuda::adalomo_update);
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
  m.def(
      "cuda_archs",
      [] {
#ifdef LOMO_KERNELS_CUDA_ARCHS
        return std::string(LOMO_STR(LOMO_KERNELS_CUDA_ARCHS));
#else
        return std::string();
#endif
      },
      "The CUDA targets compiled in, e.g. 'sm_80+sm_90+compute_90' (empty without CUDA).");
  m.def(
      "has_cuda_emulation",
      [] {
#ifdef LOMO_KERNELS_WITH_CUDA_EMULATION
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were also compiled for the SIMT emulation (cuda_emulated).");
#ifdef LOMO_KERNELS_WITH_CUDA_EMULATION
  m.def("emulated_launch_count", &lomo::emu::launch_count,
        "Kernel launches run by the emulation since the last reset.");
  m.def("reset_emulated_launch_count", &lomo::emu::reset_launch_count);
  m.def(
      "emulation_stats",
      [] {
        const auto s = lomo::emu::stats();
        pybind11::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["threads"] = s.threads;
        d["context_switches"] = s.switches;
        d["fibers"] = s.fibers;
        return d;
      },
      "Counters of the emulation since the process started (launches: since the last reset).");
  m.def("_emulation_probe", &lomo::cuda_emulated::emulation_probe, pybind11::arg("name"),
        pybind11::arg("out"), pybind11::arg("arg") = 0, pybind11::arg("arg2") = 0,
        "Runs a probe kernel of the emulator itself (tests/test_cuda_emulation.py).");
#endif
}
