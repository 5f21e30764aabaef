// Gradient accumulation on CUDA (reference.grad_accumulate_): buf = round(buf + g / loss_scale)
// (the window's first gradient: round(g / loss_scale), buf not read) in one pass, fp32 math; buf
// float32 or the gradient's dtype (stochastic rounding with the updates' hash). A thread step
// moves one 16-byte pack of the gradient and the same elements of the buffer (one pack, or two
// for a float32 buffer of a 16-bit gradient). Alignment peeling as lomo_update.cu: the first
// `head` elements, up to where both tensors sit on a 16-byte boundary, are done one by one by
// tile 0; when no such point exists every element is scalar (same element-to-thread mapping).
// buf_sq (only when asked) is SET: per-tile partial sums of the stored values squared, the last
// tile (integer ticket, reduce.cuh) sums them in tile order and writes the total.
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "checks.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

constexpr int kAccUnroll = 2;  // gradient packs per thread per tile, loads issued first

struct AccArgs {
  void* buf;
  const void* g;
  int64_t n;
  float scale;
  uint32_t key;
  int32_t tiles;
  int32_t head;  // elements before the point where both tensors are 16-byte aligned (peeled)
  bool vec;      // the body moves in 16-byte packs
  bool first;    // the window's first gradient: buf is written, not read
  float* found_inf;
  float* buf_sq;  // null: no buf_sq, no partials, no ticket
  float* parts;   // [tiles]
  int* ticket;
};

// One element: the new buffer value (its square added to sq, its finiteness and-ed into ok).
template <Fmt BF, bool SR, bool DIV>
__device__ __forceinline__ storage_t<BF> acc_elem(storage_t<BF> b, float graw, float scale,
                                                  bool first, uint32_t bits, float& sq, bool& ok) {
  const float gv = DIV ? graw / scale : __fmul_rn(graw, scale);
  const float nv = first ? gv : __fadd_rn(to_f32<BF>(b), gv);
  const storage_t<BF> out = from_f32<BF, SR>(nv, bits);
  const float s = to_f32<BF>(out);
  sq = __fadd_rn(sq, __fmul_rn(s, s));
  ok &= is_finite_f32(s);
  return out;
}

template <typename SB, typename SG>
__host__ __device__ constexpr int64_t acc_tile() {  // host (grid sizes) and device (tile offsets)
  return int64_t{kThreads} * Pack<SG>::N * kAccUnroll;
}

template <Fmt BF, Fmt GF, bool SR, bool DIV, bool SQ>
__global__ void __launch_bounds__(kThreads, 4) grad_accumulate_kernel(const AccArgs a) {
  LOMO_BOUNDS(kThreads);
  using SB = storage_t<BF>;
  using SG = storage_t<GF>;
  constexpr int N = Pack<SG>::N;  // elements per thread step (the gradient is the narrower)
  LOMO_SHARED(float, red, [32]);
  LOMO_SHARED(double, dred, [32]);
  LOMO_SHARED(int, flag);
  const int tile = static_cast<int>(blockIdx.x);
  SB* buf = static_cast<SB*>(a.buf);
  const SG* g = static_cast<const SG*>(a.g);
  const int64_t n = a.n;
  const unsigned tid = fresh_thread_index();
  float sq = 0.0f;
  bool ok = true;
  if (tile == 0 && tid < static_cast<unsigned>(a.head)) {  // the peeled head
    buf[tid] = acc_elem<BF, SR, DIV>(a.first ? SB(0) : buf[tid], to_f32<GF>(g[tid]), a.scale,
                                     a.first, SR ? random_bits(a.key, tid) : 0u, sq, ok);
  }
  const int64_t t0 = a.head + tile * acc_tile<SB, SG>();
  Packs<SG, N> gv[kAccUnroll];
  Packs<SB, N> bv[kAccUnroll];
#pragma unroll
  for (int u = 0; u < kAccUnroll; ++u) {  // every load first
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + tid) * N;
    if (a.vec && e + N <= n) {
      gv[u] = load_packs<SG, N>(g + e);
      if (!a.first) bv[u] = load_packs<SB, N>(buf + e);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        gv[u].v[k] = e + k < n ? g[e + k] : SG(0);
        bv[u].v[k] = e + k < n && !a.first ? buf[e + k] : SB(0);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kAccUnroll; ++u) {
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + tid) * N;
    if (e >= n) continue;
    const uint32_t hk = SR ? hash_high_key(a.key, e) : 0u;
    const bool crosses = SR && static_cast<uint32_t>(e) > 0xFFFFFFFFu - (N - 1);
    Packs<SB, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // elements past the end compute on zeros (finite, adding 0 to sq) and are not stored
      out.v[k] = acc_elem<BF, SR, DIV>(bv[u].v[k], to_f32<GF>(gv[u].v[k]), a.scale, a.first,
                                       SR ? pack_bits(a.key, hk, e, k, crosses) : 0u, sq, ok);
    }
    if (a.vec && e + N <= n) {
      store_packs<SB, N>(buf + e, out);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k)
        if (e + k < n) buf[e + k] = out.v[k];
    }
  }
  if (!ok && a.found_inf) *a.found_inf = 1.0f;  // plain store: every writer writes 1
  if (!SQ) return;
  sq = block_sum<kThreads>(sq, red);
  if (tid == 0) a.parts[tile] = sq;
  if (!last_arrival(a.ticket, a.tiles, &flag)) return;
  const double sum = sum_in_order(a.parts, a.tiles, dred);
  if (tid == 0) *a.buf_sq = static_cast<float>(sum);
}

// Workspace (only with buf_sq): the partials at the front, the ticket at the back (Carver).
int64_t acc_carve(int64_t tiles, Carver c, float** parts, int** ticket) {
  float* p = c.data(tiles);
  int* t = c.tickets(1);
  if (parts) *parts = p;
  if (ticket) *ticket = t;
  return c.need();
}

// Tiles of n elements with `head` peeled, for a gradient of `gsize` bytes per element.
int64_t acc_tiles(int64_t n, int64_t gsize, int64_t head) {
  const int64_t tile = int64_t{kThreads} * (16 / gsize) * kAccUnroll;
  return std::max<int64_t>(1, ceil_div(n - head, tile));
}

template <Fmt BF, Fmt GF>
void launch_formats(const AccArgs& a, bool sr, bool div, Stream stream) {
  auto go = [&](auto sr_tag, auto div_tag) {
    constexpr bool SR = decltype(sr_tag)::value, DIV = decltype(div_tag)::value;
    if (a.buf_sq) LOMO_LAUNCH(grad_accumulate_kernel<BF, GF, SR, DIV, true>, a.tiles, kThreads, 0, stream, a);
    else LOMO_LAUNCH(grad_accumulate_kernel<BF, GF, SR, DIV, false>, a.tiles, kThreads, 0, stream, a);
  };
  auto with_div = [&](auto sr_tag) {
    if (div) go(sr_tag, std::true_type{});
    else go(sr_tag, std::false_type{});
  };
  if constexpr (BF != Fmt::F32) {  // float32 buffers are stored exactly
    if (sr) return with_div(std::true_type{});
  }
  with_div(std::false_type{});
}

}  // namespace

int64_t grad_accumulate_workspace_numel(const Shapes& shapes) {
  int64_t need = 0;
  for (const auto& s : shapes) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    // float32 gradient tiles (the most), one more for a peeled head
    need = std::max(need, acc_carve(acc_tiles(n, 4, 0) + 1, Carver(), nullptr, nullptr));
  }
  return need;
}

void grad_accumulate(GRAD_ACCUMULATE_PARAMS) {
  constexpr const char* op = "grad_accumulate_";
  check_accumulate(op, buf, grad, found_inf, buf_sq);
  LOMO_CHECK_DEVICE(op, buf);
  const bool sr = parse_rounding(op, rounding);
  const DeviceGuard guard(buf.device());
  const Stream stream = current_stream();
  const int64_t n = buf.numel();
  if (n == 0) {
    if (buf_sq.has_value()) memset_async(buf_sq->data_ptr<float>(), 0, sizeof(float), stream);
    return;
  }
  const Preprocess pre = make_preprocess(loss_scale, 0.0);
  AccArgs a{};
  a.buf = buf.data_ptr();
  a.g = grad.data_ptr();
  a.n = n;
  a.scale = pre.scale;
  a.key = rounding_key(seed, step);
  a.first = first;
  const auto ba = reinterpret_cast<uintptr_t>(a.buf), ga = reinterpret_cast<uintptr_t>(a.g);
  const int64_t bsize = buf.element_size(), gsize = grad.element_size();
  // the first element where the gradient is 16-byte aligned; the buffer must be there too
  const int64_t head = ga % gsize == 0 ? ((16 - ga % 16) % 16) / gsize : 0;
  a.vec = ga % gsize == 0 && ba % bsize == 0 && (ba + head * bsize) % 16 == 0;
  a.head = a.vec ? static_cast<int32_t>(std::min<int64_t>(head, n)) : 0;
  a.tiles = static_cast<int32_t>(acc_tiles(n, gsize, a.head));
  a.found_inf = float_ptr(found_inf);
  a.buf_sq = float_ptr(buf_sq);
  at::Tensor scratch;
  if (a.buf_sq) {
    const int64_t need = acc_carve(a.tiles, Carver(), nullptr, nullptr);
    if (workspace.has_value()) {
      const at::Tensor& w = *workspace;
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.is_contiguous() &&
                      w.device() == buf.device(),
                  op, ": workspace must be a contiguous 1-d float32 tensor on ", buf.device());
      TORCH_CHECK(w.numel() >= need, op, ": workspace has ", w.numel(), " elements, needs ",
                  need, " (ops.workspace_numel)");
      scratch = w;
    } else {
      scratch = at::zeros({need}, buf.options().dtype(at::kFloat));
    }
    LOMO_CROSS_BLOCK_MEMORY(scratch);  // the partials other blocks read (the emulation's model)
    acc_carve(a.tiles, Carver(scratch.data_ptr<float>(), scratch.numel()), &a.parts, &a.ticket);
  }
  const at::ScalarType bt = buf.scalar_type(), gt = grad.scalar_type();
  if (bt == at::kFloat && gt == at::kFloat) launch_formats<Fmt::F32, Fmt::F32>(a, sr, pre.divide, stream);
  else if (bt == at::kFloat && gt == at::kHalf) launch_formats<Fmt::F32, Fmt::F16>(a, sr, pre.divide, stream);
  else if (bt == at::kFloat) launch_formats<Fmt::F32, Fmt::BF16>(a, sr, pre.divide, stream);
  else if (bt == at::kHalf) launch_formats<Fmt::F16, Fmt::F16>(a, sr, pre.divide, stream);
  else launch_formats<Fmt::BF16, Fmt::BF16>(a, sr, pre.divide, stream);
}

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
