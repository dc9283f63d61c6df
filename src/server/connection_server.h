// cpp-httplib's Server with its connection handling replaced by ours; httplib still parses the request
// line and headers, routes, and writes the answers. httplib 0.11 serves each connection on one of a fixed
// pool of threads and reads it with a per-recv() timeout, so 90 clients sending a header byte a second
// hold every thread and /health goes unanswered; its limits can be bypassed (see request_reader.h); its
// listening socket takes SO_REUSEPORT, so a second server on the same port starts and shares the
// traffic. Here:
//   - every connection gets a thread of its own (at most max_connections at once; more are answered 503),
//     so slow clients hold only their own threads;
//   - a request must arrive whole within read_timeout of the connection becoming idle (then 408 and the
//     connection closes), read by RequestReader, which also holds the decoded body limit;
//   - requests of a connection are answered in order, pipelined ones included;
//   - the port is bound with SO_REUSEADDR only: a port in use is an error.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <string>

#include "server/request_reader.h"

namespace zimage::server {

struct ConnectionLimits {
  ReadLimits read;
  std::chrono::milliseconds read_timeout{std::chrono::seconds(30)};
  int max_connections = 1024;
};

class ConnectionServer : public httplib::Server {
 public:
  // `refusal_body(status, message)`: the body of an answer our layer gives before httplib sees the
  // request (400, 408, 413, 415, 431, 501, or 503 for too many connections); it is also where such
  // answers are counted.
  using RefusalBody = std::function<std::string(int status, const std::string& message)>;
  ConnectionServer(ConnectionLimits limits, RefusalBody refusal_body);

  // Binds host:port (0: any free port) and listens with a deep backlog. Returns the port, or the
  // reason it cannot ("127.0.0.1:30000 is already in use").
  std::variant<int, std::string> bind_and_listen(const std::string& host, int port);
  // Stops accepting, ends idle connections and returns once every connection's thread has finished.
  void stop();

 private:
  bool process_and_close_socket(socket_t sock) override;
  void refuse(int sock, int status, const std::string& message);

  ConnectionLimits limits_;
  RefusalBody refusal_body_;
  std::atomic<int> connections_{0};
  std::atomic<bool> stopping_{false};
};

}  // namespace zimage::server
