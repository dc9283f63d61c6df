// Base64 (RFC 4648, with padding) for b64_json answers, through OpenSSL's encoder.
#pragma once

#include <string>
#include <string_view>

namespace zimage::server {

std::string base64_encode(std::string_view bytes);

}  // namespace zimage::server
