#include "backend/cuda/device_allocator.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

DeviceAllocator::~DeviceAllocator() { release_cache(); }

size_t DeviceAllocator::round_size(size_t bytes) {
  // Small buffers to 512 B, large ones to 2 MiB: few distinct sizes, little waste at our shapes.
  const size_t small = 512, large = size_t(2) << 20;
  if (bytes < (size_t(1) << 20)) return std::max(small, (bytes + small - 1) / small * small);
  return (bytes + large - 1) / large * large;
}

class DeviceAllocator::Pool {
 public:
  explicit Pool(std::weak_ptr<DeviceAllocator> owner) : owner_(std::move(owner)) {}
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  // Runs when the graph and every tensor allocated from the pool are gone: all blocks are free.
  ~Pool() {
    auto owner = owner_.lock();
    for (auto& [size, p] : free_)
      if (owner)
        owner->give_back(p, size);
      else
        cudaFree(p);
  }
  void* take(size_t size) {
    std::lock_guard<std::mutex> l(mu_);
    auto it = free_.find(size);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    return p;
  }
  void put(void* p, size_t size) {
    std::lock_guard<std::mutex> l(mu_);
    free_.emplace(size, p);
  }

 private:
  std::weak_ptr<DeviceAllocator> owner_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
};

std::shared_ptr<DeviceAllocator::Pool> DeviceAllocator::new_pool() { return std::make_shared<Pool>(weak_from_this()); }

void DeviceAllocator::record_into(std::shared_ptr<Pool> pool) {
  std::lock_guard<std::mutex> l(mu_);
  recording_ = std::move(pool);
}

void* DeviceAllocator::take(size_t size) {
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = free_.find(size);
    if (it != free_.end()) {
      p = it->second;
      free_.erase(it);
      cached_ -= size;
    }
  }
  if (!p) {
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the sticky-free error state of this failure
      release_cache();
      e = cudaMalloc(&p, size);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      if (e != cudaErrorMemoryAllocation)
        throw Error(ErrorKind::Backend,
                    "cudaMalloc of " + std::to_string(size) + " bytes failed: " + cudaGetErrorString(e));
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw Error(ErrorKind::OutOfMemory, "out of GPU memory allocating " + std::to_string(size >> 20) + " MiB (" +
                                              std::to_string(free_b >> 20) + " MiB free of " +
                                              std::to_string(total_b >> 20) + " MiB; " + std::to_string(in_use_ >> 20) +
                                              " MiB in use by the engine)");
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  in_use_ += size;
  peak_ = std::max(peak_, in_use_);
  return p;
}

std::shared_ptr<void> DeviceAllocator::allocate(size_t bytes) {
  const size_t size = round_size(bytes);
  std::shared_ptr<Pool> pool;
  {
    std::lock_guard<std::mutex> l(mu_);
    pool = recording_;
  }
  if (pool) {
    void* p = pool->take(size);
    if (!p) p = take(size);
    return std::shared_ptr<void>(p, [pool, size](void* q) { pool->put(q, size); });
  }
  void* p = take(size);
  std::weak_ptr<DeviceAllocator> self = weak_from_this();
  return std::shared_ptr<void>(p, [self, size](void* q) {
    if (auto a = self.lock()) a->give_back(q, size);
    else cudaFree(q);
  });
}

void DeviceAllocator::give_back(void* p, size_t bytes) {
  std::lock_guard<std::mutex> l(mu_);
  in_use_ -= bytes;
  cached_ += bytes;
  free_.emplace(bytes, p);
}

void DeviceAllocator::release_cache() {
  std::lock_guard<std::mutex> l(mu_);
  if (!free_.empty()) cudaDeviceSynchronize();  // blocks may still be read by queued work
  for (auto& kv : free_) cudaFree(kv.second);
  free_.clear();
  cached_ = 0;
}

size_t DeviceAllocator::bytes_in_use() const {
  std::lock_guard<std::mutex> l(mu_);
  return in_use_;
}
size_t DeviceAllocator::peak_bytes_in_use() const {
  std::lock_guard<std::mutex> l(mu_);
  return peak_;
}
size_t DeviceAllocator::bytes_cached() const {
  std::lock_guard<std::mutex> l(mu_);
  return cached_;
}
void DeviceAllocator::reset_peak() {
  std::lock_guard<std::mutex> l(mu_);
  peak_ = in_use_;
}

}  // namespace zimage::cuda
