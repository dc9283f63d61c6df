#include "server/http_server.h"

#include <httplib.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>

#include "core/error.h"
#include "core/log.h"
#include "io/image.h"
#include "server/base64.h"
#include "server/client_connection.h"
#include "server/connection_server.h"
#include "server/request_id.h"

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

// "Bearer <key>" with the scheme in any case, as RFC 9110 has auth schemes, and the key exact.
bool authorized(const std::string& header, const std::string& key) {
  const size_t space = header.find(' ');
  if (space == std::string::npos) return false;
  std::string scheme = header.substr(0, space);
  for (char& c : scheme) c = char(std::tolower(static_cast<unsigned char>(c)));
  const size_t token = header.find_first_not_of(' ', space);
  return scheme == "bearer" && token != std::string::npos && same_secret(header.substr(token), key);
}

// The methods a route of ours answers ("GET"), or empty for a path that is no route: a known route
// asked with another method is 405 rather than 404.
std::string allowed_methods(const std::string& path) {
  static const std::regex image_content(R"(/v1/images/[^/]+/content)");
  if (path == "/v1/images/generations" || path == "/v1/images/edits") return "POST";
  if (path == "/v1/models" || path == "/health" || path == "/ready" || path == "/metrics" ||
      std::regex_match(path, image_content))
    return "GET";
  return "";
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

}  // namespace

HttpServer::HttpServer(ServerOptions options, Batcher& batcher, Metrics& metrics)
    : options_(std::move(options)),
      batcher_(batcher),
      metrics_(metrics),
      images_(options_.url_ttl, options_.url_max_images),
      created_(long(std::time(nullptr))) {
  ZI_CHECK(options_.max_connections > 0, ErrorKind::InvalidArgument, "the server needs at least one connection");
  // A client that leaves while its answer is written must not kill the process with SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);
  ConnectionLimits limits;
  limits.read.max_body_bytes = options_.max_body_bytes;
  limits.read_timeout = options_.read_timeout;
  limits.max_connections = options_.max_connections;
  http_ = std::make_unique<ConnectionServer>(limits, [this](int status, const std::string& message) {
    const ApiError e = refused(status, message, options_.max_body_bytes);
    metrics_.add_error(e.code);
    metrics_.add_response(status);
    return e.to_json();
  });
  // Every answer httplib writes passes here once, whatever produced it, before it is written: a client
  // that has read an answer finds it counted.
  http_->set_post_routing_handler(
      [this](const httplib::Request&, httplib::Response& res) { metrics_.add_response(res.status); });

  http_->set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    res.set_header("X-Request-Id", request_id(req.get_header_value("X-Request-Id")));
    // The probes of load balancers and orchestrators carry no key.
    if (options_.api_key.empty() || req.path == "/health" || req.path == "/ready")
      return httplib::Server::HandlerResponse::Unhandled;
    if (authorized(req.get_header_value("Authorization"), options_.api_key))
      return httplib::Server::HandlerResponse::Unhandled;
    send_error(res, unauthorized());
    return httplib::Server::HandlerResponse::Handled;
  });
  // Answers the library made itself (unknown route, body over the bound, unreadable request) get
  // OpenAI's error body too; answers with a body are ours and already complete.
  http_->set_error_handler(
      httplib::Server::HandlerWithResponse([this](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty() || res.status == kClientClosed) return httplib::Server::HandlerResponse::Unhandled;
        const std::string allowed = res.status == 404 ? allowed_methods(req.path) : "";
        if (!allowed.empty()) {
          res.status = 405;
          res.set_header("Allow", allowed);
        }
        send_error(res, res.status == 413 ? payload_too_large(options_.max_body_bytes) : from_status(res.status));
        return httplib::Server::HandlerResponse::Handled;
      }));
  http_->set_exception_handler([this](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    log(LogLevel::Error, "request " + res.get_header_value("X-Request-Id") + " " + req.path + " failed: " + what);
    send_error(res, {500, what, "server_error", "", "internal_error"});
  });

  // In flight until answered, however the handler leaves (an exception is answered with a 500, and
  // logged by the exception handler); an answer is logged with its request id, status and time.
  struct InFlight {
    Metrics& metrics;
    const httplib::Response& res;
    const char* kind;
    Clock::time_point start = Clock::now();
    InFlight(Metrics& m, const httplib::Response& r, const char* k) : metrics(m), res(r), kind(k) {
      metrics.request_started(kind);
    }
    ~InFlight() {
      const double seconds = seconds_since(start);
      metrics.request_finished(seconds);
      if (res.status <= 0) return;
      char took[32];
      std::snprintf(took, sizeof took, "%.3f s", seconds);
      log_info("request " + res.get_header_value("X-Request-Id") + " " + kind + ": " + std::to_string(res.status) +
               " in " + took);
    }
  };
  http_->Post("/v1/images/generations", [this](const httplib::Request& req, httplib::Response& res) {
    InFlight in_flight(metrics_, res, "generations");
    res.status = generate(req, res);
  });
  http_->Post("/v1/images/edits", [this](const httplib::Request& req, httplib::Response& res) {
    InFlight in_flight(metrics_, res, "edits");
    res.status = edit(req, res);
  });
  http_->Get(R"(/v1/images/([^/]+)/content)",
             [this](const httplib::Request& req, httplib::Response& res) { image_content(req, res); });
  http_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json model = {{"id", options_.model_id}, {"object", "model"}, {"created", created_}, {"owned_by", "zimage"}};
    json data = json::array({model});
    if (options_.loras)  // the adapters a request may name, as vLLM lists its LoRA modules
      for (const auto& name : options_.loras->names())
        data.push_back({{"id", name},
                        {"object", "model"},
                        {"created", created_},
                        {"owned_by", "zimage"},
                        {"root", name},
                        {"parent", options_.model_id}});
    res.set_content(json{{"object", "list"}, {"data", data}}.dump(), "application/json");
  });
  http_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const char* state = draining_ ? "shutting_down" : ready_ ? "ok" : "loading";
    res.status = ready_ && !draining_ ? 200 : 503;
    res.set_content(json{{"status", state}}.dump(), "application/json");
  });
  http_->Get("/ready", [this](const httplib::Request&, httplib::Response& res) {
    const Readiness r = readiness();
    res.status = r.status;
    res.set_content(
        json{{"status", r.state}, {"queue_depth", r.queue_depth}, {"max_queue", batcher_.max_queue()}}.dump(),
        "application/json");
  });
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_.render(), "text/plain; version=0.0.4; charset=utf-8");
  });
}

HttpServer::~HttpServer() { stop(); }

int HttpServer::start() {
  auto bound = http_->bind_and_listen(options_.host, options_.port);
  if (const auto* why = std::get_if<std::string>(&bound)) throw Error(ErrorKind::Io, "cannot listen on " + *why);
  const int port = std::get<int>(bound);
  const std::string host = options_.host.find(':') != std::string::npos ? "[" + options_.host + "]" : options_.host;
  base_url_ = options_.public_url.empty() ? "http://" + host + ":" + std::to_string(port) : options_.public_url;
  while (!base_url_.empty() && base_url_.back() == '/') base_url_.pop_back();
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

HttpServer::Readiness HttpServer::readiness() {
  const size_t depth = batcher_.queue_depth();
  if (draining_) return {503, "shutting_down", depth};
  if (!ready_) return {503, "loading", depth};
  if (depth >= batcher_.max_queue()) return {503, "queue_full", depth};
  return {200, "ok", depth};
}

std::string HttpServer::agent_status() {
  if (draining_) return "drain";
  const size_t max = batcher_.max_queue(), free = max - std::min(batcher_.queue_depth(), max);
  // Rounded up, and at least 1%: a full queue already fails /ready, which takes the replica out.
  const size_t percent = std::max<size_t>(1, (100 * free + max - 1) / max);
  return "ready " + std::to_string(percent) + "%";
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
  std::vector<ImageRequest> requests;
  requests.push_back(std::get<ImageRequest>(std::move(parsed)));
  return run(req, res, std::move(requests));
}

int HttpServer::edit(const httplib::Request& req, httplib::Response& res) {
  auto fail = [&](const ApiError& e) {
    send_error(res, e);
    return e.status;
  };
  if (draining_) return fail(unavailable("the server is shutting down", "shutting_down"));
  if (!ready_) return fail(unavailable("the model is still loading", "loading"));
  // RequestReader moved a multipart Content-Type here, out of httplib's reach (request_reader.h).
  std::string content_type = req.get_header_value(kFormContentType);
  if (content_type.empty()) content_type = req.get_header_value("Content-Type");
  auto parsed = parse_edit_request(content_type, req.body, options_.policy, options_.edit_limits);
  if (const auto* bad = std::get_if<RequestError>(&parsed)) return fail(invalid_request(bad->message, bad->param));
  std::vector<ImageRequest> requests = std::get<std::vector<ImageRequest>>(std::move(parsed));
  // One seed for every image of image[]: each result is the edit of that image alone with this seed.
  if (requests[0].seeds.empty()) {
    const uint64_t seed = random_seed();
    for (ImageRequest& r : requests) r.seeds.push_back(seed);
  }
  return run(req, res, std::move(requests));
}

int HttpServer::run(const httplib::Request& req, httplib::Response& res, std::vector<ImageRequest> requests) {
  auto fail = [&](const ApiError& e) {
    send_error(res, e);
    return e.status;
  };
  const ImageRequest& first = requests[0];
  const size_t total = first.n * requests.size();
  // Every image of one url answer must still be in the store when the answer arrives.
  if (first.response_format == ResponseFormat::Url && total > options_.url_max_images)
    return fail(invalid_request(std::to_string(total) + " url images is more than the server keeps (" +
                                    std::to_string(options_.url_max_images) +
                                    ", --url-max-images); ask for fewer or use b64_json",
                                "n"));
  if (first.seeds.empty()) {
    const uint64_t seed = random_seed();
    for (ImageRequest& r : requests) r.seeds.push_back(seed);
  }
  for (ImageRequest& request : requests) {
    if (request.loras.empty()) continue;
    if (!options_.loras)
      return fail(invalid_request("this server has no LoRA adapters (start it with --lora-dir)", "lora"));
    try {
      request.adapters = options_.loras->resolve(request.loras);
    } catch (const Error& e) {
      return fail(invalid_request(e.what(), "lora"));
    }
  }

  std::vector<std::shared_ptr<Job>> jobs;
  auto cancel_all = [&] {
    for (const auto& job : jobs) batcher_.cancel(job);  // a running job finishes and its images are dropped
  };
  for (const ImageRequest& request : requests) {
    jobs.push_back(std::make_shared<Job>(request));
    const auto admission = batcher_.submit(jobs.back());
    if (admission == Batcher::Admission::Queued) continue;
    jobs.pop_back();
    cancel_all();
    if (admission == Batcher::Admission::QueueFull) return fail(queue_full(batcher_.max_queue()));
    return fail(unavailable("the server is shutting down", "shutting_down"));
  }
  ClientConnection client(req.local_addr, req.local_port, req.remote_addr, req.remote_port, req.version == "HTTP/1.1");
  const auto deadline = jobs[0]->arrival() + options_.request_timeout;
  for (const auto& job : jobs) {
    while (!job->wait_until(std::min(Clock::now() + kDisconnectPoll, deadline))) {
      if (Clock::now() >= deadline) {
        cancel_all();
        return fail(request_timeout(std::chrono::duration<double>(options_.request_timeout).count()));
      }
      if (!client.connected()) {
        cancel_all();
        return kClientClosed;
      }
    }
  }

  json data = json::array();
  double inference_s = 0;
  for (size_t k = 0; k < jobs.size(); ++k) {
    const ImageRequest& request = requests[k];
    const JobResult& result = jobs[k]->result();
    if (!result.ok) return fail(from_engine_error(result.error_kind, result.error));
    inference_s += result.inference_s;
    append_images(request, result, data);
  }
  // `seed` is what to send back for the same images: one integer (one draw for all n) or one per image.
  json seed = first.seed_is_list ? json(first.seeds) : json(first.seeds[0]);
  json body = {
      {"created", long(std::time(nullptr))}, {"data", data}, {"inference_time_s", inference_s}, {"seed", seed}};
  res.set_content(body.dump(), "application/json");
  return 200;
}

void HttpServer::append_images(const ImageRequest& request, const JobResult& result, json& data) {
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
                {"mode", !request.is_edit()      ? "text_to_image"
                         : request.masks.empty() ? "image_to_image"
                                                 : "inpaint"},
                {"software", "zimage 0.1.0"}};
    Tensor pixels = result.images.narrow0(i, 1).reshape({request.height, request.width, 3});
    std::vector<uint8_t> file = encode_image(tensor_to_image(pixels), request.output_format, enc);
    const std::string_view bytes(reinterpret_cast<const char*>(file.data()), file.size());
    if (request.response_format == ResponseFormat::Url) {
      std::string id = images_.put(std::string(bytes), content_type(request.output_format));
      data.push_back({{"url", base_url_ + "/v1/images/" + id + "/content"}});
    } else {
      data.push_back({{"b64_json", base64_encode(bytes)}});
    }
  }
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
