// The SIMT emulator's cross-block memory model (docs/gpu-verification.md, "The memory model"): what
// one block of a launch may see of another's global stores, made adversarial so that a missing
// __threadfence() or a finisher's plain load (instead of __ldcg) gives wrong results in tests.
//
// It covers the memory the blocks of a launch exchange data through (a workspace: MemoryScope's
// "workspace" and every scratch workspace, see cross_block_tensor), in 4-byte words. The blocks of
// such a launch run one at a time on one OS thread, so a block's stores are found by comparing the
// memory with what the model expects it to hold ("diff points": each atomic and the block's exit).
//   * Publication (release): the stores a block made in an interval between diff points that
//     contains a __threadfence() of the block are published; the others stay unpublished until the
//     launch ends (block exit publishes nothing: the PTX memory model promises no such thing).
//   * Acquisition: a block sees another's published stores once it has acquired them: by a
//     __threadfence() after an atomic that followed the publication, or by an acq_rel atomic.
//   * __ldcg / __ldcv (L2): the block's own stores, else the published and acquired value, else
//     the poison 0xFFFFFFFF (NaN as float, -1 as int).
//   * Plain loads (a non-coherent L1 that may hold a line from before another block stored it):
//     every word another block of the launch stored or changed atomically reads as the poison.
//   * Atomics act on the coherent value of their word and publish nothing else (relaxed).
// At the end of the launch memory holds every store (the last one made of each word).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

#include "emulated/emulator_internal.h"

namespace lomo {
namespace emu {

__thread MemoryModel* tls_model = nullptr;

namespace {

constexpr uint32_t kPoison = 0xFFFFFFFFu;
constexpr int64_t kAtomicWriter = -1;

}  // namespace

class MemoryModel {
 public:
  explicit MemoryModel(const std::vector<detail::MemRange>& ranges) {
    for (const detail::MemRange& m : ranges) {
      if (!m.cross_block) continue;
      auto* lo = reinterpret_cast<uint32_t*>((m.view_lo + 3) / 4 * 4);
      auto* hi = reinterpret_cast<uint32_t*>(m.view_hi / 4 * 4);
      if (hi > lo) add(lo, hi);
    }
  }
  bool empty() const { return ranges_.empty(); }

  void block_start(int64_t b) {
    block_ = b;
    fenced_ = false;
    observed_ = acquired_ = 0;  // nothing of this launch's publications
    // The L1 model: what other blocks stored since the last block start reads as the poison in
    // plain loads (earlier ones already do).
    for (uint32_t* w : touched_) {
      Range& r = *find(w);
      *w = kPoison;
      r.expect[w - r.lo] = kPoison;
    }
    touched_.clear();
  }

  void block_exit() { diff(); }

  void fence() {
    fenced_ = true;
    acquired_ = std::max(acquired_, observed_);
  }

  void atomic_begin(const void* p, size_t bytes) {
    diff();  // the stores before the atomic, published or not by the fences before it
    observed_ = epoch_;
    for_words(p, bytes, [&](uint32_t* w, Range&) {
      auto it = words_.find(w);
      if (it != words_.end()) *w = it->second.value;  // the coherent value, not the L1 view
    });
  }

  void atomic_end(const void* p, size_t bytes, bool acquire) {
    for_words(p, bytes, [&](uint32_t* w, Range& r) {
      r.expect[w - r.lo] = *w;
      words_[w] = {*w, kAtomicWriter, true, 0};
      touched_.push_back(w);
    });
    if (acquire) acquired_ = std::max(acquired_, observed_);
  }

  void coherent_load(const void* p, void* out, size_t bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    if (a % 4 || bytes % 4) {  // not word-sized: no cross-block data here
      std::memcpy(out, p, bytes);
      return;
    }
    auto* o = static_cast<uint32_t*>(out);
    const auto* w = reinterpret_cast<const uint32_t*>(p);
    for (size_t i = 0; i < bytes / 4; ++i) o[i] = coherent_word(const_cast<uint32_t*>(w + i));
  }

  // Publishes every store: memory holds the last value of each word.
  void finish() {
    diff();
    for (const auto& [w, word] : words_) *w = word.value;
  }

 private:
  struct Range {
    uint32_t *lo, *hi;
    std::vector<uint32_t> expect;  // what memory holds unless the running block stored since
  };
  struct Word {
    uint32_t value;  // the last value stored to it in this launch
    int64_t block;   // by this block (kAtomicWriter: an atomic)
    bool published;
    uint64_t epoch;  // published at this epoch (0: an atomic's value, always coherent)
  };

  void add(uint32_t* lo, uint32_t* hi) {
    for (Range& r : ranges_) {  // the same tensor registered twice (or a part of it)
      if (lo >= r.lo && hi <= r.hi) return;
    }
    ranges_.push_back({lo, hi, std::vector<uint32_t>(lo, hi)});
  }

  Range* find(const uint32_t* w) {
    for (Range& r : ranges_) {
      if (w >= r.lo && w < r.hi) return &r;
    }
    return nullptr;
  }

  template <class F>
  void for_words(const void* p, size_t bytes, F f) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    for (uintptr_t x = a / 4 * 4; x < a + bytes; x += 4) {
      auto* w = reinterpret_cast<uint32_t*>(x);
      if (Range* r = find(w)) f(w, *r);
    }
  }

  uint32_t coherent_word(uint32_t* w) {
    Range* r = find(w);
    if (!r || *w != r->expect[w - r->lo]) return *w;  // not modelled, or stored by this block
    auto it = words_.find(w);
    if (it == words_.end() || it->second.block == block_) return *w;
    const Word& x = it->second;
    return x.published && x.epoch <= acquired_ ? x.value : kPoison;
  }

  // Records the running block's stores since the last diff point.
  void diff() {
    constexpr size_t kChunk = 16;
    const uint64_t epoch = fenced_ ? epoch_ + 1 : 0;
    for (Range& r : ranges_) {
      const size_t n = static_cast<size_t>(r.hi - r.lo);
      uint32_t* e = r.expect.data();
      for (size_t c = 0; c < n; c += kChunk) {
        const size_t m = std::min(kChunk, n - c);
        if (std::memcmp(r.lo + c, e + c, m * 4) == 0) continue;
        for (size_t i = c; i < c + m; ++i) {
          if (r.lo[i] == e[i]) continue;
          e[i] = r.lo[i];
          words_[r.lo + i] = {r.lo[i], block_, fenced_, epoch};
          epoch_ = std::max(epoch_, epoch);
          touched_.push_back(r.lo + i);
        }
      }
    }
    fenced_ = false;
  }

  std::vector<Range> ranges_;
  std::unordered_map<uint32_t*, Word> words_;
  std::vector<uint32_t*> touched_;  // words stored since the running block started
  int64_t block_ = -1;
  bool fenced_ = false;  // a fence of the running block since the last diff point
  uint64_t epoch_ = 0;   // publications so far in this launch
  uint64_t observed_ = 0, acquired_ = 0;  // of the running block: at its last atomic, acquired
};

void model_fence(MemoryModel& m) { m.fence(); }
void model_atomic_begin(MemoryModel& m, const void* p, size_t bytes) { m.atomic_begin(p, bytes); }
void model_atomic_end(MemoryModel& m, const void* p, size_t bytes, bool acquire) {
  m.atomic_end(p, bytes, acquire);
}
void model_coherent_load(MemoryModel& m, const void* p, void* out, size_t bytes) {
  m.coherent_load(p, out, bytes);
}

void cross_block_tensor(const at::Tensor& t) {
  const auto a = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto bytes = static_cast<uintptr_t>(t.numel() * t.element_size());
  detail::tls_ranges.push_back({a, a + bytes, a, a + bytes, "workspace", true});
  detail::tls_keep_alive.push_back(t);
}

namespace detail {

void MemoryModelDeleter::operator()(MemoryModel* m) const { delete m; }

MemoryModelPtr make_memory_model(const std::vector<MemRange>& ranges) {
  if (!memory_model_enabled()) return nullptr;
  MemoryModelPtr m(new MemoryModel(ranges));
  if (m->empty()) return nullptr;
  return m;
}

void model_block_start(MemoryModel& m, int64_t block) { m.block_start(block); }
void model_block_exit(MemoryModel& m) { m.block_exit(); }
void model_finish(MemoryModel& m) { m.finish(); }

bool memory_model_enabled() {
  const char* v = std::getenv("LOMO_KERNELS_EMULATION_MEMORY_MODEL");
  const std::string s = v ? v : "";
  TORCH_CHECK(s.empty() || s == "0" || s == "1",
              "LOMO_KERNELS_EMULATION_MEMORY_MODEL must be 0 or 1, got '", s, "'");
  return s != "0";
}

}  // namespace detail
}  // namespace emu
}  // namespace lomo
