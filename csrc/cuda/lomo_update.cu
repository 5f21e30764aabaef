// LOMO on CUDA: p = p * (1 - lr * wd) - lr * g in one pass (6 bytes per bf16 element), fp32 math,
// no host synchronisation. One kernel serves the single op (one record) and the multi-tensor op
// (up to kMaxMulti records of one dtype per launch): block b is tile b - first of its record.
// The gradient has the parameter's dtype, or float32 for a 16-bit parameter (GF = F32: an
// accumulation buffer, read in Packs of the parameter's N elements).
//
// Alignment peeling: when p and g are in the same 16-byte phase (vec.cuh's same_phase), the first
// `head` elements (up to p's 16-byte boundary) are done one by one by tile 0 and the body moves in
// 16-byte packs from there; otherwise every element is scalar (same element-to-thread mapping).
// found_inf: a thread that meets a non-finite gradient stores 1 (no reduction needed).
// grad_sq (only when asked): per-tile partial sums, the last tile of a tensor sums them in tile
// order (integer ticket, reduce.cuh), the last tensor of the call adds the tensors' sums to grad_sq
// in list order; so a multi-tensor call is bitwise the single ops called in that order.
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

constexpr int kUnroll = 2;      // packs per thread per tile, loads issued first (64 registers)
constexpr int kLomoMulti = 32;  // records per launch (kernel parameter space)

template <typename S>
__host__ __device__ constexpr int64_t lomo_tile() {  // host (grid sizes) and device (tile offsets)
  return int64_t{kThreads} * Pack<S>::N * kUnroll;
}

struct LomoTensor {
  void* p;
  const void* g;
  int64_t n;
  float decay, neg_lr, clip;
  uint32_t key;
  int32_t first, tiles;  // first block of the launch, tiles of this tensor
  int32_t index, part;   // position in the call's list; first partial slot
  int32_t head;          // elements before the first 16-byte boundary (peeled)
  bool vec;              // the body moves in 16-byte packs
};

struct LomoCall {
  LomoTensor t[kLomoMulti];
  int count;
  float scale;
  const float* clip_coef;
  float* found_inf;
  float* grad_sq;     // null: no grad_sq, no partials, no tickets
  float* parts;       // [tiles of the call]
  float* gsq_slots;   // [tensors of the call]
  int* tickets;       // [tensors of the call]
  int* call_ticket;
  int call_tensors;
};

// One element; false when the raw gradient is NaN/Inf (p is then left as it is).
template <Fmt F, bool SR, bool DIV>
__device__ __forceinline__ bool lomo_elem(storage_t<F>& p, float graw, const LomoTensor& t,
                                          float scale, float coef, uint32_t bits, float& gsq) {
  const float gu = DIV ? graw / scale : graw * scale;
  gsq += gu * gu;
  if (!is_finite_f32(graw)) return false;
  float gv = gu < -t.clip ? -t.clip : gu;
  gv = gv > t.clip ? t.clip : gv;
  gv = gv * coef;
  // torch.add(p * decay, g, alpha=-lr): one fma, as the reference
  const float nv = __fmaf_rn(gv, t.neg_lr, __fmul_rn(to_f32<F>(p), t.decay));
  p = from_f32<F, SR>(nv, bits);
  return true;
}

template <Fmt F, Fmt GF, bool SR, bool DIV, bool GSQ>
__global__ void __launch_bounds__(kThreads, 4) lomo_update_kernel(const __grid_constant__ LomoCall c) {
  LOMO_BOUNDS(kThreads);
  using S = storage_t<F>;
  using SG = storage_t<GF>;
  constexpr int N = Pack<S>::N;
  LOMO_SHARED(float, red, [32]);
  LOMO_SHARED(double, dred, [32]);
  LOMO_SHARED(int, flag);
  int i = 0;
  while (i + 1 < c.count && static_cast<int>(blockIdx.x) >= c.t[i + 1].first) ++i;
  const LomoTensor& t = c.t[i];
  const int tile = static_cast<int>(blockIdx.x) - t.first;
  S* p = static_cast<S*>(t.p);
  const SG* g = static_cast<const SG*>(t.g);
  const int64_t n = t.n;
  const float coef = c.clip_coef ? *c.clip_coef : 1.0f;
  const unsigned tid = fresh_thread_index();
  float gsq = 0.0f;
  bool ok = true;
  if (tile == 0 && tid < static_cast<unsigned>(t.head)) {  // the peeled head
    S pv = p[tid];
    if (lomo_elem<F, SR, DIV>(pv, to_f32<GF>(g[tid]), t, c.scale, coef,
                              SR ? random_bits(t.key, tid) : 0u, gsq))
      p[tid] = pv;
    else
      ok = false;
  }
  const int64_t t0 = t.head + tile * lomo_tile<S>();
  GradPack<SG, S> gv[kUnroll];
  Pack<S> pv[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {  // every load first
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + tid) * N;
    if (t.vec && e + N <= n) {
      load_into(gv[u], g + e);
      pv[u] = load_pack(p + e);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        gv[u].v[k] = e + k < n ? g[e + k] : SG(0);
        pv[u].v[k] = e + k < n ? p[e + k] : S(0);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t e = t0 + (static_cast<int64_t>(u) * kThreads + tid) * N;
    if (e >= n) continue;
    const bool full = t.vec && e + N <= n;
    const uint32_t hk = SR ? hash_high_key(t.key, e) : 0u;
    const bool crosses = SR && static_cast<uint32_t>(e) > 0xFFFFFFFFu - (N - 1);
    if (full) {
#pragma unroll
      for (int k = 0; k < N; ++k)
        ok &= lomo_elem<F, SR, DIV>(pv[u].v[k], to_f32<GF>(gv[u].v[k]), t, c.scale, coef,
                                    SR ? pack_bits(t.key, hk, e, k, crosses) : 0u, gsq);
      store_pack(p + e, pv[u]);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if (e + k < n) {
          S v = pv[u].v[k];
          if (lomo_elem<F, SR, DIV>(v, to_f32<GF>(gv[u].v[k]), t, c.scale, coef,
                                    SR ? pack_bits(t.key, hk, e, k, crosses) : 0u, gsq))
            p[e + k] = v;
          else
            ok = false;
        }
      }
    }
  }
  if (!ok && c.found_inf) *c.found_inf = 1.0f;  // plain store: every writer writes 1
  if (!GSQ) return;
  gsq = block_sum<kThreads>(gsq, red);
  if (tid == 0) c.parts[t.part + tile] = gsq;
  if (!last_arrival(c.tickets + t.index, t.tiles, &flag)) return;
  const double sum = sum_in_order(c.parts + t.part, t.tiles, dred);
  if (tid == 0) c.gsq_slots[t.index] = static_cast<float>(sum);
  if (last_arrival(c.call_ticket, c.call_tensors, &flag) && tid == 0) {
    float acc = *c.grad_sq;
    for (int j = 0; j < c.call_tensors; ++j) acc += __ldcg(c.gsq_slots + j);
    *c.grad_sq = acc;
  }
}

// Workspace (only with grad_sq): slots and partials; tickets at the back (see Carver).
struct LomoLayout {
  int* call_ticket;
  float* gsq_slots;
  int* tickets;
  float* parts;
};

int64_t lomo_carve(int64_t tensors, int64_t tiles, Carver c, LomoLayout* L) {
  LomoLayout l;
  l.gsq_slots = c.data(tensors);
  l.parts = c.data(tiles);
  l.call_ticket = c.tickets(1);
  l.tickets = c.tickets(tensors);
  if (L) *L = l;
  return c.need();
}

// Tiles of a tensor of n elements of `size` bytes with `head` peeled ones.
int64_t lomo_tiles(int64_t n, int64_t size, int64_t head) {
  const int64_t tile = int64_t{kThreads} * (16 / size) * kUnroll;
  return std::max<int64_t>(1, ceil_div(n - head, tile));
}

LomoTensor lomo_record(const at::Tensor& p, const at::Tensor& g, double lr, double weight_decay,
                       double clip_grad_value, int64_t seed, int64_t step, double loss_scale) {
  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  const LomoScalars s = make_lomo_scalars(pre, lr, weight_decay, seed, step);
  LomoTensor t{};
  t.p = p.data_ptr();
  t.g = g.data_ptr();
  t.n = p.numel();
  t.decay = s.decay;
  t.neg_lr = s.neg_lr;
  t.clip = s.clip;
  t.key = s.key;
  const auto pa = reinterpret_cast<uintptr_t>(t.p);
  const int64_t size = p.element_size();
  t.vec = same_phase(t.p, size, t.g, g.element_size());
  t.head = t.vec ? static_cast<int32_t>(std::min<int64_t>(((16 - pa % 16) % 16) / size, t.n)) : 0;
  t.tiles = static_cast<int32_t>(lomo_tiles(t.n, size, t.head));
  return t;
}

void launch_lomo(std::vector<LomoTensor>& ts, const LomoCall& call, at::ScalarType dtype,
                 at::ScalarType grad_dtype, bool sr, bool div) {
  const Stream stream = current_stream();
  for (size_t b = 0; b < ts.size(); b += kLomoMulti) {
    LomoCall c = call;
    const int tiles = fill_records(c, ts, b, kLomoMulti);
    auto go = [&](auto f_tag, auto g_tag, auto sr_tag) {
      constexpr Fmt F = decltype(f_tag)::value, GF = decltype(g_tag)::value;
      constexpr bool SR = decltype(sr_tag)::value;
      if (div) {
        if (c.grad_sq) LOMO_LAUNCH(lomo_update_kernel<F, GF, SR, true, true>, tiles, kThreads, 0, stream, c);
        else LOMO_LAUNCH(lomo_update_kernel<F, GF, SR, true, false>, tiles, kThreads, 0, stream, c);
      } else {
        if (c.grad_sq) LOMO_LAUNCH(lomo_update_kernel<F, GF, SR, false, true>, tiles, kThreads, 0, stream, c);
        else LOMO_LAUNCH(lomo_update_kernel<F, GF, SR, false, false>, tiles, kThreads, 0, stream, c);
      }
    };
    auto with_sr = [&](auto f_tag, auto g_tag) {
      if constexpr (decltype(f_tag)::value != Fmt::F32) {  // fp32 stores are exact
        if (sr) return go(f_tag, g_tag, std::true_type{});
      }
      go(f_tag, g_tag, std::false_type{});
    };
    auto fmt = [&](auto f_tag) {  // the gradient: the parameter's format, or a float32 buffer
      if constexpr (decltype(f_tag)::value != Fmt::F32) {
        if (grad_dtype == at::kFloat)
          return with_sr(f_tag, std::integral_constant<Fmt, Fmt::F32>{});
      }
      with_sr(f_tag, f_tag);
    };
    switch (dtype) {
      case at::kFloat: fmt(std::integral_constant<Fmt, Fmt::F32>{}); break;
      case at::kHalf: fmt(std::integral_constant<Fmt, Fmt::F16>{}); break;
      case at::kBFloat16: fmt(std::integral_constant<Fmt, Fmt::BF16>{}); break;
      default: TORCH_CHECK(false, "lomo_update_: unsupported dtype ", dtype);
    }
  }
}

// The call's shared arguments and, with grad_sq, its workspace (the caller's, or a scratch).
LomoCall lomo_call(const char* op, std::vector<LomoTensor>& ts, const at::Tensor& like,
                   const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_sq,
                   const std::optional<at::Tensor>& workspace, double loss_scale,
                   at::Tensor& scratch) {
  LomoCall c{};
  c.scale = make_preprocess(loss_scale, 0.0).scale;
  c.clip_coef = float_ptr(clip_coef);
  c.found_inf = float_ptr(found_inf);
  c.grad_sq = float_ptr(grad_sq);
  c.call_tensors = static_cast<int>(ts.size());
  int part = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    ts[i].index = static_cast<int32_t>(i);
    ts[i].part = part;
    part += ts[i].tiles;
  }
  if (!c.grad_sq) return c;
  TORCH_CHECK(grad_sq->numel() == 1 && grad_sq->scalar_type() == at::kFloat &&
                  grad_sq->device() == like.device(),
              op, ": grad_sq must be a 1-element float32 tensor on ", like.device());
  const int64_t need = lomo_carve(static_cast<int64_t>(ts.size()), part, Carver(), nullptr);
  if (workspace.has_value()) {
    const at::Tensor& w = *workspace;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.is_contiguous() &&
                    w.device() == like.device(),
                op, ": workspace must be a contiguous 1-d float32 tensor on ", like.device());
    TORCH_CHECK(w.numel() >= need, op, ": workspace has ", w.numel(), " elements, needs ", need,
                " (ops.workspace_numel)");
    scratch = w;
  } else {
    scratch = at::zeros({need}, like.options().dtype(at::kFloat));
  }
  LOMO_CROSS_BLOCK_MEMORY(scratch);
  LomoLayout L;
  lomo_carve(static_cast<int64_t>(ts.size()), part, Carver(scratch.data_ptr<float>(), scratch.numel()), &L);
  c.parts = L.parts;
  c.gsq_slots = L.gsq_slots;
  c.tickets = L.tickets;
  c.call_ticket = L.call_ticket;
  return c;
}

}  // namespace

int64_t lomo_workspace_numel(bool multi, const Shapes& shapes) {
  int64_t need = 0, tiles = 0;
  for (const auto& s : shapes) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    const int64_t t = lomo_tiles(n, 4, 0) + 1;  // fp32 tiles, one more for a peeled head
    need = std::max(need, lomo_carve(1, t, Carver(), nullptr));
    tiles += t;
  }
  return multi ? lomo_carve(static_cast<int64_t>(shapes.size()), tiles, Carver(), nullptr) : need;
}

void lomo_update(LOMO_UPDATE_PARAMS) {
  constexpr const char* op = "lomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  LOMO_CHECK_DEVICE(op, param);
  const bool sr = parse_rounding(op, rounding);
  if (param.numel() == 0) return;
  const DeviceGuard guard(param.device());
  std::vector<LomoTensor> ts{
      lomo_record(param, grad, lr, weight_decay, clip_grad_value, seed, step, loss_scale)};
  at::Tensor scratch;
  const LomoCall c =
      lomo_call(op, ts, param, clip_coef, found_inf, grad_sq, workspace, loss_scale, scratch);
  launch_lomo(ts, c, param.scalar_type(), grad.scalar_type(), sr,
              make_preprocess(loss_scale, 0.0).divide);
}

void lomo_update_multi(LOMO_UPDATE_MULTI_PARAMS) {
  constexpr const char* op = "lomo_update_multi_";
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k, op, ": ", k, " params but ", grads.size(), " grads");
  TORCH_CHECK(lr.size() == k && weight_decay.size() == k && clip_grad_value.size() == k &&
                  seed.size() == k && step.size() == k,
              op, ": every per-tensor scalar list needs ", k, " values");
  const bool sr = parse_rounding(op, rounding);
  std::vector<size_t> live;
  for (size_t i = 0; i < k; ++i) {
    check_common(op, params[i], grads[i], clip_coef, found_inf);
    LOMO_CHECK_DEVICE(op, params[i]);
    TORCH_CHECK(params[i].device() == params[0].device(), op,
                ": every tensor must be on one device");
    if (params[i].numel() > 0) live.push_back(i);
  }
  if (live.empty()) return;
  const at::Tensor& first = params[live[0]];
  const DeviceGuard guard(first.device());
  std::vector<LomoTensor> ts;
  for (size_t i : live)
    ts.push_back(lomo_record(params[i], grads[i], lr[i], weight_decay[i], clip_grad_value[i],
                             seed[i], step[i], loss_scale));
  at::Tensor scratch;
  const LomoCall c =
      lomo_call(op, ts, first, clip_coef, found_inf, grad_sq, workspace, loss_scale, scratch);
  // one launch per (param, grad) dtype pair (per kLomoMulti tensors), in order of first
  // appearance
  using Pair = std::pair<at::ScalarType, at::ScalarType>;
  const auto pair_of = [&](size_t i) {
    return Pair{params[i].scalar_type(), grads[i].scalar_type()};
  };
  std::vector<Pair> dtypes;
  for (size_t i : live)
    if (std::find(dtypes.begin(), dtypes.end(), pair_of(i)) == dtypes.end())
      dtypes.push_back(pair_of(i));
  const bool div = make_preprocess(loss_scale, 0.0).divide;
  for (const Pair& dt : dtypes) {
    std::vector<LomoTensor> group;
    for (size_t j = 0; j < live.size(); ++j)
      if (pair_of(live[j]) == dt) group.push_back(ts[j]);
    launch_lomo(group, c, dt.first, dt.second, sr, div);
  }
}

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
