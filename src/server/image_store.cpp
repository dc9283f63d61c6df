#include "server/image_store.h"

#include <openssl/rand.h>

#include "core/error.h"

namespace zimage::server {

namespace {

// Unguessable: an id is all it takes to fetch someone's image.
std::string random_id() {
  unsigned char bytes[16];
  ZI_CHECK(RAND_bytes(bytes, sizeof bytes) == 1, ErrorKind::Internal, "the OpenSSL random generator failed");
  static const char hex[] = "0123456789abcdef";
  std::string id;
  for (unsigned char b : bytes) {
    id += hex[b >> 4];
    id += hex[b & 15];
  }
  return id;
}

}  // namespace

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
