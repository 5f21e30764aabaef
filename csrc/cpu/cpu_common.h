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
#include <atomic>
#include <thread>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
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

// fn(u) for every unit u in [0, n_units), on torch's intra-op threads. The threads take batches
// of units from a shared counter instead of fixed halves: on a machine shared with other work a
// thread that loses its core holds up the others by one batch at most, not by its whole share.
// (Which thread runs a unit never changes a result: a unit writes only its own outputs.)
template <class Fn>
void parallel_units(int64_t n_units, const Fn& fn) {
  if (n_units <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_units);
  if (threads <= 1) {
    for (int64_t u = 0; u < n_units; ++u) fn(u);
    return;
  }
  const int64_t batch = std::max<int64_t>(1, n_units / (threads * 16));  // ~16 grabs a thread
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t u0 = next.fetch_add(batch, std::memory_order_relaxed);
      if (u0 >= n_units) break;
      for (int64_t u = u0; u < std::min(n_units, u0 + batch); ++u) fn(u);
    }
  });
}

// Passes of one call in ONE parallel region: phase k runs fn(k, u) for its n_units(k) units
// (taken in batches from a shared counter, as parallel_units), then the last thread to finish
// them runs between(k) (serial work: sums of the partials, the next pass's scalars) while the
// others wait, then phase k + 1 begins; n_units(k) is read only after between(k - 1), so a
// phase can be skipped (0 units). One region instead of one per pass: the threads are woken
// once per call, and a waiting thread yields its core instead of spinning (on a machine shared
// with other work, spinning threads take the time their peers need).
//
// Each invocation of the parallel_for body stands for (end - begin) of the `threads` slots, so
// the arrivals add up to `threads` however torch splits the range (one invocation running the
// whole range, inside another parallel region, passes every barrier at once).
constexpr int kMaxPhases = 4;

template <class Units, class Fn, class Between>
void parallel_phases(int n_phases, const Units& n_units, const Fn& fn, const Between& between) {
  TORCH_CHECK(n_phases <= kMaxPhases, "parallel_phases: too many phases");
  struct alignas(64) Sync {
    std::atomic<int64_t> next{0}, arrived{0};
    std::atomic<int> open{0};
  };
  Sync sync[kMaxPhases];
  std::exception_ptr error;  // thrown by between(): the later phases are skipped, then rethrown
  const int64_t threads = at::get_num_threads();
  const auto run = [&](int64_t begin, int64_t end) {
    const int64_t weight = end - begin;
    for (int k = 0; k < n_phases; ++k) {
      if (k > 0) {
        for (int spin = 0; !sync[k - 1].open.load(std::memory_order_acquire); ++spin) {
          if (spin < 256) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
          } else {
            std::this_thread::yield();
          }
        }
      }
      const int64_t n = error ? 0 : n_units(k);
      const int64_t batch = std::max<int64_t>(1, n / (threads * 16));
      for (;;) {
        const int64_t u0 = sync[k].next.fetch_add(batch, std::memory_order_relaxed);
        if (u0 >= n) break;
        for (int64_t u = u0; u < std::min(n, u0 + batch); ++u) fn(k, u);
      }
      if (sync[k].arrived.fetch_add(weight, std::memory_order_acq_rel) + weight == threads) {
        try {
          if (!error) between(k);
        } catch (...) {
          error = std::current_exception();
        }
        sync[k].open.store(1, std::memory_order_release);
      }
    }
  };
#if AT_PARALLEL_OPENMP
  if (threads <= 1)
    run(0, 1);
  else
    at::parallel_for(0, threads, 1, run);
  if (error) std::rethrow_exception(error);
#else  // a task pool need not run the tasks at once: one region per phase, no barrier
  (void)run;
  for (int k = 0; k < n_phases; ++k) {
    parallel_units(n_units(k), [&](int64_t u) { fn(k, u); });
    between(k);
  }
#endif
}

// The compile-time choices of a loop: storage format, stochastic rounding, a non-power-of-two
// loss scale (a division instead of an exact multiply), the gradient-norm side output, and
// AdaLomo's update clipping being inactive (denom == 1: no division per element).
// CLIP: value clipping or clip_coef is on (false: the preprocessing is the loss scale only).
// GF: the gradient's storage format, F's own or F32 (a float32 accumulation buffer of a 16-bit
// parameter).
template <Fmt F_, bool SR_ = false, bool DIV_ = false, bool GSQ_ = false, bool DEN1_ = false,
          bool CLIP_ = true, Fmt GF_ = F_>
struct Flags {
  static constexpr Fmt F = F_, GF = GF_;
  static constexpr bool SR = SR_, DIV = DIV_, GSQ = GSQ_, DEN1 = DEN1_, CLIP = CLIP_;
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
// the variants it uses. kUseG32: a float32 gradient of a 16-bit parameter (GF = F32).
enum Use : unsigned {
  kUseSR = 1, kUseDIV = 2, kUseGSQ = 4, kUseDEN1 = 8, kUseCLIP = 16, kUseG32 = 32
};

namespace detail {
// next(the flag's value) where the loop dispatches on it, else next(Default)
template <unsigned U, unsigned Bit, bool Default, class Next>
void with_flag(bool on, const Next& next) {
  if constexpr ((U & Bit) != 0) {
    if (on) {
      next(std::true_type{});
      return;
    }
    next(std::false_type{});
  } else {
    next(std::integral_constant<bool, Default>{});
  }
}
}  // namespace detail

// Calls body(Flags<...>{}) for the runtime choices, restricted to the flags in U (fp32 stores are
// exact: stochastic rounding is off for them); a loop that does not dispatch on CLIP always
// preprocesses in full. grad_dtype: the gradient's dtype when it may differ from dtype (kUseG32:
// float32 for a 16-bit dtype; anything else means dtype's own).
template <unsigned U, class Body>
void dispatch_flags(at::ScalarType dtype, bool sr, bool div, bool gsq, bool den1, bool clip,
                    const Body& body, at::ScalarType grad_dtype = at::ScalarType::Undefined) {
  auto with_fmt = [&](auto f_tag, auto g_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    constexpr Fmt GF = decltype(g_tag)::value;
    constexpr unsigned U2 = F == Fmt::F32 ? (U & ~unsigned{kUseSR}) : U;
    detail::with_flag<U2, kUseSR, false>(sr, [&](auto s) {
      detail::with_flag<U2, kUseDIV, false>(div, [&](auto d) {
        detail::with_flag<U2, kUseGSQ, false>(gsq, [&](auto q) {
          detail::with_flag<U2, kUseDEN1, false>(den1, [&](auto e) {
            detail::with_flag<U2, kUseCLIP, true>(clip, [&](auto c) {
              body(Flags<F, decltype(s)::value, decltype(d)::value, decltype(q)::value,
                         decltype(e)::value, decltype(c)::value, GF>{});
            });
          });
        });
      });
    });
  };
  auto with_grad = [&](auto f_tag) {
    if constexpr ((U & kUseG32) != 0 && decltype(f_tag)::value != Fmt::F32) {
      if (grad_dtype == at::kFloat) return with_fmt(f_tag, std::integral_constant<Fmt, Fmt::F32>{});
    }
    with_fmt(f_tag, f_tag);
  };
  switch (dtype) {
    case at::kFloat:
      with_grad(std::integral_constant<Fmt, Fmt::F32>{});
      break;
    case at::kHalf:
      with_grad(std::integral_constant<Fmt, Fmt::F16>{});
      break;
    case at::kBFloat16:
      with_grad(std::integral_constant<Fmt, Fmt::BF16>{});
      break;
    default:
      TORCH_CHECK(false, "lomo_kernels: unsupported dtype ", dtype);
  }
}

// fn(c, u) for every unit u (fn: a clone from NAME_pick).
template <class Ctx>
void run_units(void (*fn)(const Ctx&, int64_t), const Ctx& c, int64_t n_units) {
  parallel_units(n_units, [&](int64_t u) { fn(c, u); });
}

}  // namespace cpu
}  // namespace lomo
