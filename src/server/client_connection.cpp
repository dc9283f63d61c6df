#include "server/client_connection.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <charconv>
#include <filesystem>
#include <system_error>

namespace zimage::server {

namespace {

// "127.0.0.1", 30000 as getnameinfo gives them (cpp-httplib records the request's endpoints this way).
bool endpoint_is(const sockaddr_storage& addr, socklen_t len, const std::string& want_addr, int want_port) {
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return false;
  return want_addr == host && std::to_string(want_port) == port;
}

}  // namespace

ClientConnection::ClientConnection(const std::string& local_addr, int local_port, const std::string& remote_addr,
                                   int remote_port, bool http11)
    : http11_(http11) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd", ec)) {
    const std::string name = entry.path().filename().string();
    int fd = -1;
    if (std::from_chars(name.data(), name.data() + name.size(), fd).ec != std::errc()) continue;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage local{}, remote{};
    socklen_t local_len = sizeof local, remote_len = sizeof remote;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0) continue;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&remote), &remote_len) != 0) continue;
    if (endpoint_is(local, local_len, local_addr, local_port) &&
        endpoint_is(remote, remote_len, remote_addr, remote_port)) {
      fd_ = fd;
      return;
    }
  }
}

bool ClientConnection::connected() {
  if (fd_ < 0) return true;
  pollfd p{fd_, POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return true;
  if (p.revents & (POLLHUP | POLLERR)) return false;  // reset, or both halves shut
  if (!(p.revents & POLLRDHUP)) return true;
  if (!http11_) return false;
  if (probed_) return true;  // half-closed; a closed socket's reset shows as POLLERR on a later call
  probed_ = true;
  static constexpr char kProbe[] = "HTTP/1.1 100 Continue\r\n\r\n";
  return send(fd_, kProbe, sizeof kProbe - 1, MSG_NOSIGNAL | MSG_DONTWAIT) == ssize_t(sizeof kProbe - 1);
}

}  // namespace zimage::server
