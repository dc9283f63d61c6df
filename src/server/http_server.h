// The HTTP face of the engine, on cpp-httplib: OpenAI's image API plus operator endpoints.
//   POST /v1/images/generations   queue a request, wait for its batch, answer b64_json or url images
//   GET  /v1/images/{id}/content  an image of a url answer, while the image store keeps it
//   GET  /v1/models               the one model served
//   GET  /health                  200 once the model is loaded and warmed up; 503 before and while draining
//   GET  /metrics                 Prometheus text (see metrics.h)
// Every error is OpenAI's error JSON (openai_errors.h). With an API key, every route but /health needs
// "Authorization: Bearer <key>".
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "server/batcher.h"
#include "server/image_request.h"
#include "server/image_store.h"
#include "server/metrics.h"
#include "server/openai_errors.h"

namespace httplib {
struct Request;
struct Response;
}  // namespace httplib

namespace zimage::server {

class Listener;  // cpp-httplib's server, with a deeper listen backlog

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 30000;     // 0: any free port (start() says which)
  std::string api_key;  // empty: no authentication
  size_t max_body_bytes = size_t(1) << 20;
  std::chrono::milliseconds request_timeout{std::chrono::seconds(600)};  // arrival to answer
  std::chrono::seconds url_ttl{3600};
  size_t url_max_images = 256;
  // Each connection holds one thread while its request waits, so this must exceed the queue bound
  // plus a batch, or a full queue shows up as stalled connections instead of 429s.
  int threads = 76;
  std::string model_id;  // what /v1/models reports and PNG metadata names
  RequestPolicy policy;
};

class HttpServer {
 public:
  HttpServer(ServerOptions options, Batcher& batcher, Metrics& metrics);
  ~HttpServer();  // stop()

  // Binds and starts serving on a thread of its own; returns the port. Error(Io) when it cannot bind.
  int start();
  void set_ready();    // the model is loaded (and warmed up): /health answers 200
  void begin_drain();  // shutting down: new generation requests and /health answer 503
  // Closes the listener and returns once every connection's current request has been answered.
  void stop();

 private:
  int generate(const httplib::Request& req, httplib::Response& res);  // returns the status
  void image_content(const httplib::Request& req, httplib::Response& res);
  void send_error(httplib::Response& res, const ApiError& error);

  ServerOptions options_;
  Batcher& batcher_;
  Metrics& metrics_;
  ImageStore images_;
  std::unique_ptr<Listener> http_;
  std::thread listener_;
  std::atomic<bool> ready_{false}, draining_{false};
  const long created_;  // unix time of start, as /v1/models' `created`
};

}  // namespace zimage::server
