// The HTTP face of the engine, on cpp-httplib: OpenAI's image API plus operator endpoints.
//   POST /v1/images/generations   queue a request, wait for its batch, answer b64_json or url images
//   POST /v1/images/edits         the same for a multipart image to image / inpainting request (edit_request.h)
//   GET  /v1/images/{id}/content  an image of a url answer, while the image store keeps it
//   GET  /v1/models               the one model served
//   GET  /health                  liveness: 200 once the model is loaded and warmed up; 503 before and while draining
//   GET  /ready                   readiness: as /health, and also 503 while the queue is full, so that a load
//                                 balancer stops sending before the replica refuses; says the queue depth
//   GET  /metrics                 Prometheus text (see metrics.h)
// Every error is OpenAI's error JSON (openai_errors.h); a wrong method on one of these routes is 405.
// With an API key, every route but /health and /ready needs "Authorization: Bearer <key>" (the scheme in
// any case). Every answer carries X-Request-Id: the request's own (request_id.h) or a fresh one; each
// answered image request is logged with it, its status and its time.
// Connections, read deadlines and body limits are ConnectionServer's (connection_server.h).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <thread>

#include "server/batcher.h"
#include "server/edit_request.h"
#include "server/image_request.h"
#include "server/image_store.h"
#include "server/metrics.h"
#include "server/openai_errors.h"

namespace httplib {
struct Request;
struct Response;
}  // namespace httplib

namespace zimage::server {

class ConnectionServer;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 30000;                         // 0: any free port (start() says which)
  std::string api_key;                      // empty: no authentication
  size_t max_body_bytes = size_t(1) << 20;  // after chunked and gzip/deflate decoding
  // Time to receive one whole request (headers and body), counted from when the connection is idle.
  std::chrono::milliseconds read_timeout{std::chrono::seconds(30)};
  std::chrono::milliseconds request_timeout{std::chrono::seconds(600)};  // arrival to answer
  std::chrono::seconds url_ttl{3600};
  size_t url_max_images = 256;  // also the most images one url answer may have (larger n is 400)
  // The start of the urls of url answers ("https://images.example.com"); empty: http://host:port as
  // listened on. Never taken from the request's Host header, which the client chooses.
  std::string public_url;
  int max_connections = 1024;  // served at once, one thread each; more are answered 503
  std::string model_id;        // what /v1/models reports and PNG metadata names
  RequestPolicy policy;
  std::shared_ptr<LoraLibrary> loras;  // serve --lora-dir; null: none (policy.lora_names lists them)
  EditLimits edit_limits;
};

class HttpServer {
 public:
  HttpServer(ServerOptions options, Batcher& batcher, Metrics& metrics);
  ~HttpServer();  // stop()

  // Binds and starts serving on a thread of its own; returns the port. Error(Io) when it cannot bind.
  int start();
  void set_ready();    // the model is loaded (and warmed up): /health answers 200
  void begin_drain();  // shutting down: new generation requests, /health and /ready answer 503
  // The line HAProxy's agent check reads (agent_check.h): "drain" while shutting down, otherwise "ready"
  // and the free share of the queue as the weight ("ready 75%" with 16 of 64 places taken; at least 1%).
  std::string agent_status();
  // Closes the listener and returns once every connection's current request has been answered.
  void stop();

 private:
  // The handlers of the two image endpoints; they return the status.
  int generate(const httplib::Request& req, httplib::Response& res);
  int edit(const httplib::Request& req, httplib::Response& res);
  // Queues `requests` (one job each), waits for all and answers their images in order.
  int run(const httplib::Request& req, httplib::Response& res, std::vector<ImageRequest> requests);
  // Encodes one job's images as the request asks and appends them to an answer's `data` list.
  void append_images(const ImageRequest& request, const JobResult& result, nlohmann::json& data);
  void image_content(const httplib::Request& req, httplib::Response& res);
  void send_error(httplib::Response& res, const ApiError& error);
  // What /ready answers: 200 and "ok", or 503 and why not ("loading", "shutting_down", "queue_full").
  struct Readiness {
    int status;
    const char* state;
    size_t queue_depth;  // read once, so that the answer agrees with itself
  };
  Readiness readiness();

  ServerOptions options_;
  Batcher& batcher_;
  Metrics& metrics_;
  ImageStore images_;
  std::string base_url_;  // of url answers, without a trailing '/'
  std::unique_ptr<ConnectionServer> http_;
  std::thread listener_;
  std::atomic<bool> ready_{false}, draining_{false};
  const long created_;  // unix time of start, as /v1/models' `created`
};

}  // namespace zimage::server
