// lomo_kernels._C: the native kernels for the ops that lomo_kernels/ops.py declares (the schemas
// live there, once; this module only adds CPU/CUDA implementations).
//
// Registration is a function, not a static TORCH_LIBRARY_IMPL: a static registration whose C++
// signature does not match the declared schema (an extension built from an older checkout) aborts
// the whole process at import. ops.py first compares contract_version() with its own, then calls
// register_kernels(), whose errors surface as Python exceptions.
#include <torch/extension.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <vector>

#include "ops.h"

#ifdef LOMO_KERNELS_WITH_CUDA_EMULATION
#include "emulated/emulation_api.h"
namespace lomo::cuda_emulated {
void emulation_probe(const std::string& name, at::Tensor out, int64_t arg, int64_t arg2);
}
#endif

#define LOMO_STR_(...) #__VA_ARGS__
#define LOMO_STR(...) LOMO_STR_(__VA_ARGS__)

namespace {

// Bump together with CONTRACT_VERSION in lomo_kernels/ops.py whenever a schema changes.
constexpr int64_t kContractVersion = 4;

std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static std::vector<std::unique_ptr<torch::Library>> libs;  // alive for the process
  return libs;
}

std::unique_ptr<torch::Library> impl_library(const char* ns, c10::DispatchKey key) {
  return std::make_unique<torch::Library>(torch::Library::IMPL, ns, key, __FILE__, __LINE__);
}

void register_kernels() {
  if (!libraries().empty()) return;
  auto cpu = impl_library("lomo_kernels", c10::DispatchKey::CPU);
  cpu->impl("lomo_update_", &lomo::lomo_update_cpu);
  cpu->impl("adalomo_update_", &lomo::adalomo_update_cpu);
  cpu->impl("lomo_update_multi_", &lomo::lomo_update_multi_cpu);
  cpu->impl("adalomo_update_multi_", &lomo::adalomo_update_multi_cpu);
  cpu->impl("golore_update_", &lomo::golore_update_cpu);
  cpu->impl("grad_accumulate_", &lomo::grad_accumulate_cpu);
  libraries().push_back(std::move(cpu));
#ifdef LOMO_KERNELS_WITH_CUDA
  auto cuda = impl_library("lomo_kernels", c10::DispatchKey::CUDA);
  cuda->impl("lomo_update_", &lomo::cuda::lomo_update);
  cuda->impl("adalomo_update_", &lomo::cuda::adalomo_update);
  cuda->impl("lomo_update_multi_", &lomo::cuda::lomo_update_multi);
  cuda->impl("adalomo_update_multi_", &lomo::cuda::adalomo_update_multi);
  cuda->impl("golore_update_", &lomo::cuda::golore_update);
  cuda->impl("grad_accumulate_", &lomo::cuda::grad_accumulate);
  libraries().push_back(std::move(cuda));
#endif
#ifdef LOMO_KERNELS_WITH_CUDA_EMULATION
  // the emulated CUDA kernels: CPU tensors, their own namespace (never the CPU kernels' place)
  auto emulated = impl_library("lomo_kernels_cuda_emulated", c10::DispatchKey::CPU);
  lomo::emu::register_emulated_kernels(*emulated);
  libraries().push_back(std::move(emulated));
#endif
}

// The CUDA kernels' workspace need, also the emulation's (ops.workspace_numel takes the max with
// the reference's).
int64_t workspace_numel_cuda(const std::string& op, const lomo::Shapes& shapes) {
#if defined(LOMO_KERNELS_WITH_CUDA)
  return lomo::cuda::workspace_numel(op, shapes);
#elif defined(LOMO_KERNELS_WITH_CUDA_EMULATION)
  return lomo::cuda_emulated::workspace_numel(op, shapes);
#else
  (void)op;
  (void)shapes;
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lomo_kernels native kernels (C++/OpenMP CPU, CUDA); ops via torch.ops.lomo_kernels";
  m.def("contract_version", [] { return kContractVersion; },
        "The version of the op schemas this build implements.");
  m.def("register_kernels", &register_kernels,
        "Register the CPU (and CUDA) kernels for the ops declared in lomo_kernels/ops.py.");
  m.def("workspace_numel_cuda", &workspace_numel_cuda, pybind11::arg("op"),
        pybind11::arg("shapes"),
        "float32 elements of the workspace the CUDA kernels (native or emulated) need for `op` on "
        "`shapes`; 0 when neither is built.");
  m.def(
      "workspace_numel",
      [](const std::string& op, const std::vector<std::vector<int64_t>>& shapes) {
        return lomo::workspace_numel_cpu(op, shapes);
      },
      "float32 elements of the workspace the native kernels of `op` need for `shapes` (the op "
      "contract: single-tensor ops, any one of them; multi-tensor ops, all in one call).");
  m.def("same_bytes", &lomo::cpu::same_bytes_cpu, pybind11::arg("op"), pybind11::arg("param"),
        pybind11::arg("grad"), pybind11::arg("exp_avg_sq") = std::nullopt,
        "Benchmarks only: streams the bytes of one CPU update of `op` (its fewest passes over "
        "memory) over the same tensors and work units, leaving them unchanged (bench/same_bytes.py).");
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
