#include "server/image_store.h"

#include "server/request_id.h"

namespace zimage::server {

ImageStore::ImageStore(std::chrono::seconds ttl, size_t max_images) : ttl_(ttl), max_images_(max_images) {}

void ImageStore::evict(Clock::time_point now) {
  while (!order_.empty()) {
    auto it = images_.find(order_.front());
    if (it != images_.end() && it->second.expires > now && images_.size() <= max_images_) break;
    if (it != images_.end()) images_.erase(it);
    order_.pop_front();
  }
}

std::string ImageStore::put(std::string bytes, std::string content_type) {
  std::string id = random_id();
  auto now = Clock::now();
  std::lock_guard<std::mutex> lock(mutex_);
  images_[id] = {{std::make_shared<const std::string>(std::move(bytes)), std::move(content_type)}, now + ttl_};
  order_.push_back(id);
  evict(now);
  return id;
}

std::optional<StoredImage> ImageStore::get(const std::string& id) {
  std::lock_guard<std::mutex> lock(mutex_);
  evict(Clock::now());
  auto it = images_.find(id);
  if (it == images_.end()) return std::nullopt;
  return it->second.image;
}

size_t ImageStore::size() {
  std::lock_guard<std::mutex> lock(mutex_);
  evict(Clock::now());
  return images_.size();
}

}  // namespace zimage::server
