#include "server/request_id.h"

#include <openssl/rand.h>

#include <algorithm>
#include <cctype>
#include <string_view>

#include "core/error.h"

namespace zimage::server {

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

std::string request_id(const std::string& incoming) {
  constexpr size_t kMaxLength = 128;
  auto fits = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::string_view("._:+=/-").find(c) != std::string_view::npos;
  };
  if (!incoming.empty() && incoming.size() <= kMaxLength && std::all_of(incoming.begin(), incoming.end(), fits))
    return incoming;
  return random_id();
}

}  // namespace zimage::server
