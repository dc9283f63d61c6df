// Images of `response_format: url` answers, kept in memory until GET /v1/images/{id}/content fetches
// them: each for at most `ttl`, and at most `max_images` at a time (the oldest go first), so a client
// that never fetches cannot grow the server's memory without bound. Ids are 128 random bits.
#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

namespace zimage::server {

struct StoredImage {
  std::shared_ptr<const std::string> bytes;  // the encoded file; shared so a GET copies nothing under the lock
  std::string content_type;                  // image/png, image/jpeg, image/webp
};

class ImageStore {
 public:
  using Clock = std::chrono::steady_clock;

  ImageStore(std::chrono::seconds ttl, size_t max_images);

  std::string put(std::string bytes, std::string content_type);  // returns the id
  std::optional<StoredImage> get(const std::string& id);         // nullopt: unknown, expired or evicted
  size_t size();

 private:
  void evict(Clock::time_point now);  // with mutex_ held

  struct Entry {
    StoredImage image;
    Clock::time_point expires;
  };
  std::chrono::seconds ttl_;
  size_t max_images_;
  std::mutex mutex_;
  std::unordered_map<std::string, Entry> images_;
  std::deque<std::string> order_;  // ids, oldest first (a put's expiry is never earlier than an older put's)
};

}  // namespace zimage::server
