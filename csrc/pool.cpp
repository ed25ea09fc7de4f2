// A cache of large CPU blocks for the tensors the cpp backend's ops allocate (outputs, workspaces,
// scratch), and for the input projection and its gradient (fastrnn_cpp::empty, used by fastrnn.functional).
//
// Why: glibc serves a request of more than a few MiB with a fresh mmap, and every 4 KiB page of it
// then costs a page fault and a zeroing on first touch (~1.5 us a page on this project's VM, NOTES.md).
// An LSTM forward at T=100, B=64, H=512 allocated ~50 MiB per call that way: ~12,800 faults, ~19 ms
// of a ~120 ms call. Here a block freed by its tensor goes back to an idle list and the next request
// of its size class takes it, pages already mapped. Blocks of 2 MiB and more ask the kernel for
// transparent huge pages (madvise), which cuts the first touch's faults 512-fold.
//
// Policy: requests under 1 MiB go to torch's CPU allocator (malloc reuses those well). Sizes are
// rounded up to 1/8 of their power of two (at most 12.5% more); a request takes an idle block of its
// class or of up to 1/4 more bytes. At most `cap` bytes are kept idle, the oldest pushed out first
// (FASTRNN_CPU_CACHE_MB, default 1024; 0 turns the cache off; `set_cache_cap` changes it at run time);
// `empty_cache()` frees the idle blocks. Allocations and frees are reported to torch's profiler like the
// CPU allocator's (idle blocks are not: they are reserved, not allocated). Under
// torch.use_deterministic_algorithms a new buffer is filled with NaN, as at::empty does.
#include "recurrence.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>
#include <sys/mman.h>

#include <cstdlib>
#include <limits>
#include <climits>
#include <cstdint>
#include <list>
#include <pthread.h>
#include <mutex>
#include <unordered_map>

namespace fastrnn {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

size_t size_class(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;
  const size_t step = std::max<size_t>(p / 8, 4096);
  return (n + step - 1) / step * step;
}

size_t cap_from_env() {
  const char* s = std::getenv("FASTRNN_CPU_CACHE_MB");
  if (!s || !*s) return size_t(1024) << 20;
  bool ok = true;
  unsigned long long mb = 0;
  for (const char* c = s; *c; ++c) {
    ok = ok && *c >= '0' && *c <= '9' && mb <= ((SIZE_MAX >> 20) - 9) / 10;
    if (ok) mb = mb * 10 + unsigned(*c - '0');
  }
  TORCH_CHECK(ok, "fastrnn: FASTRNN_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", s, "'");
  return size_t(mb) << 20;
}

struct Block {
  size_t size, requested;  // the block's bytes, and what its tensor asked for
};

// Idle blocks wait in the order they came back (oldest first). A request takes the most recent idle
// block of its size class, or failing that the most recent one of up to 1/4 more bytes (a block whose
// tensor's shape changed a little, e.g. another sequence length); a block coming back into a full cache
// pushes the oldest ones out.
class Pool {
 public:
  Pool() : cap_(cap_from_env()) {}

  void* take(size_t n) {
    const size_t cls = size_class(n);
    {
      std::lock_guard<std::mutex> g(mu_);
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it)
        if (it->size >= cls && it->size <= cls + cls / 4 && (best == idle_.end() || it->size <= best->size))
          best = it;  // the last, i.e. most recent, of the smallest fitting size
      if (best != idle_.end()) {
        void* p = best->ptr;
        const size_t size = best->size;
        idle_.erase(best);
        idle_bytes_ -= size;
        hand_out(p, size, n);
        return p;
      }
    }
    void* p = fresh(cls);
    if (!p) {
      empty_cache();
      p = fresh(cls);
    }
    TORCH_CHECK(p, "fastrnn cpp backend: can't allocate memory: you tried to allocate ", n, " bytes");
    std::lock_guard<std::mutex> g(mu_);
    hand_out(p, cls, n);
    return p;
  }

  void give(void* p) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "fastrnn cpp backend: freeing a block the cache did not hand out");
      const Block b = it->second;
      live_.erase(it);
      live_bytes_ -= b.size;
      report(p, -int64_t(b.requested));
      const size_t cap = cap_.load(std::memory_order_relaxed);
      if (b.size > cap) {
        drop.push_back(p);
      } else {
        idle_.push_back({p, b.size});
        idle_bytes_ += b.size;
        evict_locked(cap, drop);
      }
    }
    for (void* q : drop) std::free(q);
  }

  void empty_cache() { trim_to(0); }

  void trim_to(size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      evict_locked(bytes, drop);
    }
    for (void* p : drop) std::free(p);
  }

  std::tuple<int64_t, int64_t, int64_t> info() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(live_bytes_), int64_t(idle_bytes_), int64_t(cap_.load())};
  }

  bool enabled() const { return cap_.load(std::memory_order_relaxed) > 0; }

  size_t set_cap(size_t cap, bool trim) {
    const size_t old = cap_.exchange(cap);
    if (trim) trim_to(cap);
    return old;
  }

  // fork(): the child must not inherit the mutex held by another thread
  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

 private:
  struct Idle {
    void* ptr;
    size_t size;
  };

  static void* fresh(size_t cls) {
    void* p = nullptr;
    if (posix_memalign(&p, cls >= kHugePage ? kHugePage : 64, cls) != 0) return nullptr;
    if (cls >= kHugePage) madvise(p, cls, MADV_HUGEPAGE);  // advice only: no huge pages is fine
    return p;
  }

  void hand_out(void* p, size_t size, size_t n) {  // under mu_
    live_[p] = {size, n};
    live_bytes_ += size;
    report(p, int64_t(n));
  }

  void evict_locked(size_t bytes, std::vector<void*>& drop) {  // oldest first, under mu_
    while (idle_bytes_ > bytes) {
      idle_bytes_ -= idle_.front().size;
      drop.push_back(idle_.front().ptr);
      idle_.pop_front();
    }
  }

  void report(void* p, int64_t bytes) {  // under mu_
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(p, bytes, live_bytes_, live_bytes_ + idle_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mu_;
  std::unordered_map<void*, Block> live_;
  std::list<Idle> idle_;
  size_t live_bytes_ = 0, idle_bytes_ = 0;
  std::atomic<size_t> cap_;
};

// never destroyed: a tensor may hand its block back after static destructors have run
Pool& pool() {
  static Pool* p = [] {
    Pool* q = new Pool();
    pthread_atfork([] { pool().lock(); }, [] { pool().unlock(); }, [] { pool().unlock(); });
    return q;
  }();
  return *p;
}

void give_back(void* p) { pool().give(p); }

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || !pool().enabled()) return c10::GetCPUAllocator()->allocate(n);
    void* p = pool().take(n);
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator& allocator() {
  static PoolAllocator* a = new PoolAllocator();
  return *a;
}

}  // namespace

at::Tensor pool_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const at::ScalarType dtype = c10::typeMetaToScalarType(opts.dtype());
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (nbytes < kMinBytes || !pool().enabled()) return at::empty(sizes, opts);
  at::Tensor t(at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                         c10::nullopt));
  // as at::empty does under torch.use_deterministic_algorithms(True) (fill_uninitialized_memory)
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory())
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

at::Tensor pool_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) { return pool_empty(sizes, opts).zero_(); }

void empty_cache() { pool().empty_cache(); }

int64_t set_cache_cap(int64_t bytes, bool trim) {
  TORCH_CHECK(bytes >= 0, "fastrnn: the cache limit must be >= 0 bytes, got ", bytes);
  return int64_t(pool().set_cap(size_t(bytes), trim));
}

std::tuple<int64_t, int64_t, int64_t> cache_info() { return pool().info(); }

namespace {
at::Tensor empty_op(at::IntArrayRef size, at::ScalarType dtype) {
  return pool_empty(size, at::TensorOptions().dtype(dtype));
}
}  // namespace

TORCH_LIBRARY_IMPL(fastrnn_cpp, CompositeExplicitAutograd, m) { m.impl("empty", &empty_op); }

}  // namespace fastrnn
