// The SIMT emulator's memory checks: dynamic shared memory of a launch, static __shared__ memory
// poisoned at every block start, 16-byte vector accesses (alignment and the bounds of the tensors an
// op registered with MemoryScope).
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "emulated/emulation_api.h"
#include "emulated/emulator_internal.h"

namespace lomo {
namespace emu {
namespace detail {

thread_local std::vector<MemRange> tls_ranges;
thread_local std::vector<at::Tensor> tls_keep_alive;

namespace {

// A static __shared__ variable: `static thread_local` (emulation.h), at `rel` bytes from threadIdx
// in every OS thread's TLS block of this module.
struct StaticShared {
  ptrdiff_t rel;
  size_t size;
};

// The kernels' static __shared__ variables: the thread-local statics of functions of
// lomo::cuda_emulated (mangled _ZZN4lomo13cuda_emulated...), from this module's symbol table (an
// STT_TLS symbol's value is its offset in the module's TLS block). Empty if the module is stripped.
std::vector<StaticShared> find_static_shared() {
  std::vector<StaticShared> vars;
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&find_static_shared), &info) || !info.dli_fname) return vars;
  const int fd = open(info.dli_fname, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return vars;
  struct stat st;
  void* map = fstat(fd, &st) == 0 ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)
                                  : MAP_FAILED;
  close(fd);
  if (map == MAP_FAILED) return vars;
  const auto* base = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  const bool elf64 = static_cast<size_t>(st.st_size) > sizeof(Elf64_Ehdr) &&
                     std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 &&
                     eh->e_ident[EI_CLASS] == ELFCLASS64;
  std::vector<std::pair<uint64_t, size_t>> found;
  bool anchor = false;
  uint64_t anchor_value = 0;
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + (elf64 ? eh->e_shoff : 0));
  for (int i = 0; elf64 && i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const char* names = base + sh[sh[i].sh_link].sh_offset;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      if (ELF64_ST_TYPE(sym[k].st_info) != STT_TLS) continue;
      const char* name = names + sym[k].st_name;
      if (std::strcmp(name, "threadIdx") == 0) {
        anchor = true;
        anchor_value = sym[k].st_value;
      } else if (std::strncmp(name, "_ZZN4lomo13cuda_emulated", 24) == 0 && sym[k].st_size) {
        found.emplace_back(sym[k].st_value, sym[k].st_size);
      }
    }
  }
  munmap(map, st.st_size);
  if (!anchor) return vars;
  for (const auto& [value, size] : found)
    vars.push_back({static_cast<ptrdiff_t>(value - anchor_value), size});
  return vars;
}

}  // namespace

size_t poison_static_shared() {
  static const std::vector<StaticShared> vars = find_static_shared();
  auto* anchor = reinterpret_cast<unsigned char*>(&threadIdx);
  for (const StaticShared& v : vars) std::memset(anchor + v.rel, 0xFF, v.size);
  return vars.size();
}

}  // namespace detail

using namespace detail;

unsigned char* dynamic_shared_memory() {
  BlockRun& r = *tls_run;
  if (!r.L->smem) fail_here(r, "dynamic shared memory used but the launch requested 0 bytes");
  return r.smem;
}

void check_vector_access(const void* p, size_t bytes, bool store) {
  BlockRun& r = *tls_run;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  char buf[256];
  if (a % bytes) {
    std::snprintf(buf, sizeof(buf), "misaligned %zu-byte vector %s at %p", bytes,
                  store ? "store" : "load", p);
    fail_here(r, buf);
  }
  // Inside a registered tensor: fine. Starting in one and running past its end, or elsewhere in
  // its storage: an error (on a GPU it reads or overwrites a neighbour without a fault).
  const MemRange* hit = nullptr;
  for (const MemRange& m : *r.L->ranges) {
    if (a >= m.view_lo && a + bytes <= m.view_hi) return;
    if ((a >= m.view_lo && a < m.view_hi) || (a >= m.storage_lo && a < m.storage_hi)) hit = &m;
  }
  if (hit) {
    const bool starts_inside = a >= hit->view_lo && a < hit->view_hi;
    std::snprintf(buf, sizeof(buf), "%zu-byte vector %s at %p %s outside tensor '%s' [%p, %p)%s",
                  bytes, store ? "store" : "load", p, starts_inside ? "runs" : "is", hit->name,
                  reinterpret_cast<void*>(hit->view_lo), reinterpret_cast<void*>(hit->view_hi),
                  starts_inside ? " past its end" : ", in its storage");
    fail_here(r, buf);
  }
}

void fail(const char* what) { fail_here(*tls_run, what); }

MemoryScope::MemoryScope(std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  tls_ranges.clear();
  tls_keep_alive.clear();
  for (const auto& [name, t] : ts) add(name, t);
}

void MemoryScope::add(const char* name, const at::Tensor* t) {
  if (!t || !t->defined() || !t->has_storage()) return;
  const auto* base = static_cast<const char*>(t->storage().data());
  const auto* data = static_cast<const char*>(t->data_ptr());
  tls_ranges.push_back({reinterpret_cast<uintptr_t>(base),
                        reinterpret_cast<uintptr_t>(base + t->storage().nbytes()),
                        reinterpret_cast<uintptr_t>(data),
                        reinterpret_cast<uintptr_t>(data + t->numel() * t->element_size()),
                        name, std::strcmp(name, "workspace") == 0});
}

MemoryScope::~MemoryScope() {
  tls_ranges.clear();
  tls_keep_alive.clear();
}

}  // namespace emu
}  // namespace lomo
