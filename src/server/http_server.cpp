#include "server/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <csignal>
#include <ctime>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/log.h"
#include "io/image.h"
#include "server/base64.h"
#include "server/client_connection.h"

namespace zimage::server {

namespace {

using nlohmann::json;

// How often a waiting request looks at its client's socket: a client that left stops holding a queue
// slot within this time.
constexpr auto kDisconnectPoll = std::chrono::milliseconds(50);

// A client that closed its connection gets no answer; recorded under nginx's "client closed request".
constexpr int kClientClosed = 499;

const char* content_type(ImageFormat f) {
  switch (f) {
    case ImageFormat::Png: return "image/png";
    case ImageFormat::Jpeg: return "image/jpeg";
    case ImageFormat::Webp: return "image/webp";
  }
  return "application/octet-stream";
}

// Below 2^53 so that JavaScript clients read the seed they can send back exactly.
uint64_t random_seed() {
  thread_local std::random_device device;
  return std::uniform_int_distribution<uint64_t>(0, (uint64_t(1) << 53) - 1)(device);
}

// Compares every byte whatever the first difference, so the time taken says nothing about the key.
bool same_secret(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

// cpp-httplib 0.11 listens with a backlog of 5, compiled into Debian's library: a burst of 16 clients
// connecting at once overflows it, the kernel falls back to SYN cookies and resets some of those
// connections. Listening again on the bound socket raises the backlog; the socket is a protected
// member, hence the subclass.
class Listener : public httplib::Server {
 public:
  bool raise_backlog() { return ::listen(svr_sock_, SOMAXCONN) == 0; }
};

HttpServer::HttpServer(ServerOptions options, Batcher& batcher, Metrics& metrics)
    : options_(std::move(options)),
      batcher_(batcher),
      metrics_(metrics),
      images_(options_.url_ttl, options_.url_max_images),
      http_(std::make_unique<Listener>()),
      created_(long(std::time(nullptr))) {
  ZI_CHECK(options_.threads > 0, ErrorKind::InvalidArgument, "the server needs at least one HTTP thread");
  // A client that leaves while its answer is written must not kill the process with SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  const int threads = options_.threads;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  http_->set_payload_max_length(options_.max_body_bytes);

  http_->set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (options_.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
    if (same_secret(req.get_header_value("Authorization"), "Bearer " + options_.api_key))
      return httplib::Server::HandlerResponse::Unhandled;
    send_error(res, unauthorized());
    return httplib::Server::HandlerResponse::Handled;
  });
  // Answers the library made itself (unknown route, body over the bound, unreadable request) get
  // OpenAI's error body too; answers with a body are ours and already complete.
  http_->set_error_handler(
      httplib::Server::HandlerWithResponse([this](const httplib::Request&, httplib::Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        send_error(res, res.status == 413 ? payload_too_large(options_.max_body_bytes) : from_status(res.status));
        return httplib::Server::HandlerResponse::Handled;
      }));
  http_->set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    log(LogLevel::Error, "request failed: " + what);
    send_error(res, {500, what, "server_error", "", "internal_error"});
  });

  http_->Post("/v1/images/generations", [this](const httplib::Request& req, httplib::Response& res) {
    // In flight until answered, however the handler leaves (an exception is answered with a 500).
    struct InFlight {
      Metrics& metrics;
      Clock::time_point start = Clock::now();
      int status = 500;
      ~InFlight() { metrics.request_finished(status, seconds_since(start)); }
    } in_flight{metrics_};
    metrics_.request_started();
    in_flight.status = generate(req, res);
  });
  http_->Get(R"(/v1/images/([^/]+)/content)",
             [this](const httplib::Request& req, httplib::Response& res) { image_content(req, res); });
  http_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json model = {{"id", options_.model_id}, {"object", "model"}, {"created", created_}, {"owned_by", "zimage"}};
    res.set_content(json{{"object", "list"}, {"data", json::array({model})}}.dump(), "application/json");
  });
  http_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const char* state = draining_ ? "shutting_down" : ready_ ? "ok" : "loading";
    res.status = ready_ && !draining_ ? 200 : 503;
    res.set_content(json{{"status", state}}.dump(), "application/json");
  });
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.render(), "text/plain; version=0.0.4; charset=utf-8");
  });
}

HttpServer::~HttpServer() { stop(); }

int HttpServer::start() {
  int port = options_.port;
  if (port == 0) {
    port = http_->bind_to_any_port(options_.host);
  } else if (!http_->bind_to_port(options_.host, port)) {
    port = -1;
  }
  ZI_CHECK(
      port > 0, ErrorKind::Io,
      "cannot listen on " + options_.host + ":" + std::to_string(options_.port) + " (address in use or not local?)");
  if (!http_->raise_backlog()) log_warn("could not raise the listen backlog: bursts of connections may be refused");
  listener_ = std::thread([this] { http_->listen_after_bind(); });
  // stop() only takes effect once the listener runs; wait for it so a quick stop() cannot be lost.
  while (!http_->is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return port;
}

void HttpServer::set_ready() {
  ready_ = true;
  metrics_.set_ready(!draining_);
}

void HttpServer::begin_drain() {
  draining_ = true;
  metrics_.set_ready(false);
}

void HttpServer::stop() {
  if (!listener_.joinable()) return;
  http_->stop();
  listener_.join();
}

void HttpServer::send_error(httplib::Response& res, const ApiError& error) {
  metrics_.add_error(error.code);
  res.status = error.status;
  res.set_content(error.to_json(), "application/json");
}

int HttpServer::generate(const httplib::Request& req, httplib::Response& res) {
  auto fail = [&](const ApiError& e) {
    send_error(res, e);
    return e.status;
  };
  if (draining_) return fail(unavailable("the server is shutting down", "shutting_down"));
  if (!ready_) return fail(unavailable("the model is still loading", "loading"));
  auto parsed = parse_image_request(req.body, options_.policy);
  if (const auto* bad = std::get_if<RequestError>(&parsed)) return fail(invalid_request(bad->message, bad->param));
  ImageRequest request = std::get<ImageRequest>(std::move(parsed));
  if (request.seeds.empty()) request.seeds.push_back(random_seed());

  auto job = std::make_shared<Job>(request);
  switch (batcher_.submit(job)) {
    case Batcher::Admission::Queued: break;
    case Batcher::Admission::QueueFull: return fail(queue_full(batcher_.max_queue()));
    case Batcher::Admission::ShuttingDown: return fail(unavailable("the server is shutting down", "shutting_down"));
  }
  ClientConnection client(req.local_addr, req.local_port, req.remote_addr, req.remote_port);
  const auto deadline = job->arrival() + options_.request_timeout;
  while (!job->wait_until(std::min(Clock::now() + kDisconnectPoll, deadline))) {
    if (Clock::now() >= deadline) {
      batcher_.cancel(job);  // a running job finishes and its images are dropped
      return fail(request_timeout(std::chrono::duration<double>(options_.request_timeout).count()));
    }
    if (!client.connected()) {
      batcher_.cancel(job);
      return kClientClosed;
    }
  }

  const JobResult& result = job->result();
  if (!result.ok) return fail(from_engine_error(result.error_kind, result.error));
  json data = json::array();
  for (int i = 0; i < request.n; ++i) {
    const uint64_t seed = request.seeds[request.seeds.size() == 1 ? 0 : size_t(i)];
    EncodeOptions enc;  // PNG text chunks: enough to reproduce the image
    enc.text = {{"prompt", request.prompt},
                {"negative_prompt", request.negative_prompt},
                {"seed", std::to_string(seed)},
                {"batch_index", std::to_string(request.seeds.size() == 1 ? i : 0)},
                {"steps", std::to_string(request.steps)},
                {"guidance_scale", std::to_string(request.guidance)},
                {"model", options_.model_id},
                {"software", "zimage 0.1.0"}};
    Tensor pixels = result.images.narrow0(i, 1).reshape({request.height, request.width, 3});
    std::vector<uint8_t> file = encode_image(tensor_to_image(pixels), request.output_format, enc);
    const std::string_view bytes(reinterpret_cast<const char*>(file.data()), file.size());
    if (request.response_format == ResponseFormat::Url) {
      std::string id = images_.put(std::string(bytes), content_type(request.output_format));
      std::string host =
          req.has_header("Host") ? req.get_header_value("Host") : options_.host + ":" + std::to_string(req.local_port);
      data.push_back({{"url", "http://" + host + "/v1/images/" + id + "/content"}});
    } else {
      data.push_back({{"b64_json", base64_encode(bytes)}});
    }
  }
  // `seed` is what to send back for the same images: one integer (one draw for all n) or one per image.
  json seed = request.seed_is_list ? json(request.seeds) : json(request.seeds[0]);
  json body = {
      {"created", long(std::time(nullptr))}, {"data", data}, {"inference_time_s", result.inference_s}, {"seed", seed}};
  res.set_content(body.dump(), "application/json");
  return 200;
}

void HttpServer::image_content(const httplib::Request& req, httplib::Response& res) {
  const std::string id = req.matches[1];
  auto image = images_.get(id);
  if (!image) {
    send_error(res, not_found("no image with id '" + id + "': images of url answers are kept " +
                              std::to_string(options_.url_ttl.count()) + " s, at most " +
                              std::to_string(options_.url_max_images) + " at a time"));
    return;
  }
  res.set_content(*image->bytes, image->content_type);
}

}  // namespace zimage::server
