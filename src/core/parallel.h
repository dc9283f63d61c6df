// parallel_for over [0, n) on a fixed pool of worker threads (hardware_concurrency by default,
// ZIMAGE_THREADS to override). Used by the CPU backend for the loops that BLAS does not cover.
#pragma once

#include <cstdint>
#include <functional>

namespace zimage {

int num_threads();
// Calls fn(begin, end) on disjoint chunks covering [0, n). Chunks hold at least `grain` items.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace zimage
