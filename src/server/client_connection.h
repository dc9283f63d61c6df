// Whether the client of a request is still there, so that queued work for a client that went away is
// dropped before it runs. cpp-httplib 0.11 runs a handler on its connection's thread but gives it neither
// the socket nor a way to see the peer leave (DataSink::is_writable only asks whether a write would
// block, and a content provider commits the status line before the result is known). So the handler
// finds its socket among the process' descriptors by the connection's two endpoints, which identify a
// TCP connection, and polls it for the peer's FIN without reading anything from it. A FIN alone does not
// say the client left: one that shut down only its sending half after the request still waits for the
// answer. Only a write tells the two apart (to a closed socket the kernel answers with a reset), so on a
// FIN the connection sends one interim "HTTP/1.1 100 Continue", which every HTTP/1.1 client reads past
// (RFC 9110 15.2), and the client is gone once the reset is back. An HTTP/1.0 client may not be sent an
// interim answer; its FIN is taken as leaving.
#pragma once

#include <string>

namespace zimage::server {

class ClientConnection {
 public:
  // The endpoints as cpp-httplib records them in a Request (numeric addresses).
  ClientConnection(const std::string& local_addr, int local_port, const std::string& remote_addr, int remote_port,
                   bool http11);

  // False once the client has closed or reset the connection. True when the socket was not found
  // (no /proc): such a request then waits for its result like any other.
  bool connected();

 private:
  int fd_ = -1;  // owned by the connection's thread; open for as long as the handler runs
  bool http11_;
  bool probed_ = false;
};

}  // namespace zimage::server
