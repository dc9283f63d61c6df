#include "server/connection_server.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>

namespace zimage::server {

namespace {

using Clock = std::chrono::steady_clock;

// How long a client may leave an answer unread (no byte taken) before it is given up.
constexpr int kWriteTimeoutMs = 30000;
// After refusing a request, how long its unread rest is read and dropped before closing, so that the
// client sees the answer instead of a reset.
constexpr auto kLinger = std::chrono::seconds(1);

// Runs every connection on a thread of its own; shutdown() waits for them all.
class ThreadPerConnection : public httplib::TaskQueue {
 public:
  void enqueue(std::function<void()> fn) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      running_++;
    }
    auto serve = [this, fn] {
      fn();
      std::lock_guard<std::mutex> lock(mutex_);
      running_--;
      done_.notify_all();
    };
    try {
      std::thread(serve).detach();
    } catch (const std::system_error&) {
      serve();  // no thread to be had: serve it on the accepting thread rather than drop it unanswered
    }
  }
  void shutdown() override {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return running_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  int running_ = 0;
};

// "127.0.0.1", 30000 as cpp-httplib records a request's endpoints (numeric, from getnameinfo).
void numeric_endpoint(int fd, bool peer, std::string& ip, int& port) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  const int rc = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len)
                      : getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  char host[NI_MAXHOST], serv[NI_MAXSERV];
  if (rc != 0 || getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, host, sizeof host, serv, sizeof serv,
                             NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return;
  ip = host;
  port = std::atoi(serv);
}

// One request for httplib to parse (already whole and normalized, from memory) and its answer's way
// out to the client's socket. A client that left or stops reading loses the rest of the answer; the
// write still reports success so that httplib completes (and logs, hence counts) the answer.
class ClientStream : public httplib::Stream {
 public:
  ClientStream(int fd, std::string request) : fd_(fd), request_(std::move(request)) {}

  bool is_readable() const override { return pos_ < request_.size(); }
  bool is_writable() const override {
    pollfd p{fd_, POLLOUT, 0};
    return !lost_ && poll(&p, 1, 0) > 0 && !(p.revents & (POLLERR | POLLHUP));
  }
  ssize_t read(char* ptr, size_t size) override {
    const size_t n = std::min(size, request_.size() - pos_);
    std::memcpy(ptr, request_.data() + pos_, n);
    pos_ += n;
    return ssize_t(n);
  }
  ssize_t write(const char* ptr, size_t size) override {
    for (size_t done = 0; !lost_ && done < size;) {
      pollfd p{fd_, POLLOUT, 0};
      const int ready = poll(&p, 1, kWriteTimeoutMs);
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) {
        lost_ = true;
        break;
      }
      const ssize_t n = send(fd_, ptr + done, size - done, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n < 0) lost_ = true;
      if (n > 0) done += size_t(n);
    }
    return ssize_t(size);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override { numeric_endpoint(fd_, true, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { numeric_endpoint(fd_, false, ip, port); }
  socket_t socket() const override { return fd_; }

  bool lost() const { return lost_; }

 private:
  int fd_;
  std::string request_;
  size_t pos_ = 0;
  bool lost_ = false;
};

const char* reason_phrase(int status) {
  switch (status) {
    case 400: return "Bad Request";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
  }
  return "Error";
}

// Closes after a refusal: no more writes, then drop what the client still sends for up to kLinger.
void linger_and_close(int sock) {
  shutdown(sock, SHUT_WR);
  const auto until = Clock::now() + kLinger;
  for (auto now = Clock::now(); now < until; now = Clock::now()) {
    pollfd p{sock, POLLIN, 0};
    const int ms = int(std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count()) + 1;
    if (poll(&p, 1, ms) <= 0) break;
    char sink[16 * 1024];
    if (recv(sock, sink, sizeof sink, 0) <= 0) break;
  }
  close(sock);
}

}  // namespace

ConnectionServer::ConnectionServer(ConnectionLimits limits, RefusalBody refusal_body)
    : limits_(limits), refusal_body_(std::move(refusal_body)) {
  new_task_queue = [] { return new ThreadPerConnection; };
  // httplib's default sets SO_REUSEPORT, which lets a second server bind the same port.
  set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  set_payload_max_length(limits_.read.max_body_bytes);
  set_keep_alive_timeout(std::max<time_t>(1, time_t(limits_.read_timeout.count() / 1000)));
  set_keep_alive_max_count(100);
}

std::variant<int, std::string> ConnectionServer::bind_and_listen(const std::string& host, int port) {
  errno = 0;
  const int bound = port == 0 ? bind_to_any_port(host) : bind_to_port(host, port) ? port : -1;
  const std::string where = host + ":" + std::to_string(port);
  if (bound <= 0) {
    if (errno == EADDRINUSE) return where + ": address in use (another server listens there; choose another --port)";
    return where + ": cannot listen there (" + (errno ? std::strerror(errno) : "not an address of this machine?") + ")";
  }
  // httplib 0.11 listens with a backlog of 5: a burst of clients connecting at once overflows it and
  // the kernel resets some of them. Listening again on the bound socket raises it.
  ::listen(svr_sock_, SOMAXCONN);
  return bound;
}

void ConnectionServer::stop() {
  stopping_ = true;
  httplib::Server::stop();
}

void ConnectionServer::refuse(int sock, int status, const std::string& message) {
  const std::string body = refusal_body_(status, message);
  const std::string answer = "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) +
                             "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
                             "\r\nConnection: close\r\n\r\n" + body;
  ClientStream(sock, "").write(answer.data(), answer.size());
  linger_and_close(sock);
}

bool ConnectionServer::process_and_close_socket(socket_t sock) {
  struct Held {
    std::atomic<int>& n;
    ~Held() { n--; }
  } held{connections_};
  if (++connections_ > limits_.max_connections) {
    refuse(sock, 503, "the server has " + std::to_string(limits_.max_connections) + " connections open; retry later");
    return true;
  }
  RequestReader reader(sock, limits_.read);
  for (size_t served = 0;; ++served) {
    auto request = reader.next(Clock::now() + limits_.read_timeout, stopping_);
    if (auto* e = std::get_if<HttpReadError>(&request)) {
      refuse(sock, e->status, e->message);
      return true;
    }
    if (std::holds_alternative<ConnectionDone>(request)) break;
    ClientStream stream(sock, std::get<std::string>(std::move(request)));
    bool closed = false;
    const bool last = stopping_ || served + 1 >= keep_alive_max_count_;
    process_request(stream, last, closed, nullptr);
    if (closed || last || stream.lost()) break;
  }
  shutdown(sock, SHUT_RDWR);
  close(sock);
  return true;
}

}  // namespace zimage::server
