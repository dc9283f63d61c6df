// A caching allocator for device memory. The denoising loop requests the same sizes every step, so
// freed blocks are kept in a free list keyed by their rounded size and handed out again: after the
// first step no cudaMalloc or cudaFree happens. On exhaustion the cache is released and the request
// retried once before it fails with ErrorKind::OutOfMemory.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace zimage::cuda {

class DeviceAllocator : public std::enable_shared_from_this<DeviceAllocator> {
 public:
  ~DeviceAllocator();
  // A device buffer of at least `bytes`, returned to the cache when the last owner lets go.
  std::shared_ptr<void> allocate(size_t bytes);
  void release_cache();  // cudaFree every cached block

  size_t bytes_in_use() const;
  size_t peak_bytes_in_use() const;
  size_t bytes_cached() const;
  void reset_peak();

 private:
  static size_t round_size(size_t bytes);
  void give_back(void* p, size_t bytes);

  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;  // rounded size -> block
  size_t in_use_ = 0, peak_ = 0, cached_ = 0;
};

}  // namespace zimage::cuda
