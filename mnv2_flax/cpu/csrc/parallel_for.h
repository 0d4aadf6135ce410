// ParallelFor over XLA's CPU intra-op thread pool and a reproducible sum
// built on it, shared by the kernels in this directory.

#ifndef MNV2_FLAX_CSRC_PARALLEL_FOR_H_
#define MNV2_FLAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace mnv2 {

// Runs body(begin, end) over [0, total) in chunks, on the calling thread and
// the XLA intra-op pool. Chunks are claimed from a shared counter, so the
// call returns once every chunk is done even if a pool task never starts; a
// task that starts late finds nothing left and touches no buffer.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total,
                        int64_t grain,
                        const std::function<void(int64_t, int64_t)>& body) {
  int64_t chunks = (total + grain - 1) / grain;
  int64_t threads = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (threads <= 0) {
    body(0, total);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    const std::function<void(int64_t, int64_t)>* body;
    int64_t chunks, grain, total;
  };
  auto state = std::make_shared<State>();
  state->body = &body;
  state->chunks = chunks;
  state->grain = grain;
  state->total = total;
  auto work = [](State& s) {
    for (;;) {
      int64_t k = s.next.fetch_add(1);
      if (k >= s.chunks) return;
      int64_t begin = k * s.grain;
      (*s.body)(begin, std::min(begin + s.grain, s.total));
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < threads; ++t) {
    pool.Schedule([state, work]() { work(*state); });
  }
  work(*state);
  while (state->done.load(std::memory_order_acquire) < chunks) {
    std::this_thread::yield();
  }
}

// Sums over [0, total) cut into at most 16 fixed ranges: part(begin, end,
// acc) adds its range into `acc` (width zeroed values, one per range), the
// ranges run in parallel and are added in range order into out[0, width).
// The result does not depend on the number of threads or on scheduling.
template <typename T, typename F>
void SumOverRanges(xla::ffi::ThreadPool& pool, int64_t total, int64_t width,
                   F&& part, T* out) {
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(total, 16));
  const int64_t per_range = (total + ranges - 1) / ranges;
  std::vector<T> partial(ranges * width, T(0));
  ParallelFor(pool, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      part(r * per_range, std::min(total, (r + 1) * per_range),
           partial.data() + r * width);
    }
  });
  std::fill(out, out + width, T(0));
  for (int64_t r = 0; r < ranges; ++r) {
    const T* src = partial.data() + r * width;
    for (int64_t i = 0; i < width; ++i) out[i] += src[i];
  }
}

}  // namespace mnv2

#endif  // MNV2_FLAX_CSRC_PARALLEL_FOR_H_
