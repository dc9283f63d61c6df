#include "server/request_reader.h"

#include <poll.h>
#include <sys/socket.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <optional>
#include <string_view>

#include "server/http_text.h"

namespace zimage::server {

namespace {

using Clock = std::chrono::steady_clock;

// Decimal digits only (no sign, no spaces); saturates at UINT64_MAX, which is over any limit.
std::optional<uint64_t> parse_length(std::string_view s) {
  if (s.empty()) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v > (UINT64_MAX - 9) / 10 ? UINT64_MAX : v * 10 + uint64_t(c - '0');
  }
  return v;
}

// A chunk-size line "1a;name=value": the hex size, extensions ignored; saturates like parse_length.
std::optional<uint64_t> parse_chunk_size(std::string_view line) {
  line = trim(line.substr(0, line.find(';')));
  if (line.empty() || line.size() > 16) return std::nullopt;
  uint64_t v = 0;
  for (char c : line) {
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (d < 0) return std::nullopt;
    v = v * 16 + uint64_t(d);
  }
  return v;
}

HttpReadError too_large(size_t max) {
  return {413, "the request body is over the limit of " + std::to_string(max) + " bytes (after decoding)"};
}

}  // namespace

RequestReader::RequestReader(int fd, ReadLimits limits) : fd_(fd), limits_(limits) {}

RequestReader::Wait RequestReader::fill(Clock::time_point deadline, const std::atomic<bool>* stopping) {
  for (;;) {
    const auto now = Clock::now();
    if (now >= deadline) return Wait::TimedOut;
    if (stopping && stopping->load()) return Wait::Stopping;
    // While waiting for a request to begin, look at `stopping` every 100 ms.
    auto wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    if (stopping) wait_ms = std::min<int64_t>(wait_ms, 100);
    pollfd p{fd_, POLLIN, 0};
    const int ready = poll(&p, 1, int(wait_ms));
    if (ready < 0 && errno != EINTR) return Wait::Closed;
    if (ready <= 0) continue;
    char chunk[64 * 1024];
    const ssize_t n = recv(fd_, chunk, sizeof chunk, 0);
    if (n > 0) {
      buffer_.append(chunk, size_t(n));
      return Wait::Data;
    }
    if (n == 0 || (errno != EINTR && errno != EAGAIN)) return Wait::Closed;
  }
}

RequestReader::Result RequestReader::next(Clock::time_point deadline, const std::atomic<bool>& stopping) {
  const HttpReadError late{408, "the request did not arrive within the server's read timeout"};
  // Once a request has begun, waiting for more of it ends only with data, the deadline or the client.
  auto more = [&](const char* part) -> std::optional<HttpReadError> {
    switch (fill(deadline, nullptr)) {
      case Wait::Data: return std::nullopt;
      case Wait::TimedOut: return late;
      default: return HttpReadError{400, std::string("the connection closed in the middle of the request ") + part};
    }
  };

  // Request line and headers. Empty lines before a request line are ignored, as RFC 9112 allows.
  size_t head_end;
  for (;;) {
    while (buffer_.compare(0, 2, kCrlf) == 0) buffer_.erase(0, 2);
    head_end = buffer_.find("\r\n\r\n");
    if (head_end != std::string::npos) break;
    if (buffer_.size() > limits_.max_head_bytes)
      return HttpReadError{
          431, "the request line and headers are over " + std::to_string(limits_.max_head_bytes) + " bytes"};
    const bool begun = !buffer_.empty();
    const Wait w = fill(deadline, begun ? nullptr : &stopping);
    if (w == Wait::Data) continue;
    if (!begun) return ConnectionDone{};
    if (w == Wait::TimedOut) return late;
    return HttpReadError{400, "the connection closed in the middle of the request headers"};
  }
  if (head_end > limits_.max_head_bytes)
    return HttpReadError{431,
                         "the request line and headers are over " + std::to_string(limits_.max_head_bytes) + " bytes"};

  const std::string_view head(buffer_.data(), head_end);
  size_t line_end = head.find(kCrlf);
  std::string out(head.substr(0, line_end));
  out += kCrlf;
  std::optional<uint64_t> length;
  bool chunked = false, expect_continue = false;
  std::string encoding;
  while (line_end != std::string_view::npos) {
    const size_t begin = line_end + 2;
    line_end = head.find(kCrlf, begin);
    const std::string_view line = head.substr(begin, line_end == std::string_view::npos ? head.npos : line_end - begin);
    if (line.front() == ' ' || line.front() == '\t')
      return HttpReadError{400, "folded header lines (starting with a space) are not accepted"};
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0)
      return HttpReadError{400, "malformed header line (no \"name: value\")"};
    const std::string name = lower(trim(line.substr(0, colon)));
    const std::string_view value = trim(line.substr(colon + 1));
    if (name == "content-length") {
      // A list ("5, 5") is one value sent twice; every value must be the same.
      for (std::string_view rest = value; !rest.empty();) {
        const size_t comma = rest.find(',');
        const std::string_view item = trim(rest.substr(0, comma));
        rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
        const auto v = parse_length(item);
        if (!v)
          return HttpReadError{400, "Content-Length must be a non-negative integer, got \"" + std::string(item) + "\""};
        if (length && *length != *v)
          return HttpReadError{400, "two different Content-Length values (" + std::to_string(*length) + " and " +
                                        std::to_string(*v) + ")"};
        length = v;
      }
      if (!length) return HttpReadError{400, "Content-Length is empty"};
    } else if (name == "transfer-encoding") {
      if (lower(value) != "chunked")
        return HttpReadError{501, "Transfer-Encoding \"" + std::string(value) + "\" is not supported (only chunked)"};
      chunked = true;
    } else if (name == "content-encoding") {
      const std::string e = lower(value);
      if (!encoding.empty() && encoding != e) return HttpReadError{415, "more than one Content-Encoding"};
      encoding = e;
    } else if (name == "expect") {
      expect_continue = lower(value) == "100-continue";
    } else if (name == "content-type" && lower(value.substr(0, 10)) == "multipart/") {
      out += std::string(kFormContentType) + ": ";
      out.append(value);
      out += kCrlf;
    } else if (name == lower(kFormContentType)) {
      // Only this reader writes it.
    } else {
      out.append(line);
      out += kCrlf;
    }
  }
  if (chunked && length)
    return HttpReadError{400, "both Content-Length and Transfer-Encoding: chunked; a request has one or the other"};
  const bool inflate = encoding == "gzip" || encoding == "x-gzip" || encoding == "deflate";
  if (!encoding.empty() && encoding != "identity" && !inflate)
    return HttpReadError{415, "Content-Encoding \"" + encoding + "\" is not supported (gzip, deflate or none)"};
  // The body on the wire is held to the limit too: no encoding shrinks a body that would fit.
  if (length && *length > limits_.max_body_bytes) return too_large(limits_.max_body_bytes);
  buffer_.erase(0, head_end + 4);
  if (expect_continue && (chunked || length.value_or(0) > 0) && buffer_.empty()) {
    static constexpr std::string_view go_on = "HTTP/1.1 100 Continue\r\n\r\n";
    (void)send(fd_, go_on.data(), go_on.size(), MSG_NOSIGNAL);
  }

  std::string body;
  if (chunked) {
    size_t pos = 0;  // consumed of buffer_: whole chunks only
    bool last = false;
    while (!last) {
      const size_t eol = buffer_.find(kCrlf, pos);
      if (eol == std::string::npos) {
        if (buffer_.size() - pos > 1024) return HttpReadError{400, "malformed chunked body (chunk size line)"};
        if (auto e = more("body")) return *e;
        continue;
      }
      const auto size = parse_chunk_size(std::string_view(buffer_).substr(pos, eol - pos));
      if (!size) return HttpReadError{400, "malformed chunked body (chunk size line)"};
      if (*size > limits_.max_body_bytes - body.size()) return too_large(limits_.max_body_bytes);
      if (*size == 0) {  // the last chunk, then trailer lines up to an empty one
        size_t t = eol + 2;
        for (;;) {
          const size_t trailer_end = buffer_.find(kCrlf, t);
          if (trailer_end == std::string::npos) {
            if (buffer_.size() - t > limits_.max_head_bytes) return HttpReadError{431, "the trailers are too long"};
            if (auto e = more("body")) return *e;
            continue;
          }
          const bool blank = trailer_end == t;
          t = trailer_end + 2;
          if (blank) break;
        }
        pos = t;
        last = true;
        continue;
      }
      const size_t data = eol + 2, end = data + size_t(*size);
      if (buffer_.size() < end + 2) {
        if (auto e = more("body")) return *e;
        continue;
      }
      if (buffer_.compare(end, 2, kCrlf) != 0) return HttpReadError{400, "malformed chunked body (no CRLF after data)"};
      body.append(buffer_, data, size_t(*size));
      pos = end + 2;
    }
    buffer_.erase(0, pos);
  } else {
    const size_t n = size_t(length.value_or(0));
    while (buffer_.size() < n)
      if (auto e = more("body")) return *e;
    body = buffer_.substr(0, n);
    buffer_.erase(0, n);
  }
  if (inflate) {
    auto inflated = inflate_body(body, limits_.max_body_bytes);
    if (auto* e = std::get_if<HttpReadError>(&inflated)) return *e;
    body = std::get<std::string>(std::move(inflated));
  }
  out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
  out += body;
  return out;
}

std::variant<std::string, HttpReadError> inflate_body(const std::string& body, size_t max_bytes) {
  z_stream z{};
  if (inflateInit2(&z, 15 + 32) != Z_OK) return HttpReadError{500, "cannot start zlib"};  // 32: gzip or zlib header
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(body.data()));
  z.avail_in = uInt(body.size());
  std::string out;
  int rc = Z_OK;
  while (rc != Z_STREAM_END) {
    char chunk[64 * 1024];
    z.next_out = reinterpret_cast<Bytef*>(chunk);
    z.avail_out = sizeof chunk;
    rc = inflate(&z, Z_NO_FLUSH);
    const size_t got = sizeof chunk - z.avail_out;
    if (rc != Z_OK && rc != Z_STREAM_END) {
      inflateEnd(&z);
      return HttpReadError{400, "the request body is not valid gzip/deflate data"};
    }
    if (got > max_bytes - out.size()) {
      inflateEnd(&z);
      return too_large(max_bytes);
    }
    out.append(chunk, got);
  }
  inflateEnd(&z);
  return out;
}

}  // namespace zimage::server
