// Reads HTTP/1.1 requests off one client connection before cpp-httplib parses them, to hold the limits
// that httplib 0.11 does not: its body limit counts the bytes on the wire of a Content-Length body only
// (a chunked body or a gzip body that inflates to any size passes), it accepts two different or a
// negative Content-Length, and its read timeout is per recv() (a client sending one byte a second keeps
// a connection forever). Here a request must arrive whole by a deadline, its decoded body must fit
// max_body_bytes, and it comes out normalized: the request line and headers as sent, less
// Content-Length, Transfer-Encoding, Content-Encoding and Expect, plus "Content-Length: <decoded size>",
// then the decoded body. Bytes after the request (a pipelined next one) stay for the next call.
// A multipart Content-Type comes out as kFormContentType instead (and a client's own header of that
// name is dropped): httplib parses a multipart/form-data body itself, with no bound on its parts, while
// the edits handler parses it with ours (multipart.h) from the body left whole.
#pragma once

#include <atomic>
#include <chrono>
#include <string>
#include <variant>

namespace zimage::server {

inline constexpr const char* kFormContentType = "X-Zimage-Form-Content-Type";

struct ReadLimits {
  size_t max_head_bytes = 16 * 1024;        // request line and headers
  size_t max_body_bytes = size_t(1) << 20;  // after chunked and gzip/deflate decoding
};

// A request that cannot be served: answered with `status` and `message`, then the connection closes.
struct HttpReadError {
  int status;
  std::string message;
};

// The client closed the connection, or sent nothing by the deadline, before a request began.
struct ConnectionDone {};

class RequestReader {
 public:
  RequestReader(int fd, ReadLimits limits);

  using Result = std::variant<std::string, HttpReadError, ConnectionDone>;
  // The next whole request, normalized, if it arrives by `deadline` (a late one is 408). While no byte
  // of it has arrived, `stopping` being set also ends the wait (ConnectionDone).
  Result next(std::chrono::steady_clock::time_point deadline, const std::atomic<bool>& stopping);

 private:
  enum class Wait { Data, Closed, TimedOut, Stopping };
  // Appends what the socket has to buffer_, waiting until `deadline` for at least one byte.
  Wait fill(std::chrono::steady_clock::time_point deadline, const std::atomic<bool>* stopping);

  int fd_;
  ReadLimits limits_;
  std::string buffer_;  // read but not yet consumed
};

// `body` inflated from gzip or zlib ("deflate") framing, or an error (400 when it is not such data, 413
// when it inflates beyond `max_bytes`).
std::variant<std::string, HttpReadError> inflate_body(const std::string& body, size_t max_bytes);

}  // namespace zimage::server
