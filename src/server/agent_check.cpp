#include "server/agent_check.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace zimage::server {

namespace {

// How often the accepting thread looks at stopping_: stop() returns within this time.
constexpr int kStopPollMs = 100;

}  // namespace

AgentCheck::AgentCheck(Reply reply) : reply_(std::move(reply)) {}

AgentCheck::~AgentCheck() { stop(); }

int AgentCheck::start(const std::string& host, int port) {
  const std::string where = host + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (rc != 0) throw Error(ErrorKind::Io, "cannot listen on " + where + " for the agent check: " + gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* a = found; a && listener_ < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int yes = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, SOMAXCONN) == 0) {
      listener_ = fd;
    } else {
      why = errno == EADDRINUSE ? "address in use (choose another --agent-port)" : std::strerror(errno);
      close(fd);
    }
  }
  freeaddrinfo(found);
  if (listener_ < 0) throw Error(ErrorKind::Io, "cannot listen on " + where + " for the agent check: " + why);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
  char serv[NI_MAXSERV];
  getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, nullptr, 0, serv, sizeof serv, NI_NUMERICSERV);
  thread_ = std::thread([this] { serve(); });
  return std::atoi(serv);
}

void AgentCheck::stop() {
  if (!thread_.joinable()) return;
  stopping_ = true;
  thread_.join();
  close(listener_);
  listener_ = -1;
}

void AgentCheck::serve() {
  while (!stopping_) {
    pollfd p{listener_, POLLIN, 0};
    if (poll(&p, 1, kStopPollMs) <= 0) continue;
    const int fd = accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    // One short line fits the socket's send buffer, so the send never waits on the peer; a peer that
    // already left gets nothing, and asks again at its next check.
    const std::string line = reply_() + "\n";
    send(fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    shutdown(fd, SHUT_WR);
    close(fd);
  }
}

}  // namespace zimage::server
