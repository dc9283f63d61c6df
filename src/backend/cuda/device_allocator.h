// A caching allocator for device memory. The denoising loop requests the same sizes every step, so
// freed blocks are kept in a free list keyed by their rounded size and handed out again: after the
// first step no cudaMalloc or cudaFree happens. On exhaustion the cache is released and the request
// retried once before it fails with ErrorKind::OutOfMemory.
//
// A recorded CUDA graph bakes the addresses of every buffer its ops used into its replays, so while a
// graph is recorded the allocator serves a Pool: the blocks taken then (from the cache first) stay
// reserved for that graph, freed ones going back to the pool, where the recording reuses them in the
// order every replay repeats. When the graph and its tensors are gone, the pool's blocks return to
// the cache.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace zimage::cuda {

class DeviceAllocator : public std::enable_shared_from_this<DeviceAllocator> {
 public:
  class Pool;

  ~DeviceAllocator();
  // A device buffer of at least `bytes`, returned to the cache (or to the pool it came from) when the
  // last owner lets go.
  std::shared_ptr<void> allocate(size_t bytes);
  void release_cache();  // cudaFree every cached block

  // Blocks for one graph: allocate() serves `pool` until record_into(nullptr).
  std::shared_ptr<Pool> new_pool();
  void record_into(std::shared_ptr<Pool> pool);

  size_t bytes_in_use() const;  // pools' blocks count as in use: nothing else can have them
  size_t peak_bytes_in_use() const;
  size_t bytes_cached() const;
  void reset_peak();

 private:
  static size_t round_size(size_t bytes);
  void* take(size_t size);  // from the cache, else cudaMalloc; counted in use
  void give_back(void* p, size_t bytes);

  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;  // rounded size -> block
  size_t in_use_ = 0, peak_ = 0, cached_ = 0;
  std::shared_ptr<Pool> recording_;
};

}  // namespace zimage::cuda
