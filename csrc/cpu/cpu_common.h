// CPU kernel plumbing: an AVX2+FMA clone of every hot loop chosen at run time, and a parallel
// loop over fixed-size work units.
//
// The loops are plain C++ that GCC/Clang auto-vectorise. Each is compiled three times: for the
// baseline ISA (any x86-64 / other CPU), for AVX2+FMA and for AVX-512 (512-bit vectors and mask
// registers halve the instructions per element, which matters because one core alone cannot
// saturate memory with the AVX2 loop), and the clone for this CPU is picked at run time, so the
// wheel runs everywhere. All clones round the same: the reference's torch.add(p, g, alpha) is one
// fma per element, a real instruction in the AVX2/AVX-512 clones and libm's fmaf in the baseline
// one. The loop bodies are always_inline templates, so each clone gets its own vectorised copy.
//
// Determinism: work is split into units whose boundaries depend only on the tensor's shape; each
// unit writes its partial sums to its own slot and the slots are summed in index order, so the
// result never depends on the number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "rounding.h"

#define LOMO_CPU_INLINE inline __attribute__((always_inline))

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LOMO_X86_CLONES 1
#define LOMO_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define LOMO_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define LOMO_AVX512_TARGET                                                             \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,"            \
                        "prefer-vector-width=512")))
#endif
#else
#define LOMO_X86_CLONES 0
#define LOMO_AVX2_TARGET
#define LOMO_AVX512_TARGET
#endif

namespace lomo {
namespace cpu {

enum class Isa { Base, Avx2, Avx512 };

inline Isa cpu_isa() {
#if LOMO_X86_CLONES
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    Isa best = avx512 ? Isa::Avx512 : (avx2 ? Isa::Avx2 : Isa::Base);
    // LOMO_KERNELS_CPU_ISA=base|avx2 caps the choice (tests check every clone rounds the same).
    const char* cap = std::getenv("LOMO_KERNELS_CPU_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return Isa::Base;
    if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::Avx512) return Isa::Avx2;
    return best;
  }();
  return isa;
#else
  return Isa::Base;
#endif
}

// Elements per work unit of the element-wise passes: 32768 (64 KiB of bf16) amortises the
// scheduling cost and still splits a 4096 x 4096 tensor into 512 units.
constexpr int64_t kChunk = 32768;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fn(u) for every unit u in [0, n_units), spread over torch's intra-op threads (each thread takes
// a contiguous range). `backward` walks each thread's range from its end: a pass that follows
// a forward pass then starts on the data that the last one left in the cache.
template <class Fn>
void parallel_units(int64_t n_units, const Fn& fn, bool backward = false) {
  if (n_units <= 0) return;
  if (n_units == 1) {
    fn(int64_t{0});
    return;
  }
  at::parallel_for(0, n_units, 1, [&](int64_t begin, int64_t end) {
    if (backward) {
      for (int64_t u = end - 1; u >= begin; --u) fn(u);
    } else {
      for (int64_t u = begin; u < end; ++u) fn(u);
    }
  });
}

// The compile-time choices of a loop: storage format, stochastic rounding, a non-power-of-two
// loss scale (a division instead of an exact multiply), the gradient-norm side output, and
// AdaLomo's update clipping being inactive (denom == 1: no division per element).
template <Fmt F_, bool SR_ = false, bool DIV_ = false, bool GSQ_ = false, bool DEN1_ = false>
struct Flags {
  static constexpr Fmt F = F_;
  static constexpr bool SR = SR_, DIV = DIV_, GSQ = GSQ_, DEN1 = DEN1_;
};

// Defines the clones NAME_base / NAME_avx2 / NAME_avx512 of the always_inline template NAME
// (signature `void NAME<K, W>(const Ctx&, int64_t unit)`, K a Flags type, W the fp32 lanes of
// the clone's vectors: 4, 8, 16; see cpu_vec.h), and NAME_pick<K, Ctx>() returning the one for
// this CPU.
#define LOMO_CPU_CLONE(NAME, SUFFIX, TARGET, W)                                              \
  template <class K, class Ctx>                                                              \
  TARGET void NAME##SUFFIX(const Ctx& c, int64_t unit) {                                     \
    NAME<K, W>(c, unit);                                                                     \
  }
#define LOMO_CPU_CLONES(NAME)                                                                \
  LOMO_CPU_CLONE(NAME, _base, , 4)                                                           \
  LOMO_CPU_CLONE(NAME, _avx2, LOMO_AVX2_TARGET, 8)                                           \
  LOMO_CPU_CLONE(NAME, _avx512, LOMO_AVX512_TARGET, 16)                                      \
  template <class K, class Ctx>                                                              \
  auto NAME##_pick() -> void (*)(const Ctx&, int64_t) {                                      \
    switch (::lomo::cpu::cpu_isa()) {                                                        \
      case ::lomo::cpu::Isa::Avx512:                                                         \
        return &NAME##_avx512<K, Ctx>;                                                       \
      case ::lomo::cpu::Isa::Avx2:                                                           \
        return &NAME##_avx2<K, Ctx>;                                                         \
      default:                                                                               \
        return &NAME##_base<K, Ctx>;                                                         \
    }                                                                                        \
  }

// Which runtime choices a loop is compiled for (the others are false): a loop instantiates only
// the variants it uses.
enum Use : unsigned { kUseSR = 1, kUseDIV = 2, kUseGSQ = 4, kUseDEN1 = 8 };

namespace detail {
template <unsigned U, unsigned Bit, class Next>
void with_flag(bool on, const Next& next) {
  if constexpr ((U & Bit) != 0) {
    if (on) {
      next(std::true_type{});
      return;
    }
  }
  next(std::false_type{});
}
}  // namespace detail

// Calls body(Flags<...>{}) for the runtime choices, restricted to the flags in U (fp32 stores are
// exact: stochastic rounding is off for them).
template <unsigned U, class Body>
void dispatch_flags(at::ScalarType dtype, bool sr, bool div, bool gsq, bool den1,
                    const Body& body) {
  auto with_fmt = [&](auto f_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    constexpr unsigned U2 = F == Fmt::F32 ? (U & ~unsigned{kUseSR}) : U;
    detail::with_flag<U2, kUseSR>(sr, [&](auto s) {
      detail::with_flag<U2, kUseDIV>(div, [&](auto d) {
        detail::with_flag<U2, kUseGSQ>(gsq, [&](auto q) {
          detail::with_flag<U2, kUseDEN1>(den1, [&](auto e) {
            body(Flags<F, decltype(s)::value, decltype(d)::value, decltype(q)::value,
                       decltype(e)::value>{});
          });
        });
      });
    });
  };
  switch (dtype) {
    case at::kFloat:
      with_fmt(std::integral_constant<Fmt, Fmt::F32>{});
      break;
    case at::kHalf:
      with_fmt(std::integral_constant<Fmt, Fmt::F16>{});
      break;
    case at::kBFloat16:
      with_fmt(std::integral_constant<Fmt, Fmt::BF16>{});
      break;
    default:
      TORCH_CHECK(false, "lomo_kernels: unsupported dtype ", dtype);
  }
}

// fn(c, u) for every unit u (fn: a clone from NAME_pick).
template <class Ctx>
void run_units(void (*fn)(const Ctx&, int64_t), const Ctx& c, int64_t n_units,
               bool backward = false) {
  parallel_units(n_units, [&](int64_t u) { fn(c, u); }, backward);
}

}  // namespace cpu
}  // namespace lomo
