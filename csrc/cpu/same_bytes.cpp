// The same-bytes reference of the CPU benchmarks (bench/same_bytes.py): a streaming kernel that
// moves exactly the bytes of an update's fewest passes over memory (docs/spec.md), in the same
// passes, over the same work units, in the same order and on the same threads as the update,
// with no arithmetic besides an integer xor. Its time is what moving those bytes costs in that
// pattern on this machine; the update's time over it says how far the update is from the memory
// bound (its "fraction of the same-bytes stream").
//   lomo_update_:            read p and g, write p                      (3 x element size)
//   adalomo_update_, dim>=2: (1) read g and p  (2) read g  (3) read g and p, write p
//                                                                       (6 x element size)
//   adalomo_update_, dim<2:  (1) read g, p, v  (2) read g, p, v, write p and v
//                                                                       (5 x element size + 12)
// p (and v) are stored back unchanged (xor with the gradient's bits masked by a runtime zero),
// so the reference runs on the update's own tensors: the same addresses, pages and alignment.
#include <ATen/ATen.h>

#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_workspace.h"
#include "cpu/factored_tiles.h"

namespace lomo {
namespace cpu {
namespace {

struct SameBytesCtx {
  void* p;
  const void* g;
  float* v;        // the 1-d AdaLomo state, or null
  int64_t n;       // elements
  Geo geo;         // factored AdaLomo
  uint32_t mask;   // 0 at run time: the stored values are the loaded ones
  uint64_t* part;  // [units] xor of what a unit read (keeps the loads)
};

// word type of a stored element
template <Fmt F>
using word_t = std::conditional_t<F == Fmt::F32, uint32_t, uint16_t>;

// xor of x[0..len) (read only)
template <class T>
LOMO_CPU_INLINE T xor_read(const T* __restrict x, int64_t len) {
  T acc = 0;
  for (int64_t j = 0; j < len; ++j) acc ^= x[j];
  return acc;
}

// p[j] = p[j] ^ (g[j] & mask) for j < len: reads p and g, writes p (the values are unchanged)
template <class T>
LOMO_CPU_INLINE void xor_store(T* __restrict p, const T* __restrict g, int64_t len, T mask) {
  for (int64_t j = 0; j < len; ++j) p[j] ^= g[j] & mask;
}

// ---- LOMO: one pass over kChunk units, as lomo_update.cpp ----------------------------------
template <class K, int W>
LOMO_CPU_INLINE void sb_lomo(const SameBytesCtx& c, int64_t unit) {
  using T = word_t<K::F>;
  const int64_t begin = unit * kChunk, len = std::min(c.n - begin, kChunk);
  xor_store(static_cast<T*>(c.p) + begin, static_cast<const T*>(c.g) + begin, len,
            static_cast<T>(c.mask));
}
LOMO_CPU_CLONES(sb_lomo)

// ---- AdaLomo, factored: the three passes over the tiles of adalomo_factored.cpp ----------------
template <class K, int W, int PASS>
LOMO_CPU_INLINE void sb_factored(const SameBytesCtx& c, int64_t unit) {
  using T = word_t<K::F>;
  const Geo& geo = c.geo;
  const Tile t = tile_of(geo, unit);
  T acc = 0;
  for (int64_t r = t.r0; r < t.r1; ++r) {
    const int64_t off = (t.s * geo.m + r) * geo.n + t.c0;
    T* p = static_cast<T*>(c.p) + off;
    const T* g = static_cast<const T*>(c.g) + off;
    if constexpr (PASS == 0) acc ^= xor_read(g, t.w) ^ xor_read(p, t.w);
    if constexpr (PASS == 1) acc ^= xor_read(g, t.w);
    if constexpr (PASS == 2) xor_store(p, g, t.w, static_cast<T>(c.mask));
  }
  c.part[unit] ^= acc;
}
template <class K, int W>
LOMO_CPU_INLINE void sb_factored_stats(const SameBytesCtx& c, int64_t u) {
  sb_factored<K, W, 0>(c, u);
}
template <class K, int W>
LOMO_CPU_INLINE void sb_factored_unorm(const SameBytesCtx& c, int64_t u) {
  sb_factored<K, W, 1>(c, u);
}
template <class K, int W>
LOMO_CPU_INLINE void sb_factored_apply(const SameBytesCtx& c, int64_t u) {
  sb_factored<K, W, 2>(c, u);
}
LOMO_CPU_CLONES(sb_factored_stats)
LOMO_CPU_CLONES(sb_factored_unorm)
LOMO_CPU_CLONES(sb_factored_apply)

// ---- AdaLomo, 0-d / 1-d: the two passes over kChunk units of adalomo_flat.cpp ----------------
template <class K, int W>
LOMO_CPU_INLINE void sb_flat_stats(const SameBytesCtx& c, int64_t unit) {
  using T = word_t<K::F>;
  const int64_t begin = unit * kChunk, len = std::min(c.n - begin, kChunk);
  const uint32_t* v = reinterpret_cast<const uint32_t*>(c.v) + begin;
  c.part[unit] ^= xor_read(static_cast<const T*>(c.g) + begin, len) ^
                  xor_read(static_cast<const T*>(c.p) + begin, len) ^ xor_read(v, len);
}
template <class K, int W>
LOMO_CPU_INLINE void sb_flat_apply(const SameBytesCtx& c, int64_t unit) {
  using T = word_t<K::F>;
  const int64_t begin = unit * kChunk, len = std::min(c.n - begin, kChunk);
  const T* __restrict g = static_cast<const T*>(c.g) + begin;
  T* __restrict p = static_cast<T*>(c.p) + begin;
  uint32_t* __restrict v = reinterpret_cast<uint32_t*>(c.v) + begin;
  const T mask = static_cast<T>(c.mask);
  for (int64_t j = 0; j < len; ++j) {
    p[j] ^= g[j] & mask;
    v[j] ^= static_cast<uint32_t>(g[j]) & c.mask;
  }
}
LOMO_CPU_CLONES(sb_flat_stats)
LOMO_CPU_CLONES(sb_flat_apply)

using SbFn = void (*)(const SameBytesCtx&, int64_t);

// fn[k] for each pass, picked for the dtype and this CPU
template <class Pick>
void pick_for(at::ScalarType dtype, const Pick& pick) {
  dispatch_flags<0>(dtype, false, false, false, false, true, pick);
}

}  // namespace

int64_t same_bytes_cpu(const std::string& op, at::Tensor& param, const at::Tensor& grad,
                       const std::optional<at::Tensor>& exp_avg_sq) {
  const char* name = "same_bytes";
  CHECK_CPU(name, param);
  CHECK_CPU(name, grad);
  CHECK_CONTIGUOUS(name, param);
  CHECK_CONTIGUOUS(name, grad);
  TORCH_CHECK(param.scalar_type() == grad.scalar_type() && param.sizes() == grad.sizes(), name,
              ": grad must have param's dtype and shape");
  const bool lomo = op == "lomo_update_";
  TORCH_CHECK(lomo || op == "adalomo_update_", name, ": op must be 'lomo_update_' or "
              "'adalomo_update_', got '", op, "'");
  const bool flat = !lomo && param.dim() < 2;
  if (flat) {
    TORCH_CHECK(exp_avg_sq.has_value() && exp_avg_sq->scalar_type() == at::kFloat &&
                    exp_avg_sq->is_contiguous() && exp_avg_sq->numel() == param.numel() &&
                    exp_avg_sq->device().is_cpu(),
                name, ": a 0-d / 1-d AdaLomo parameter needs its float32 exp_avg_sq");
  }
  SameBytesCtx c{};
  c.p = param.data_ptr();
  c.g = grad.data_ptr();
  c.v = flat ? exp_avg_sq->data_ptr<float>() : nullptr;
  c.n = param.numel();
  if (c.n == 0) return 0;
  // volatile: the compiler cannot know the mask is zero, so every load and store stays
  static volatile uint32_t zero = 0;
  c.mask = zero;
  const bool factored = !lomo && !flat;
  if (factored) c.geo = factored_geo(param.sizes());
  const int64_t units = factored ? c.geo.units : ceil_div(c.n, kChunk);
  thread_local std::vector<uint64_t> part;  // reused: nothing is allocated per call
  part.assign(static_cast<size_t>(units), 0);
  c.part = part.data();
  SbFn fn[3] = {};
  int passes = 0;
  pick_for(param.scalar_type(), [&](auto k) {
    using K = decltype(k);
    if (lomo) {
      fn[0] = sb_lomo_pick<K, SameBytesCtx>();
      passes = 1;
    } else if (flat) {
      fn[0] = sb_flat_stats_pick<K, SameBytesCtx>();
      fn[1] = sb_flat_apply_pick<K, SameBytesCtx>();
      passes = 2;
    } else {
      fn[0] = sb_factored_stats_pick<K, SameBytesCtx>();
      fn[1] = sb_factored_unorm_pick<K, SameBytesCtx>();
      fn[2] = sb_factored_apply_pick<K, SameBytesCtx>();
      passes = 3;
    }
  });
  if (passes == 1) {
    run_units(fn[0], c, units);
  } else {
    parallel_phases(
        passes, [&](int) { return units; }, [&](int k, int64_t u) { fn[k](c, u); },
        [](int) {});
  }
  uint64_t acc = 0;
  for (uint64_t x : part) acc ^= x;
  return static_cast<int64_t>(acc);
}

}  // namespace cpu
}  // namespace lomo
