#include "server/multipart.h"

#include <algorithm>
#include <optional>

#include "server/http_text.h"

namespace zimage::server {

namespace {

// A header value "type; a=1; b=\"x;y\"": the part before the first ';' and the parameters, names
// lowercased, quoted values unquoted (a backslash escapes the next character). nullopt when a quote is
// not closed.
struct HeaderValue {
  std::string value;
  std::vector<std::pair<std::string, std::string>> params;
  const std::string* param(std::string_view name) const {
    for (const auto& [k, v] : params)
      if (k == name) return &v;
    return nullptr;
  }
};

std::optional<HeaderValue> parse_header_value(std::string_view s) {
  HeaderValue out;
  size_t i = s.find(';');
  out.value = lower(trim(s.substr(0, i)));
  while (i != std::string_view::npos && i < s.size()) {
    ++i;  // past ';'
    const size_t eq = s.find_first_of("=;", i);
    if (eq == std::string_view::npos || s[eq] == ';') {  // a parameter without a value: skipped
      i = eq;
      continue;
    }
    const std::string name = lower(trim(s.substr(i, eq - i)));
    size_t j = eq + 1;
    while (j < s.size() && (s[j] == ' ' || s[j] == '\t')) ++j;
    std::string value;
    if (j < s.size() && s[j] == '"') {
      ++j;
      bool closed = false;
      for (; j < s.size(); ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          value += s[++j];
        } else if (s[j] == '"') {
          closed = true;
          ++j;
          break;
        } else {
          value += s[j];
        }
      }
      if (!closed) return std::nullopt;
      i = s.find(';', j);
    } else {
      i = s.find(';', j);
      value = std::string(trim(s.substr(j, i == std::string_view::npos ? s.npos : i - j)));
    }
    out.params.emplace_back(name, std::move(value));
  }
  return out;
}

MultipartError fail(std::string message) { return {std::move(message)}; }

}  // namespace

std::variant<std::string, MultipartError> multipart_boundary(std::string_view content_type,
                                                             const MultipartLimits& limits) {
  const auto v = parse_header_value(content_type);
  if (!v) return fail("the Content-Type header has an unclosed quote");
  if (v->value != "multipart/form-data")
    return fail("the body must be multipart/form-data, got Content-Type \"" + std::string(content_type.substr(0, 100)) +
                "\"");
  const std::string* boundary = v->param("boundary");
  if (!boundary || boundary->empty()) return fail("the multipart/form-data Content-Type has no boundary");
  if (boundary->size() > limits.max_boundary_bytes)
    return fail("the multipart boundary is over " + std::to_string(limits.max_boundary_bytes) + " characters");
  for (char c : *boundary)
    if (c == '\r' || c == '\n') return fail("the multipart boundary holds a line break");
  return *boundary;
}

std::variant<std::vector<FormPart>, MultipartError> parse_multipart(std::string_view content_type,
                                                                    std::string_view body,
                                                                    const MultipartLimits& limits) {
  auto b = multipart_boundary(content_type, limits);
  if (auto* e = std::get_if<MultipartError>(&b)) return *e;
  const std::string delimiter = "--" + std::get<std::string>(b);
  const std::string inner = "\r\n" + delimiter;  // a delimiter after the first starts a line

  // The first delimiter: at the very start, or at the start of a line of the preamble.
  size_t pos;
  if (body.substr(0, delimiter.size()) == delimiter) {
    pos = delimiter.size();
  } else {
    const size_t at = body.find(inner);
    if (at == std::string_view::npos) return fail("the multipart body holds no boundary line");
    pos = at + inner.size();
  }

  std::vector<FormPart> parts;
  for (;;) {
    // After a delimiter: "--" closes the body, else optional whitespace and a line break.
    if (body.substr(pos, 2) == "--") return parts;
    while (pos < body.size() && (body[pos] == ' ' || body[pos] == '\t')) ++pos;
    if (body.substr(pos, 2) != kCrlf) return fail("malformed multipart body (no line break after a boundary)");
    pos += 2;
    if (parts.size() == limits.max_parts)
      return fail("the multipart body has more than " + std::to_string(limits.max_parts) + " parts");

    // The part's headers, up to an empty line (none at all: the empty line comes first).
    size_t headers_end;
    if (body.substr(pos, 2) == kCrlf) {
      headers_end = pos;
    } else {
      headers_end = body.substr(pos, limits.max_part_header_bytes + 4).find("\r\n\r\n");
      if (headers_end == std::string_view::npos) {
        if (body.size() - pos > limits.max_part_header_bytes)
          return fail("the headers of multipart part " + std::to_string(parts.size() + 1) + " are over " +
                      std::to_string(limits.max_part_header_bytes) + " bytes");
        return fail("malformed multipart body (a part's headers do not end)");
      }
      headers_end += pos + 2;  // at the empty line's CRLF
    }
    FormPart part;
    bool disposition = false;
    for (std::string_view headers = body.substr(pos, headers_end - pos); !headers.empty();) {
      const size_t eol = headers.find(kCrlf);
      const std::string_view line = headers.substr(0, eol);
      headers = eol == std::string_view::npos ? std::string_view() : headers.substr(eol + 2);
      const size_t colon = line.find(':');
      if (colon == std::string_view::npos || colon == 0)
        return fail("malformed header line in multipart part " + std::to_string(parts.size() + 1));
      const std::string name = lower(trim(line.substr(0, colon)));
      const auto value = parse_header_value(trim(line.substr(colon + 1)));
      if (!value)
        return fail("a header of multipart part " + std::to_string(parts.size() + 1) + " has an unclosed quote");
      if (name == "content-disposition") {
        if (value->value != "form-data")
          return fail("multipart part " + std::to_string(parts.size() + 1) + " is not form-data");
        const std::string* field = value->param("name");
        if (!field) return fail("multipart part " + std::to_string(parts.size() + 1) + " has no field name");
        part.name = *field;
        if (const std::string* file = value->param("filename")) {
          part.filename = *file;
          part.has_filename = true;
        }
        disposition = true;
      } else if (name == "content-type") {
        part.content_type = value->value;
      }
    }
    if (!disposition)
      return fail("multipart part " + std::to_string(parts.size() + 1) + " has no Content-Disposition header");

    // The content, up to the next delimiter line.
    const size_t data = headers_end + 2;
    const size_t end = body.find(inner, data);
    if (end == std::string_view::npos) return fail("the multipart body ends without its closing boundary");
    if (end - data > limits.max_part_bytes)
      return fail("multipart part \"" + part.name.substr(0, 100) + "\" is over " +
                  std::to_string(limits.max_part_bytes) + " bytes");
    part.data = body.substr(data, end - data);
    parts.push_back(std::move(part));
    pos = end + inner.size();
  }
}

}  // namespace zimage::server
