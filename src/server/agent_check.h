// HAProxy's agent check: on a TCP port of its own, every connection gets one line and is closed. HAProxy
// connects every `agent-inter` and reads the line as the server's administrative state and weight:
// "ready 75%" (serve it, at 75% of its configured weight) or "drain" (no new requests; those in flight
// finish). With `balance leastconn` the weight makes a replica whose queue is filling up, with requests
// from any client or balancer, get fewer of the new ones. Health (up/down) is left to the HTTP check on
// /ready, so a replica that stops answering leaves the pool whatever this port says.
// https://docs.haproxy.org/2.6/configuration.html#5.2-agent-check
#pragma once

#include <atomic>
#include <functional>
#include <string>
#include <thread>

namespace zimage::server {

class AgentCheck {
 public:
  using Reply = std::function<std::string()>;  // the line to send, without its '\n'
  explicit AgentCheck(Reply reply);
  ~AgentCheck();  // stop()

  // Listens on host:port (0: any free port) and answers on a thread of its own; returns the port.
  // Error(Io) when it cannot listen there.
  int start(const std::string& host, int port);
  void stop();

 private:
  void serve();

  Reply reply_;
  int listener_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace zimage::server
