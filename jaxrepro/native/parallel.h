// Threading for jaxrepro's XLA:CPU kernels (every .cc here): fixed work
// items run on XLA's intra-op thread pool, each with flush-to-zero and
// denormals-are-zero on, as XLA:CPU's own code runs.

#ifndef JAXREPRO_PARALLEL_H_
#define JAXREPRO_PARALLEL_H_

#include <xmmintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxrepro {

// Flush-to-zero and denormals-are-zero for the lifetime of the object.
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
};

// Runs item(k) for k in [0, count) on the caller and on the pool's threads. The
// caller takes items too, so the call finishes even when no pool thread is free; it
// then waits only for the items a pool thread has already taken.
struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Item>
void TakeItems(Progress& progress, int64_t count, const Item& item) {
  FlushDenormals flush;
  for (int64_t k; (k = progress.next.fetch_add(1)) < count;) {
    item(k);
    progress.done.fetch_add(1, std::memory_order_release);
  }
}

template <typename Item>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, const Item& item) {
  auto progress = std::make_shared<Progress>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    // A helper that starts after the last item was taken returns at once: it never
    // touches `item`, and its copy of the pointer keeps `progress` alive.
    pool.Schedule([progress, count, &item]() {
      if (progress->next.load() < count) TakeItems(*progress, count, item);
    });
  }
  TakeItems(*progress, count, item);
  while (progress->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace jaxrepro

#endif  // JAXREPRO_PARALLEL_H_
