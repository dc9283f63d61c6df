// Whether the client of a request is still there, so that queued work for a client that went away is
// dropped before it runs. cpp-httplib 0.11 runs a handler on its connection's thread but gives it neither
// the socket nor a way to see the peer leave (DataSink::is_writable only asks whether a write would
// block, and a content provider commits the status line before the result is known). So the handler
// finds its socket among the process' descriptors by the connection's two endpoints, which identify a
// TCP connection, and polls it for the peer's FIN without reading anything from it.
#pragma once

#include <string>

namespace zimage::server {

class ClientConnection {
 public:
  // The endpoints as cpp-httplib records them in a Request (numeric addresses).
  ClientConnection(const std::string& local_addr, int local_port, const std::string& remote_addr, int remote_port);

  // False once the client has closed or reset the connection. True when the socket was not found
  // (no /proc): such a request then waits for its result like any other.
  bool connected() const;

 private:
  int fd_ = -1;  // owned by cpp-httplib; open for as long as the handler runs
};

}  // namespace zimage::server
