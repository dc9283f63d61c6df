// A bounded multipart/form-data parser (RFC 7578 over RFC 2046), for the uploads of
// POST /v1/images/edits. The whole body is already in memory (RequestReader held it to the body
// limit); this finds the parts without copying them and holds what httplib 0.11 does not: the number
// of parts, the size of each part's headers, and the size of each part. Pure: no sockets, no
// exceptions out, so it can be fuzzed alone (fuzz/fuzz_multipart.cpp).
#pragma once

#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace zimage::server {

struct MultipartLimits {
  size_t max_parts = 32;
  size_t max_part_header_bytes = 4096;       // all header lines of one part
  size_t max_part_bytes = size_t(64) << 20;  // one part's content
  size_t max_boundary_bytes = 70;            // RFC 2046's limit
};

// One form field: views into the body given to parse_multipart (valid while it lives).
struct FormPart {
  std::string name;           // Content-Disposition: form-data; name="..."
  std::string filename;       // filename="..." (empty for a plain field)
  bool has_filename = false;  // filename= present (a file upload, possibly with an empty name)
  std::string content_type;   // the part's Content-Type, lowercased, without parameters; empty if none
  std::string_view data;
};

struct MultipartError {
  std::string message;
};

// The boundary of a Content-Type "multipart/form-data; boundary=..." (quoted or not; parameters in any
// order and case), or the reason there is none.
std::variant<std::string, MultipartError> multipart_boundary(std::string_view content_type,
                                                             const MultipartLimits& limits = {});

// Every part of `body`, in order. The preamble before the first boundary and the epilogue after the
// last are ignored, as RFC 2046 says; a body without the closing boundary is an error.
std::variant<std::vector<FormPart>, MultipartError> parse_multipart(std::string_view content_type,
                                                                    std::string_view body,
                                                                    const MultipartLimits& limits = {});

}  // namespace zimage::server
