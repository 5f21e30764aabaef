// Gradient accumulation on the CPU (reference.grad_accumulate_): buf = round(buf + g / loss_scale)
// (or round(g / loss_scale) for the window's first gradient, buf not read), one pass, fp32 math,
// in place; buf float32 or the gradient's dtype (stochastic rounding with the updates' hash).
// buf_sq (when asked) is SET to sum(buf_new**2), summed from the stored values while the block is
// still in L1, per unit in fixed lanes (cpu_vec.h), the units in index order.
#include <atomic>

#include "checks.h"
#include "cpu/cpu_common.h"
#include "cpu/cpu_vec.h"
#include "cpu/cpu_workspace.h"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace cpu {
namespace {

struct AccTensor;
using AccFn = void (*)(const AccTensor&, int64_t);

struct AccTensor {
  void* buf;
  const void* g;
  int64_t n;
  float scale;  // divisor when DIV, else an exact multiplier (update_args.h, make_preprocess)
  uint32_t key;
  double* sq;               // [units] partial sums of buf_new**2, when asked for
  std::atomic<int>* found;  // set to 1 when a new buffer value is non-finite
  AccFn fn;
};

// The compile-time choices: buffer and gradient formats, stochastic rounding (16-bit buffers),
// a non-power-of-two loss scale, the window's first gradient, the buf_sq output.
template <Fmt BF_, Fmt GF_, bool SR_, bool DIV_, bool FIRST_, bool SQ_>
struct AccFlags {
  static constexpr Fmt BF = BF_, GF = GF_;
  static constexpr bool SR = SR_, DIV = DIV_, FIRST = FIRST_, SQ = SQ_;
};

template <class K, int W>
LOMO_CPU_INLINE void accumulate_chunk(const AccTensor& c, int64_t unit) {
  using SB = storage_t<K::BF>;
  using SG = storage_t<K::GF>;
  const float scale = c.scale;
  const int64_t begin = unit * kChunk;
  const int64_t len = std::min(c.n - begin, kChunk);
  const uint32_t hk = hash_high_key(c.key, static_cast<uint64_t>(begin));  // constant per chunk
  const uint32_t lo = static_cast<uint32_t>(begin);
  SB* __restrict buf = static_cast<SB*>(c.buf) + begin;
  const SG* __restrict g = static_cast<const SG*>(c.g) + begin;
  uint32_t bad = 0;
  DAcc<W> sq;
  for (int64_t b = 0; b < len; b += kBlock) {
    const int64_t bl = std::min(kBlock, len - b);
    const auto new_value = [&](int64_t j) __attribute__((always_inline)) {
      const float graw = to_f32<K::GF>(g[j]);
      const float gv = K::DIV ? graw / scale : graw * scale;
      return K::FIRST ? gv : to_f32<K::BF>(buf[j]) + gv;
    };
    if constexpr (K::SR) {  // the sums in an fp32 block, rounded in vectors
      alignas(64) float nv[kBlock];
      for (int64_t j = 0; j < bl; ++j) nv[j] = new_value(b + j);  // auto-vectorised
      store_sr_run<K::BF, W>(buf + b, nv, bl, lo + static_cast<uint32_t>(b), hk);
      bad |= any_non_finite<K::BF>(buf + b, buf + b, bl) ? 1u : 0u;
    } else {
      for (int64_t j = b; j < b + bl; ++j) {  // auto-vectorised
        const SB out = from_f32<K::BF, false>(new_value(j), 0u);
        buf[j] = out;
        bad |= is_finite_f32(to_f32<K::BF>(out)) ? 0u : 1u;
      }
    }
    if constexpr (K::SQ) {  // the block's new values are still in L1
      Lanes<W> acc;
      const auto add = [&](const SB* x) __attribute__((always_inline)) {
        for (int q = 0; q < Lanes<W>::P; ++q) {
          const auto u = vload<K::BF, W>(x + q * W);
          acc.v[q] += u * u;
        }
      };
      int64_t j = b;
      for (; j + kLanes <= b + bl; j += kLanes) add(buf + j);
      if (j < b + bl) add(Padded<K::BF>(buf + j, b + bl - j).v);  // zeros add nothing
      sq.add(acc);
    }
  }
  if constexpr (K::SQ) c.sq[unit] = sq.sum();
  if (bad) c.found->store(1, std::memory_order_relaxed);
}
LOMO_CPU_CLONES(accumulate_chunk)

template <Fmt BF, Fmt GF>
AccFn pick_formats(bool sr, bool div, bool first, bool sq) {
  AccFn fn = nullptr;
  auto with = [&](auto s, auto d, auto f, auto q) {
    fn = accumulate_chunk_pick<AccFlags<BF, GF, decltype(s)::value, decltype(d)::value,
                                        decltype(f)::value, decltype(q)::value>,
                               AccTensor>();
  };
  auto on_sq = [&](auto s, auto d, auto f) {
    if (sq) with(s, d, f, std::true_type{});
    else with(s, d, f, std::false_type{});
  };
  auto on_first = [&](auto s, auto d) {
    if (first) on_sq(s, d, std::true_type{});
    else on_sq(s, d, std::false_type{});
  };
  auto on_div = [&](auto s) {
    if (div) on_first(s, std::true_type{});
    else on_first(s, std::false_type{});
  };
  if constexpr (BF != Fmt::F32) {  // float32 buffers are stored exactly
    if (sr) {
      on_div(std::true_type{});
      return fn;
    }
  }
  on_div(std::false_type{});
  return fn;
}

AccFn pick_accumulate(at::ScalarType buf, at::ScalarType grad, bool sr, bool div, bool first,
                      bool sq) {
  if (buf == at::kFloat) {
    if (grad == at::kFloat) return pick_formats<Fmt::F32, Fmt::F32>(sr, div, first, sq);
    if (grad == at::kHalf) return pick_formats<Fmt::F32, Fmt::F16>(sr, div, first, sq);
    return pick_formats<Fmt::F32, Fmt::BF16>(sr, div, first, sq);
  }
  if (buf == at::kHalf) return pick_formats<Fmt::F16, Fmt::F16>(sr, div, first, sq);
  return pick_formats<Fmt::BF16, Fmt::BF16>(sr, div, first, sq);
}

int64_t accumulate_scratch_numel(int64_t units) {
  Carver cv;
  cv.take<double>(units);
  return scratch_numel(kHeader, cv.bytes());
}

}  // namespace

int64_t grad_accumulate_workspace_numel_cpu(const std::vector<std::vector<int64_t>>& shapes) {
  int64_t most = 0;
  for (const auto& s : shapes) most = std::max(most, ceil_div(numel_of(s), kChunk));
  return accumulate_scratch_numel(most);
}

}  // namespace cpu

void grad_accumulate_cpu(GRAD_ACCUMULATE_PARAMS) {
  using namespace cpu;
  constexpr const char* op = "grad_accumulate_";
  check_accumulate(op, buf, grad, found_inf, buf_sq);
  CHECK_CPU(op, buf);
  const bool sr = parse_rounding(op, rounding);
  const int64_t n = buf.numel();
  float* sq_out = buf_sq.has_value() ? buf_sq->data_ptr<float>() : nullptr;
  if (n == 0) {
    if (sq_out) sq_out[0] = 0.0f;
    return;
  }
  const Preprocess pre = make_preprocess(loss_scale, 0.0);
  const int64_t units = ceil_div(n, kChunk);
  std::optional<Scratch> scratch;
  double* parts = nullptr;
  if (sq_out) {
    scratch.emplace(op, workspace, accumulate_scratch_numel(units));
    Carver cv = scratch->carver(kHeader);
    parts = cv.take<double>(units);
  }
  std::atomic<int> found{0};
  AccTensor t{};
  t.buf = buf.data_ptr();
  t.g = grad.data_ptr();
  t.n = n;
  t.scale = pre.scale;
  t.key = rounding_key(seed, step);
  t.sq = parts;
  t.found = &found;
  t.fn = pick_accumulate(buf.scalar_type(), grad.scalar_type(), sr, pre.divide, first,
                         sq_out != nullptr);
  run_units(t.fn, t, units);
  if (sq_out) {
    double s = 0.0;
    for (int64_t u = 0; u < units; ++u) s += parts[u];
    sq_out[0] = static_cast<float>(s);
  }
  if (found.load() && found_inf.has_value()) found_inf->data_ptr<float>()[0] = 1.0f;
}

}  // namespace lomo
