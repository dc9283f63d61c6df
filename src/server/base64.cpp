#include "server/base64.h"

#include <openssl/evp.h>

#include <climits>
#include <cstdint>

#include "core/error.h"

namespace zimage::server {

std::string base64_encode(std::string_view bytes) {
  // EVP_EncodeBlock takes an int length; images are far below 1.5 GiB, but say so rather than wrap.
  ZI_CHECK(bytes.size() <= size_t(INT_MAX) / 4 * 3, ErrorKind::InvalidArgument, "too large to base64-encode");
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');  // + the NUL that EVP_EncodeBlock writes
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()), int(bytes.size()));
  out.resize(size_t(n));
  return out;
}

std::optional<std::string> base64_decode(std::string_view text) {
  if (text.size() % 4) return std::nullopt;
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    // "xx==" and "xxx=" only in the last quad.
    const int pad = last && text[i + 3] == '=' ? (text[i + 2] == '=' ? 2 : 1) : 0;
    uint32_t quad = 0;
    for (int k = 0; k < 4; ++k) {
      const int v = k >= 4 - pad ? 0 : value(text[i + size_t(k)]);
      if (v < 0) return std::nullopt;
      quad = quad << 6 | uint32_t(v);
    }
    out.push_back(char(quad >> 16));
    if (pad < 2) out.push_back(char(quad >> 8 & 0xFF));
    if (pad < 1) out.push_back(char(quad & 0xFF));
  }
  return out;
}

}  // namespace zimage::server
