// AdaLomo on CUDA (docs/spec.md): one launch per pass, no host synchronisation, and with the
// caller's workspace no allocation and no memset.
//
// Factored (dim >= 2, batched over leading dims): tiles of `rpt` rows x TC = 32 * N columns inside
// one [m, n] slice; lane l owns N consecutive columns (one 16-byte load), warp w the rows w, w + 8,
// ..., four rows per step with every load issued before the math.
//   pass 1 (stats):  per tile: row sums of G = g*g + eps1 over its columns, column sums over its
//       rows, sum(p*p), sum(g_unscaled^2), a bad flag. Finalisation by tickets (reduce.cuh):
//       the last column block of a row block sums the row partials -> new r (kept in the
//       workspace) and its sum; the last row block of a slice -> sum r of the slice; columns in two
//       levels (the last tile of a group of kColGroup row blocks sums the group, the last group
//       sums the groups) -> the header's column sums; the last tile overall -> sum_pp, bad, grad_sq.
//   pass 2 (unorm):  new c from the header (kept in the workspace), sum(u*u) per tile, the last
//       tile -> header[2].
//   pass 3 (apply):  lr_t, decay and denom from the header (every block computes the same floats),
//       p = p*decay - lr_t*u/denom (no division when denom == 1), round, store; the state (r', c')
//       is committed here only, by the tiles of the first column / row block.
// The workspace header is the public one of reference.py (WS_*), so stages 1/2/3 (sharded
// parameters) are exactly these passes with an all-reduce between them.
// Unfactored (0-d / 1-d) and the multi-tensor op: adalomo_flat.cuh (1 launch, 2 for large tensors).
//
// Cost: 12 bytes per bf16 element (pass 1 reads g, p; pass 2 g; pass 3 g, p and writes p). The
// workspace is O(rows * column blocks + columns * row blocks + tiles) floats with at most
// kMaxRowBlocks row blocks per slice. Determinism: every reduction has a fixed order that depends on
// the shape only; tickets decide who reduces, never the order.
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <string_view>
#include <vector>

#include "checks.h"
#include "cuda/adalomo_apply.cuh"
#include "cuda/adalomo_flat.cuh"
#include "cuda/adalomo_stats.cuh"
#include "cuda/adalomo_tiles.cuh"
#include "cuda/adalomo_unorm.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"
#include "ops.h"
#include "update_args.h"

namespace lomo {
namespace LOMO_CUDA_NS {
namespace {

constexpr int64_t kMinTC = 32 * 4;  // fp32 tiles: the most column blocks of any dtype

int64_t factored_numel(const std::vector<int64_t>& shape) {
  const int64_t n = shape.back(), m = shape[shape.size() - 2];
  int64_t S = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) S *= shape[i];
  // fp32 (the most column blocks); a peeled grid has at most 3 columns more
  return carve(make_geom(S, m, n, kMinTC, 3), Carver(), nullptr);
}

// The flat layout of `tensors` tensors of `tiles` tiles in all: headers (4 each; the single op's is
// the public one at ws[0..4)), grad_sq slots, partials (4 per tile); tickets at the back.
struct FlatLayout {
  int* call_ticket;
  float* gsq_slots;
  float* headers;
  int* tickets;
  float* parts;
};

int64_t flat_carve(int64_t tensors, int64_t tiles, Carver c, FlatLayout* L) {
  FlatLayout l;
  l.headers = c.data(kHeader * tensors);
  l.gsq_slots = c.data(tensors);
  l.parts = c.data(4 * tiles);
  l.call_ticket = c.tickets(1);
  l.tickets = c.tickets(tensors);
  if (L) *L = l;
  return c.need();
}

int64_t flat_tiles_max(int64_t numel) { return ceil_div(numel, flat_tile<float>()); }

struct Dispatch {
  bool sr, div;
};

// fn(f_tag, g_tag, sr_tag, div_tag): the parameter's and the gradient's formats (the gradient:
// the parameter's, or float32 for a 16-bit parameter) and the flags.
template <typename Fn>
void with_format(at::ScalarType dtype, at::ScalarType grad_dtype, Dispatch d, const char* op,
                 Fn&& fn) {
  auto flags = [&](auto f_tag, auto g_tag) {
    constexpr Fmt F = decltype(f_tag)::value;
    auto div = [&](auto sr_tag) {
      if (d.div) fn(f_tag, g_tag, sr_tag, std::true_type{});
      else fn(f_tag, g_tag, sr_tag, std::false_type{});
    };
    if constexpr (F != Fmt::F32) {  // fp32 stores are exact: no stochastic variant
      if (d.sr) return div(std::true_type{});
    }
    div(std::false_type{});
  };
  auto go = [&](auto f_tag) {
    if constexpr (decltype(f_tag)::value != Fmt::F32) {
      if (grad_dtype == at::kFloat) return flags(f_tag, std::integral_constant<Fmt, Fmt::F32>{});
    }
    flags(f_tag, f_tag);
  };
  switch (dtype) {
    case at::kFloat: go(std::integral_constant<Fmt, Fmt::F32>{}); break;
    case at::kHalf: go(std::integral_constant<Fmt, Fmt::F16>{}); break;
    case at::kBFloat16: go(std::integral_constant<Fmt, Fmt::BF16>{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

void check_scalar_out(const char* op, const char* name, const std::optional<at::Tensor>& t,
                      const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == like.device(),
              op, ": ", name, " must be a 1-element float32 tensor on ", like.device());
}

// The caller's workspace (checked), or a zeroed scratch of `need` floats for this call only.
at::Tensor workspace_or_scratch(const char* op, const std::optional<at::Tensor>& workspace,
                                int64_t need, const at::Tensor& like) {
  if (workspace.has_value()) {
    const at::Tensor& w = *workspace;
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.is_contiguous() &&
                    w.device() == like.device(),
                op, ": workspace must be a contiguous 1-d float32 tensor on ", like.device());
    TORCH_CHECK(w.numel() >= need, op, ": workspace has ", w.numel(), " elements, needs ", need,
                " (ops.workspace_numel)");
    LOMO_CROSS_BLOCK_MEMORY(w);
    return w;
  }
  at::Tensor scratch = at::zeros({std::max<int64_t>(need, 1)}, like.options().dtype(at::kFloat));
  LOMO_CROSS_BLOCK_MEMORY(scratch);
  return scratch;
}

// Launches the flat kernel over `ts` (one param and one grad dtype) in chunks of kMaxMulti
// records.
void launch_flat(std::vector<FlatTensor>& ts, FlatCall call, at::ScalarType dtype,
                 at::ScalarType grad_dtype, Dispatch d) {
  const Stream stream = current_stream();
  for (size_t b = 0; b < ts.size(); b += kMaxMulti) {
    FlatCall c = call;
    const int tiles = fill_records(c, ts, b, kMaxMulti);
    with_format(dtype, grad_dtype, d, "adalomo_update_",
                [&](auto f_tag, auto g_tag, auto sr_tag, auto div_tag) {
      constexpr Fmt F = decltype(f_tag)::value, GF = decltype(g_tag)::value;
      constexpr bool SR = decltype(sr_tag)::value, DIV = decltype(div_tag)::value;
      LOMO_LAUNCH(adalomo_flat_kernel<F, GF, SR, DIV>, tiles, kThreads, 0, stream, c);
    });
  }
}

FlatTensor flat_record(const at::Tensor& p, const at::Tensor& g, const at::Tensor& v,
                       const AdaLomoScalars& s, double gnumel, int index, int part, float* header,
                       int* ticket) {
  const int64_t n = p.numel();
  const int64_t tile = p.element_size() == 4 ? flat_tile<float>() : flat_tile<uint16_t>();
  FlatTensor t{};
  t.p = p.data_ptr();
  t.g = g.data_ptr();
  t.v = v.data_ptr<float>();
  t.n = n;
  t.gnumel = gnumel;
  t.s = s;
  t.tiles = static_cast<int32_t>(ceil_div(n, tile));
  t.index = index;
  t.part = part;
  t.header = header;
  t.ticket = ticket;
  t.vec = aligned16(t.p) && aligned16(t.g) && aligned16(t.v);
  return t;
}

template <Fmt F, Fmt GF, bool SR, bool DIV>
void run_factored(const Args& a, int stage) {
  const Stream stream = current_stream();
  const int64_t T = a.geo.T;
  if (T == 0) {  // an empty local shard (stages only)
    LOMO_LAUNCH(empty_shard_kernel, 1, kThreads, 0, stream, a, stage);
    return;
  }
  if (stage == 0 || stage == 1) LOMO_LAUNCH(stats_kernel<F, GF, DIV>, T, kThreads, 0, stream, a);
  if (stage == 0 || stage == 2) LOMO_LAUNCH(unorm_kernel<F, GF, DIV>, T, kThreads, 0, stream, a);
  if (stage == 0 || stage == 3) LOMO_LAUNCH(apply_kernel<F, GF, SR, DIV>, T, kThreads, 0, stream, a);
}

}  // namespace

int64_t lomo_workspace_numel(bool multi, const Shapes& shapes);  // lomo_update.cu
int64_t grad_accumulate_workspace_numel(const Shapes& shapes);   // grad_accumulate.cu

int64_t workspace_numel(std::string_view op, const Shapes& shapes) {
  int64_t need = 0;
  if (op == "adalomo_update_") {
    for (const auto& s : shapes) {
      int64_t numel = 1;
      for (int64_t d : s) numel *= d;
      need = std::max(need, s.size() >= 2 ? factored_numel(s)
                                          : flat_carve(1, flat_tiles_max(numel), Carver(), nullptr));
    }
  } else if (op == "adalomo_update_multi_") {
    int64_t tiles = 0;
    for (const auto& s : shapes) {
      int64_t numel = 1;
      for (int64_t d : s) numel *= d;
      tiles += flat_tiles_max(numel);
    }
    need = flat_carve(static_cast<int64_t>(shapes.size()), tiles, Carver(), nullptr);
  } else if (op == "lomo_update_" || op == "lomo_update_multi_") {
    need = lomo_workspace_numel(op == "lomo_update_multi_", shapes);
  } else if (op == "grad_accumulate_") {
    need = grad_accumulate_workspace_numel(shapes);
  }
  return need;
}

void adalomo_update(ADALOMO_UPDATE_PARAMS) {
  constexpr const char* op = "adalomo_update_";
  check_common(op, param, grad, clip_coef, found_inf);
  LOMO_CHECK_DEVICE(op, param);
  check_adalomo_state(param, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq);
  check_scalar_out(op, "grad_sq", grad_sq, param);
  const bool sr = parse_rounding(op, rounding);
  TORCH_CHECK(stage >= 0 && stage <= 3, op, ": stage must be 0 (all passes) or 1, 2, 3, got ",
              stage);
  TORCH_CHECK(stage == 0 || workspace.has_value(), op, ": stage ", stage,
              " needs a workspace (ops.workspace_numel)");
  const int64_t numel = param.numel();
  if (numel == 0 && stage == 0) return;
  const DeviceGuard guard(param.device());
  const Preprocess pre = make_preprocess(loss_scale, clip_grad_value);
  const AdaLomoScalars s =
      make_adalomo_scalars(pre, lr, weight_decay, beta, eps1, eps2, clip_threshold, seed, step);
  const Dispatch d{sr, pre.divide};
  const double gnumel = static_cast<double>(global_numel > 0 ? global_numel : numel);

  if (param.dim() >= 2) {
    Args a{};
    a.p = param.data_ptr();
    a.g = grad.data_ptr();
    a.row_state = exp_avg_sq_row->data_ptr<float>();
    a.col_state = exp_avg_sq_col->data_ptr<float>();
    a.clip_coef = float_ptr(clip_coef);
    a.found_inf = float_ptr(found_inf);
    a.grad_sq = float_ptr(grad_sq);
    a.s = s;
    const int64_t n = param.size(-1), m = param.size(-2);
    const int64_t S = m * n > 0 ? numel / (m * n) : [&] {
      int64_t prod = 1;
      for (int64_t i = 0; i + 2 < param.dim(); ++i) prod *= param.size(i);
      return prod;
    }();
    const int64_t N = 16 / param.element_size(), size = param.element_size();
    const auto pa = reinterpret_cast<uintptr_t>(a.p);
    a.vec = n % N == 0 && same_phase(a.p, size, a.g, grad.element_size());
    const int64_t head = a.vec ? static_cast<int64_t>((16 - pa % 16) % 16) / size : 0;
    a.shift = static_cast<int>((N - head) % N);
    a.geo = make_geom(S, m, n, 32 * N, a.shift);
    TORCH_CHECK(a.geo.T < (int64_t{1} << 31) && a.geo.nrb * a.geo.ncb < (int64_t{1} << 30), op,
                ": tensor too large (", a.geo.T, " tiles)");
    at::Tensor ws = workspace_or_scratch(op, workspace, carve(a.geo, Carver(), nullptr), param);
    carve(a.geo, Carver(ws.data_ptr<float>(), ws.numel()), &a.ws);
    a.global_rows = static_cast<float>(global_rows > 0 ? global_rows : m);
    a.global_numel = gnumel;
    with_format(param.scalar_type(), grad.scalar_type(), d, op,
                [&](auto f_tag, auto g_tag, auto sr_tag, auto div_tag) {
      run_factored<decltype(f_tag)::value, decltype(g_tag)::value, decltype(sr_tag)::value,
                   decltype(div_tag)::value>(a, static_cast<int>(stage));
    });
    return;
  }

  // unfactored: the flat kernel with one record; its header is the public one at ws[0..4)
  const int64_t tiles = ceil_div(numel, param.element_size() == 4 ? flat_tile<float>()
                                                                  : flat_tile<uint16_t>());
  at::Tensor ws =
      workspace_or_scratch(op, workspace, flat_carve(1, tiles, Carver(), nullptr), param);
  FlatLayout L;
  flat_carve(1, tiles, Carver(ws.data_ptr<float>(), ws.numel()), &L);
  FlatCall call{};
  call.clip_coef = float_ptr(clip_coef);
  call.found_inf = float_ptr(found_inf);
  call.grad_sq = float_ptr(grad_sq);
  call.parts = L.parts;
  call.total_tiles = static_cast<int>(tiles);
  call.gsq_slots = L.gsq_slots;
  call.call_ticket = L.call_ticket;
  call.call_tensors = 1;
  std::vector<FlatTensor> ts{
      flat_record(param, grad, *exp_avg_sq, s, gnumel, 0, 0, L.headers, L.tickets)};
  if (numel == 0) {  // an empty local shard: zero header (stage 1), found_inf (stage 3)
    Args a{};
    a.found_inf = call.found_inf;
    a.ws.header = L.headers;
    if (stage != 2)
      LOMO_LAUNCH(empty_shard_kernel, 1, kThreads, 0, current_stream(), a, static_cast<int>(stage));
    return;
  }
  if (stage == 2) return;  // sum(u*u) is in the header since stage 1
  if (stage == 0 && tiles <= kFuseTiles) {
    call.mode = kFlatFused;
    launch_flat(ts, call, param.scalar_type(), grad.scalar_type(), d);
    return;
  }
  if (stage != 3) {
    call.mode = kFlatStats;
    launch_flat(ts, call, param.scalar_type(), grad.scalar_type(), d);
  }
  if (stage != 1) {
    call.mode = kFlatApply;
    launch_flat(ts, call, param.scalar_type(), grad.scalar_type(), d);
  }
}

void adalomo_update_multi(ADALOMO_UPDATE_MULTI_PARAMS) {
  constexpr const char* op = "adalomo_update_multi_";
  const size_t k = params.size();
  TORCH_CHECK(grads.size() == k && exp_avg_sqs.size() == k, op, ": ", k, " params but ",
              grads.size(), " grads and ", exp_avg_sqs.size(), " exp_avg_sqs");
  for (const auto* list : {&lr, &weight_decay, &clip_grad_value, &beta, &eps1, &eps2,
                           &clip_threshold})
    TORCH_CHECK(list->size() == k, op, ": every per-tensor scalar list needs ", k, " values");
  TORCH_CHECK(seed.size() == k && step.size() == k, op, ": seed and step need ", k, " values");
  const bool sr = parse_rounding(op, rounding);
  std::vector<size_t> live;
  int64_t tiles = 0;
  for (size_t i = 0; i < k; ++i) {
    check_common(op, params[i], grads[i], clip_coef, found_inf);
    LOMO_CHECK_DEVICE(op, params[i]);
    TORCH_CHECK(params[i].dim() <= 1, op, ": takes 0-d and 1-d tensors only, got shape ",
                params[i].sizes());
    TORCH_CHECK(params[i].device() == params[0].device(), op,
                ": every tensor must be on one device");
    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(v.scalar_type() == at::kFloat && v.numel() == params[i].numel() &&
                    v.is_contiguous() && v.device() == params[i].device(),
                op, ": exp_avg_sqs[", i, "] must be a contiguous float32 tensor of ",
                params[i].numel(), " elements on ", params[i].device());
    check_scalar_out(op, "grad_sq", grad_sq, params[i]);
    if (params[i].numel() > 0) {
      live.push_back(i);
      tiles += ceil_div(params[i].numel(), params[i].element_size() == 4 ? flat_tile<float>()
                                                                         : flat_tile<uint16_t>());
    }
  }
  if (live.empty()) return;
  const at::Tensor& first = params[live[0]];
  const DeviceGuard guard(first.device());
  const Preprocess pre = make_preprocess(loss_scale, 0.0);
  const int64_t count = static_cast<int64_t>(live.size());
  at::Tensor ws =
      workspace_or_scratch(op, workspace, flat_carve(count, tiles, Carver(), nullptr), first);
  FlatLayout L;
  flat_carve(count, tiles, Carver(ws.data_ptr<float>(), ws.numel()), &L);
  FlatCall call{};
  call.clip_coef = float_ptr(clip_coef);
  call.found_inf = float_ptr(found_inf);
  call.grad_sq = float_ptr(grad_sq);
  call.parts = L.parts;
  call.total_tiles = static_cast<int>(tiles);
  call.gsq_slots = L.gsq_slots;
  call.call_ticket = L.call_ticket;
  call.call_tensors = static_cast<int>(count);
  call.mode = kFlatFused;
  // one launch per (param, grad) dtype pair (per kMaxMulti tensors), in order of first
  // appearance
  using Pair = std::pair<at::ScalarType, at::ScalarType>;
  const auto pair_of = [&](size_t i) {
    return Pair{params[i].scalar_type(), grads[i].scalar_type()};
  };
  std::vector<Pair> dtypes;
  for (size_t i : live)
    if (std::find(dtypes.begin(), dtypes.end(), pair_of(i)) == dtypes.end())
      dtypes.push_back(pair_of(i));
  int part = 0;
  std::vector<std::vector<FlatTensor>> groups(dtypes.size());
  for (int j = 0; j < count; ++j) {
    const size_t i = live[j];
    const Preprocess pi = make_preprocess(loss_scale, clip_grad_value[i]);
    const AdaLomoScalars s = make_adalomo_scalars(pi, lr[i], weight_decay[i], beta[i], eps1[i],
                                                  eps2[i], clip_threshold[i], seed[i], step[i]);
    FlatTensor t = flat_record(params[i], grads[i], exp_avg_sqs[i], s,
                               static_cast<double>(params[i].numel()), j, part,
                               L.headers + kHeader * j, L.tickets + j);
    part += t.tiles;
    const size_t gi = std::find(dtypes.begin(), dtypes.end(), pair_of(i)) - dtypes.begin();
    groups[gi].push_back(t);
  }
  for (size_t gi = 0; gi < dtypes.size(); ++gi)
    launch_flat(groups[gi], call, dtypes[gi].first, dtypes[gi].second, Dispatch{sr, pre.divide});
}

}  // namespace LOMO_CUDA_NS
}  // namespace lomo
