// Base64 (RFC 4648, with padding) for b64_json answers, through OpenSSL's encoder.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace zimage::server {

std::string base64_encode(std::string_view bytes);

// Strict RFC 4648 base64 (the standard alphabet, padded to a multiple of 4): the decoded bytes, or
// nullopt for any other character, a bad length or misplaced padding.
std::optional<std::string> base64_decode(std::string_view text);

}  // namespace zimage::server
