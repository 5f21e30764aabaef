// The SIMT emulator, called from kernel code (inside a fiber): warp collectives, shuffles and block
// barriers (csrc/cuda/emulation.h declares them; emulator.cpp schedules the fibers).
#include <cstdio>
#include <string>

#include "emulated/emulator_internal.h"

namespace lomo {
namespace emu {

using namespace detail;

unsigned lane_id() { return static_cast<unsigned>(tls_run->cur->lane); }

unsigned active_mask() {
  const BlockRun& r = *tls_run;
  const WarpState& w = r.warps[r.cur->warp];
  return w.members & ~w.exited;
}

namespace {

uint64_t combine(Collective kind, unsigned mask, const Fiber* lanes) {
  uint64_t acc = 0;
  bool first = true;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const uint32_t u = static_cast<uint32_t>(lanes[l].wvalue);
    const int32_t i = static_cast<int32_t>(u);
    const uint32_t a = static_cast<uint32_t>(acc);
    switch (kind) {
      case Collective::Ballot: acc |= static_cast<uint64_t>(u != 0) << l; break;
      case Collective::AddU32: acc = a + u; break;
      case Collective::MinU32: acc = first || u < a ? u : a; break;
      case Collective::MaxU32: acc = first || u > a ? u : a; break;
      case Collective::MinI32: acc = static_cast<uint32_t>(first || i < static_cast<int32_t>(a) ? i : static_cast<int32_t>(a)); break;
      case Collective::MaxI32: acc = static_cast<uint32_t>(first || i > static_cast<int32_t>(a) ? i : static_cast<int32_t>(a)); break;
      case Collective::AndU32: acc = first ? u : (a & u); break;
      case Collective::OrU32: acc = a | u; break;
      case Collective::XorU32: acc = a ^ u; break;
      default: break;
    }
    first = false;
  }
  return acc;
}

}  // namespace

uint64_t warp_collective(unsigned mask, Collective kind, uint64_t value, unsigned src) {
  BlockRun& r = *tls_run;
  Fiber* f = r.cur;
  WarpState& w = r.warps[f->warp];
  const unsigned bit = 1u << f->lane;
  char buf[160];
  if (!(mask & bit) || (mask & ~w.members) || (mask & w.exited)) {
    std::snprintf(buf, sizeof(buf),
                  "warp collective with mask 0x%08x: it must include the calling lane %d and "
                  "only live lanes of the warp (0x%08x)",
                  mask, f->lane, w.members & ~w.exited);
    fail_here(r, buf);
  }
  f->wmask = mask;
  f->wkind = kind;
  f->wvalue = value;
  f->wsrc = src;
  w.arrived |= bit;
  if ((w.arrived & mask) != mask) {
    f->wait = Wait::Warp;
    block_until_released(r);
    return f->wresult;
  }
  // The last arriver: every lane of the mask must be at the same kind of collective.
  Fiber* lanes = &r.fibers[f->warp * 32];
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (lanes[l].wmask != mask || lanes[l].wkind != kind) {
      std::snprintf(buf, sizeof(buf),
                    "lanes of mask 0x%08x meet at different warp collectives (lane %u: mask "
                    "0x%08x, another kind or mask)",
                    mask, l, lanes[l].wmask);
      fail_here(r, buf);
    }
  }
  const uint64_t all = kind == Collective::Shuffle ? 0 : combine(kind, mask, lanes);
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& o = lanes[l];
    o.wresult = kind == Collective::Shuffle ? lanes[o.wsrc].wvalue : all;
    if (o.wait == Wait::Warp) o.wait = Wait::None;
  }
  w.arrived &= ~mask;
  if (kind == Collective::SyncWarp) shared_syncwarp(r, f->warp, mask);  // orders shared accesses
  return f->wresult;
}

unsigned shuffle_source(ShuffleMode mode, unsigned lane, int arg, int width, unsigned mask) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail_here(*tls_run, "shuffle width must be a power of two <= 32, got " + std::to_string(width));
  const unsigned seg = lane & ~static_cast<unsigned>(width - 1);
  unsigned src = lane;
  switch (mode) {
    case ShuffleMode::Index: src = seg + (static_cast<unsigned>(arg) & (width - 1)); break;
    case ShuffleMode::Up: src = static_cast<int>(lane) - arg >= static_cast<int>(seg) ? lane - arg : lane; break;
    case ShuffleMode::Down: src = lane + arg < seg + width ? lane + arg : lane; break;
    case ShuffleMode::Xor: {
      const unsigned j = lane ^ static_cast<unsigned>(arg);
      src = j < seg + width ? j : lane;  // a later segment: own value
      break;
    }
  }
  if (src >= 32 || !(mask >> src & 1u))
    fail_here(*tls_run, "shuffle reads lane " + std::to_string(src) + ", which is not in the mask");
  return src;
}

int block_barrier(BlockSync kind, int predicate) {
  BlockRun& r = *tls_run;
  if (r.arrived == 0) {
    r.bkind = kind;
  } else if (r.bkind != kind) {
    fail_here(r, "threads of a block meet at different kinds of __syncthreads");
  }
  ++r.arrived;
  r.count += predicate != 0;
  if (r.arrived == r.live) {
    release_block_barrier(r);
  } else {
    r.cur->wait = Wait::Block;
    block_until_released(r);
  }
  return r.cur->sync_result;
}

}  // namespace emu
}  // namespace lomo
