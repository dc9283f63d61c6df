// Small text helpers of the HTTP layer's own parsers (request_reader, multipart): header names and
// parameter names compare case-insensitively, and header values lose their optional whitespace.
#pragma once

#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>

namespace zimage::server {

inline constexpr std::string_view kCrlf = "\r\n";

// ASCII lower case (header and parameter names are ASCII).
inline std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return out;
}

// Without leading and trailing spaces and tabs (RFC 9110's OWS).
inline std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

}  // namespace zimage::server
