// The work units of a factored AdaLomo parameter (dim >= 2: S slices of m x n) on the CPU: tiles
// of up to kTileCols columns and a row group (at most kMaxRowGroups per slice), fixed by the shape
// alone. adalomo_factored.cpp runs its passes over them; same_bytes.cpp streams the same bytes
// over the same tiles.
#pragma once

#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_common.h"

namespace lomo {
namespace cpu {

constexpr int64_t kTileCols = 4096;
constexpr int64_t kTileElems = 262144;
constexpr int64_t kMaxRowGroups = 64;  // bounds the column-sum partials to 64 rows of n

struct Geo {
  int64_t S, m, n;  // slices of m x n
  int64_t tc, ncb;  // tile columns, column blocks
  int64_t tr, nrb;  // tile rows, row groups per slice
  int64_t units;
};

inline Geo factored_geo(c10::IntArrayRef sizes) {
  Geo g{};
  const int64_t d = static_cast<int64_t>(sizes.size());
  g.n = sizes[d - 1];
  g.m = sizes[d - 2];
  g.S = 1;
  for (int64_t i = 0; i < d - 2; ++i) g.S *= sizes[i];
  g.tc = std::max<int64_t>(1, std::min(g.n, kTileCols));
  g.ncb = ceil_div(g.n, g.tc);
  g.tr = std::min(g.m, std::max(ceil_div(kTileElems, g.tc), ceil_div(g.m, kMaxRowGroups)));
  g.tr = std::max<int64_t>(g.tr, 1);
  g.nrb = ceil_div(g.m, g.tr);
  g.units = g.S * g.nrb * g.ncb;
  return g;
}

struct Tile {
  int64_t s, rg, cb, r0, r1, c0, w;
};

LOMO_CPU_INLINE Tile tile_of(const Geo& g, int64_t unit) {
  Tile t;
  t.cb = unit % g.ncb;
  const int64_t srg = unit / g.ncb;
  t.s = srg / g.nrb;
  t.rg = srg % g.nrb;
  t.r0 = t.rg * g.tr;
  t.r1 = std::min(g.m, t.r0 + g.tr);
  t.c0 = t.cb * g.tc;
  t.w = std::min(g.n, t.c0 + g.tc) - t.c0;
  return t;
}

}  // namespace cpu
}  // namespace lomo
