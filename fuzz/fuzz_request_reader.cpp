// Input: the bytes a client sends on one connection, through RequestReader (the layer in front of
// httplib) over a socketpair: every request it returns must be normalized (one Content-Length equal to
// the body that follows, no Transfer-Encoding or Content-Encoding, a multipart Content-Type moved to
// kFormContentType) with the body within the limit; errors carry a status and a message.
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <variant>

#include "fuzz_common.h"
#include "server/request_reader.h"

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage::server;
  if (size > 48 * 1024) return 0;  // within a socketpair's buffer: written whole before reading
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return 0;
  size_t sent = 0;
  while (sent < size) {
    const ssize_t n = write(fds[1], data + sent, size - sent);
    if (n <= 0) break;
    sent += size_t(n);
  }
  shutdown(fds[1], SHUT_WR);

  ReadLimits limits;
  limits.max_head_bytes = 1024;
  limits.max_body_bytes = 4096;
  RequestReader reader(fds[0], limits);
  const std::atomic<bool> stopping{false};
  for (int i = 0; i < 16; ++i) {
    auto r = reader.next(std::chrono::steady_clock::now() + std::chrono::seconds(2), stopping);
    if (std::holds_alternative<ConnectionDone>(r)) break;
    if (const auto* e = std::get_if<HttpReadError>(&r)) {
      FUZZ_CHECK(e->status >= 400 && e->status < 600 && !e->message.empty());
      break;
    }
    const std::string& out = std::get<std::string>(r);
    const size_t head_end = out.find("\r\n\r\n");
    FUZZ_CHECK(head_end != std::string::npos);
    const std::string head = lower(out.substr(0, head_end + 2));
    const size_t cl = head.rfind("\r\ncontent-length: ");
    FUZZ_CHECK(cl != std::string::npos);
    const size_t body = out.size() - head_end - 4;
    FUZZ_CHECK(head.substr(cl + 18, head.find("\r\n", cl + 2) - cl - 18) == std::to_string(body));
    FUZZ_CHECK(body <= limits.max_body_bytes);
    FUZZ_CHECK(head.find("\r\ntransfer-encoding:") == std::string::npos);
    FUZZ_CHECK(head.find("\r\ncontent-encoding:") == std::string::npos);
    FUZZ_CHECK(head.find("\r\ncontent-type: multipart/") == std::string::npos);
  }
  close(fds[0]);
  close(fds[1]);
  return 0;
}
