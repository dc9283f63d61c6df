// The image server end to end over loopback HTTP (cpp-httplib's client): in-process servers on the
// tiny synthetic model for the API, the errors, batching, cancellation and timeouts, and the real
// `zimage serve` binary for start-up, warm-up and graceful shutdown. Tests that need the worker to be
// busy hold it at a gate in front of the model instead of relying on timing.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "io/image.h"
#include "model/model_source.h"
#include "pipeline/text_to_image.h"
#include "server/batcher.h"
#include "server/http_server.h"
#include "server/image_request.h"
#include "server/image_store.h"
#include "golden_requests.h"
#include "test_util.h"

using namespace zimage;
using namespace zimage::server;
using nlohmann::json;

extern char** environ;

namespace {

// The tiny synthetic model, loaded once for every in-process server (one worker uses it at a time).
TextToImagePipeline& tiny() { return zimage::testing::synthetic_tiny_pipeline(); }

// Holds the worker in front of the model until opened; counts who reached it.
class Gate {
 public:
  void pass() {
    std::unique_lock<std::mutex> lock(mutex_);
    arrived_++;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }
  bool wait_arrived(int n) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return arrived_ >= n; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool open_ = false;
  int arrived_ = 0;
};

// The model as the batcher sees it, recording every batch's prompts; optionally behind a gate.
struct RecordingModel {
  Gate* gate = nullptr;
  std::mutex mutex;
  std::vector<std::vector<std::string>> batches;

  Batcher::GenerateFn fn() {
    return [this](const GenerateRequest& r) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        batches.push_back(r.prompts);
      }
      if (gate) gate->pass();
      return tiny().generate(r);
    };
  }
  std::vector<std::string> all_prompts() {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<std::string> all;
    for (const auto& b : batches) all.insert(all.end(), b.begin(), b.end());
    return all;
  }
};

ServerOptions test_options() {
  ServerOptions o;
  o.port = 0;
  o.model_id = "synthetic:tiny";
  o.policy.default_steps = 9;
  o.policy.default_guidance = 0.0f;
  return o;
}

struct TestServer {
  Metrics metrics;
  Batcher batcher;
  HttpServer http;
  int port;

  TestServer(Batcher::GenerateFn fn, ServerOptions so = test_options(), Batcher::Options bo = {}, bool ready = true)
      : batcher(std::move(fn), bo, metrics), http(so, batcher, metrics), port(http.start()) {
    if (ready) http.set_ready();
  }
  std::unique_ptr<httplib::Client> client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
    c->set_read_timeout(60, 0);
    return c;
  }
  bool wait_queue_depth(size_t n) {
    for (int i = 0; i < 1000; ++i) {
      if (batcher.queue_depth() == n) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
};

// What a request got back; status -1 when no answer came (refused, timed out, connection closed).
struct Answer {
  int status = -1;
  std::string body, content_type;  // body: the client's error when no answer came
};

Answer answer(const httplib::Result& r) {
  if (!r) return {-1, "no answer: " + httplib::to_string(r.error()), ""};
  return {r->status, r->body, r->get_header_value("Content-Type")};
}

Answer post(httplib::Client& c, const json& body, const httplib::Headers& headers = {}) {
  return answer(c.Post("/v1/images/generations", headers, body.dump(), "application/json"));
}

Answer get(httplib::Client& c, const std::string& path, const httplib::Headers& headers = {}) {
  return answer(c.Get(path.c_str(), headers));
}

// 64x64, 2 steps: every generation in these tests is this small.
json small(const std::string& prompt) { return {{"prompt", prompt}, {"size", "64x64"}, {"num_inference_steps", 2}}; }

std::string base64_decode(const std::string& s) {
  std::string out(s.size() / 4 * 3, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(s.data()), int(s.size()));
  EXPECT_GE(n, 0);
  size_t padding = s.size() >= 2 ? size_t(s[s.size() - 1] == '=') + size_t(s[s.size() - 2] == '=') : 0;
  out.resize(size_t(std::max(n, 0)) - padding);
  return out;
}

ImageU8 decode(const std::string& bytes) {
  return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

// The value of one series in Prometheus text ("zimage_queue_depth", "zimage_errors_total{kind=\"x\"}"),
// or `absent` when the server has not reported it.
double metric(const std::string& text, const std::string& series, double absent = NAN) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(series + " ", 0) == 0) return std::stod(line.substr(series.size() + 1));
  return absent;
}

std::string metrics_text(const TestServer& s) {
  auto r = get(*s.client(), "/metrics");
  EXPECT_EQ(r.status, 200);
  return r.body;
}

void expect_openai_error(const Answer& r, int status, const std::string& code, const std::string& param,
                         const std::string& message_part) {
  ASSERT_NE(r.status, -1) << "no answer";
  EXPECT_EQ(r.status, status) << r.body;
  EXPECT_EQ(r.content_type, "application/json");
  json j = json::parse(r.body);
  ASSERT_TRUE(j.contains("error")) << r.body;
  EXPECT_EQ(j["error"]["code"], code) << r.body;
  if (param.empty()) {
    EXPECT_TRUE(j["error"]["param"].is_null()) << r.body;
  } else {
    EXPECT_EQ(j["error"]["param"], param) << r.body;
  }
  EXPECT_NE(j["error"]["message"].get<std::string>().find(message_part), std::string::npos) << r.body;
  EXPECT_TRUE(j["error"]["type"].is_string());
}

// A TCP client on loopback for what cpp-httplib's client will not do: bad framing, slow bytes,
// half-close, pipelining, chunked and gzip bodies.
struct RawClient {
  int fd = -1;

  explicit RawClient(int port) {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(uint16_t(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  }
  ~RawClient() { close(fd); }
  bool send_all(const std::string& bytes) {
    for (size_t done = 0; done < bytes.size();) {
      ssize_t n = send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n <= 0) return false;
      done += size_t(n);
    }
    return true;
  }
  void half_close() { shutdown(fd, SHUT_WR); }
  // Everything the server sends until it closes the connection (or resets it), or `seconds` pass.
  std::string read_all(double seconds) {
    std::string out;
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    for (auto now = std::chrono::steady_clock::now(); now < until; now = std::chrono::steady_clock::now()) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, int(std::chrono::duration_cast<std::chrono::milliseconds>(until - now).count()) + 1) <= 0) break;
      char buf[65536];
      ssize_t n = recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      out.append(buf, size_t(n));
    }
    return out;
  }
};

// The statuses of the answers in what a RawClient read, in order (interim 1xx answers left out); each
// answer's body is skipped by its Content-Length.
std::vector<int> statuses(const std::string& raw) {
  std::vector<int> out;
  for (size_t at = 0; raw.compare(at, 9, "HTTP/1.1 ") == 0;) {
    const int status = std::atoi(raw.c_str() + at + 9);
    const size_t head_end = raw.find("\r\n\r\n", at);
    if (head_end == std::string::npos) break;
    size_t length = 0;
    const size_t cl = raw.find("Content-Length: ", at);
    if (cl != std::string::npos && cl < head_end) length = size_t(std::atoll(raw.c_str() + cl + 16));
    if (status >= 200) out.push_back(status);
    at = head_end + 4 + (status >= 200 ? length : 0);
  }
  return out;
}

std::string post_text(const std::string& body, const std::string& headers = "") {
  return "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
         "Content-Length: " +
         std::to_string(body.size()) + "\r\n" + headers + "\r\n" + body;
}

std::string gzip(const std::string& data) {
  z_stream z{};
  EXPECT_EQ(deflateInit2(&z, 9, Z_DEFLATED, 15 + 16, 9, Z_DEFAULT_STRATEGY), Z_OK);  // 16: gzip framing
  std::string out(deflateBound(&z, uLong(data.size())), '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  z.avail_in = uInt(data.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = uInt(out.size());
  EXPECT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

}  // namespace

// ---- the request parser alone (no sockets) ----

TEST(ImageRequestParser, FillsDefaultsAndReadsEveryField) {
  RequestPolicy p;
  p.default_steps = 9;
  p.default_guidance = 0.0f;
  auto minimal = parse_image_request(R"({"prompt": "a fox"})", p);
  ASSERT_TRUE(std::holds_alternative<ImageRequest>(minimal));
  const ImageRequest& m = std::get<ImageRequest>(minimal);
  EXPECT_EQ(m.prompt, "a fox");
  EXPECT_EQ(m.n, 1);
  EXPECT_EQ(m.width, 1024);
  EXPECT_EQ(m.height, 1024);
  EXPECT_EQ(m.steps, 9);
  EXPECT_EQ(m.guidance, 0.0f);
  EXPECT_EQ(m.max_sequence_length, 512);
  EXPECT_TRUE(m.seeds.empty());
  EXPECT_EQ(m.response_format, ResponseFormat::B64Json);
  EXPECT_EQ(m.output_format, ImageFormat::Png);

  auto full = parse_image_request(R"({"prompt": "p", "n": 2, "size": "512x256", "height": 128, "num_inference_steps": 4,
      "guidance_scale": 3.5, "negative_prompt": "blurry", "seed": [7, 8], "cfg_normalization": 1.5,
      "cfg_truncation": 0.9, "max_sequence_length": 64, "response_format": "url", "output_format": "webp",
      "user": "u1", "model": "z-image", "quality": null})",
                                  p);
  ASSERT_TRUE(std::holds_alternative<RequestError>(full));  // "quality" is not a field, even as null
  EXPECT_EQ(std::get<RequestError>(full).param, "quality");

  full = parse_image_request(R"({"prompt": "p", "n": 2, "size": "512x256", "height": 128, "num_inference_steps": 4,
      "guidance_scale": 3.5, "negative_prompt": "blurry", "seed": [7, 8], "cfg_normalization": 1.5,
      "cfg_truncation": 0.9, "max_sequence_length": 64, "response_format": "url", "output_format": "webp",
      "user": null, "model": "z-image"})",
                             p);
  ASSERT_TRUE(std::holds_alternative<ImageRequest>(full));
  const ImageRequest& f = std::get<ImageRequest>(full);
  EXPECT_EQ(f.n, 2);
  EXPECT_EQ(f.width, 512);   // size gives width first
  EXPECT_EQ(f.height, 128);  // an explicit height wins over size's
  EXPECT_EQ(f.steps, 4);
  EXPECT_FLOAT_EQ(f.guidance, 3.5f);
  EXPECT_EQ(f.negative_prompt, "blurry");
  EXPECT_EQ(f.seeds, (std::vector<uint64_t>{7, 8}));
  EXPECT_TRUE(f.seed_is_list);
  EXPECT_FLOAT_EQ(f.cfg_normalization, 1.5f);
  EXPECT_FLOAT_EQ(f.cfg_truncation, 0.9f);
  EXPECT_EQ(f.max_sequence_length, 64);
  EXPECT_EQ(f.response_format, ResponseFormat::Url);
  EXPECT_EQ(f.output_format, ImageFormat::Webp);
  EXPECT_EQ(f.model, "z-image");
}

// One negative prompt per prompt of the request, or one string for all; a request has one prompt.
TEST(ImageRequestParser, NegativePromptIsAStringOrAListOfOnePerPrompt) {
  RequestPolicy p;
  auto one = parse_image_request(R"({"prompt": "a fox", "negative_prompt": ["blurry"]})", p);
  ASSERT_TRUE(std::holds_alternative<ImageRequest>(one));
  EXPECT_EQ(std::get<ImageRequest>(one).negative_prompt, "blurry");
  auto two = parse_image_request(R"({"prompt": "a fox", "negative_prompt": ["blurry", "dark"]})", p);
  ASSERT_TRUE(std::holds_alternative<RequestError>(two));
  EXPECT_EQ(std::get<RequestError>(two).param, "negative_prompt");
  EXPECT_NE(std::get<RequestError>(two).message.find("list of 2 for 1 prompt"), std::string::npos);
  auto number = parse_image_request(R"({"prompt": "a fox", "negative_prompt": [3]})", p);
  ASSERT_TRUE(std::holds_alternative<RequestError>(number));
  EXPECT_EQ(std::get<RequestError>(number).param, "negative_prompt");
  auto object = parse_image_request(R"({"prompt": "a fox", "negative_prompt": {"a": 1}})", p);
  ASSERT_TRUE(std::holds_alternative<RequestError>(object));
}

TEST(ImageStore, EvictsOldestBeyondTheCountAndExpiredImages) {
  ImageStore store(std::chrono::seconds(3600), 2);
  std::string a = store.put("A", "image/png"), b = store.put("B", "image/png"), c = store.put("C", "image/webp");
  EXPECT_EQ(a.size(), 32u);
  EXPECT_FALSE(store.get(a));
  EXPECT_EQ(*store.get(b)->bytes, "B");
  EXPECT_EQ(store.get(c)->content_type, "image/webp");
  EXPECT_EQ(store.size(), 2u);
  ImageStore expiring(std::chrono::seconds(0), 10);
  std::string d = expiring.put("D", "image/png");
  EXPECT_FALSE(expiring.get(d));
}

// ---- the HTTP API, in-process ----

TEST(Server, HealthIsReadyOnlyAfterLoadingAndModelsAndMetricsAnswer) {
  RecordingModel model;
  TestServer s(model.fn(), test_options(), {}, /*ready=*/false);
  auto c = s.client();
  auto health = get(*c, "/health");
  ASSERT_NE(health.status, -1);
  EXPECT_EQ(health.status, 503);
  EXPECT_EQ(json::parse(health.body)["status"], "loading");
  expect_openai_error(post(*c, small("early")), 503, "loading", "", "loading");
  EXPECT_EQ(metric(metrics_text(s), "zimage_ready"), 0);

  s.http.set_ready();
  health = get(*c, "/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(json::parse(health.body)["status"], "ok");

  auto models = get(*c, "/v1/models");
  ASSERT_NE(models.status, -1);
  EXPECT_EQ(models.status, 200);
  json m = json::parse(models.body);
  EXPECT_EQ(m["object"], "list");
  ASSERT_EQ(m["data"].size(), 1u);
  EXPECT_EQ(m["data"][0]["id"], "synthetic:tiny");
  EXPECT_EQ(m["data"][0]["object"], "model");

  auto metrics = get(*c, "/metrics");
  ASSERT_NE(metrics.status, -1);
  EXPECT_EQ(metrics.content_type, "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(metric(metrics.body, "zimage_ready"), 1);
  EXPECT_EQ(metric(metrics.body, "zimage_queue_depth"), 0);
  EXPECT_EQ(metric(metrics.body, "zimage_requests_in_flight"), 0);
  EXPECT_EQ(metric(metrics.body, "zimage_requests_total{status=\"503\"}"), 2);  // /health and the POST
  EXPECT_EQ(metric(metrics.body, "zimage_errors_total{kind=\"loading\"}"), 1);
  EXPECT_EQ(metric(metrics.body, "zimage_device_memory_bytes{kind=\"in_use\"}"), 0);  // the CPU holds no device memory
  for (const char* stage : {"text_encoder", "denoise", "vae_decode"})
    EXPECT_EQ(metric(metrics.body, std::string("zimage_stage_seconds_count{stage=\"") + stage + "\"}"), 0) << stage;
  EXPECT_TRUE(model.batches.empty());
}

TEST(Server, GeneratesImagesAsBase64AndUrlsInEveryFormat) {
  RecordingModel model;
  TestServer s(model.fn());
  auto c = s.client();

  // n = 2 PNGs from one seed; size is width x height.
  json req = small("a red fox");
  req["n"] = 2;
  req["size"] = "64x32";
  req["seed"] = 5;
  auto r = post(*c, req);
  ASSERT_NE(r.status, -1);
  ASSERT_EQ(r.status, 200) << r.body;
  json j = json::parse(r.body);
  EXPECT_GT(j["created"].get<int64_t>(), 1700000000);
  EXPECT_GT(j["inference_time_s"].get<double>(), 0.0);
  EXPECT_EQ(j["seed"], 5);
  ASSERT_EQ(j["data"].size(), 2u);
  for (int i = 0; i < 2; ++i) {
    std::string png = base64_decode(j["data"][i]["b64_json"]);
    ImageU8 img = decode(png);
    EXPECT_EQ(img.width, 64);
    EXPECT_EQ(img.height, 32);
    auto text = read_png_text(reinterpret_cast<const uint8_t*>(png.data()), png.size());
    EXPECT_EQ(text["prompt"], "a red fox");
    EXPECT_EQ(text["seed"], "5");
    EXPECT_EQ(text["batch_index"], std::to_string(i));
    EXPECT_EQ(text["steps"], "2");
  }
  EXPECT_NE(j["data"][0]["b64_json"], j["data"][1]["b64_json"]);  // two draws, two images

  // JPEG and WebP by output_format; width/height as SGLang's fields; a random seed is reported back.
  for (const char* format : {"jpeg", "webp"}) {
    json q = {
        {"prompt", "a cat"}, {"width", 48}, {"height", 64}, {"num_inference_steps", 1}, {"output_format", format}};
    auto rf = post(*c, q);
    ASSERT_EQ(rf.status, 200) << rf.body;
    json jf = json::parse(rf.body);
    EXPECT_TRUE(jf["seed"].is_number_unsigned());
    std::string bytes = base64_decode(jf["data"][0]["b64_json"]);
    EXPECT_EQ(bytes.substr(0, 2), std::string(format) == "jpeg" ? "\xFF\xD8" : "RI");
    ImageU8 img = decode(bytes);
    EXPECT_EQ(img.width, 48);
    EXPECT_EQ(img.height, 64);
  }

  // url answers: the image is fetched from the server with its Content-Type.
  json u = small("a harbour");
  u["response_format"] = "url";
  u["output_format"] = "webp";
  u["seed"] = std::vector<uint64_t>{1, 2};
  u["n"] = 2;
  auto ru = post(*c, u);
  ASSERT_EQ(ru.status, 200) << ru.body;
  json ju = json::parse(ru.body);
  EXPECT_EQ(ju["seed"], json::array({1, 2}));
  ASSERT_EQ(ju["data"].size(), 2u);
  for (const auto& d : ju["data"]) {
    std::string url = d["url"];
    std::string prefix = "http://127.0.0.1:" + std::to_string(s.port) + "/v1/images/";
    ASSERT_EQ(url.rfind(prefix, 0), 0u) << url;
    auto img = get(*c, url.substr(url.find("/v1/")).c_str());
    ASSERT_NE(img.status, -1);
    EXPECT_EQ(img.status, 200);
    EXPECT_EQ(img.content_type, "image/webp");
    EXPECT_EQ(decode(img.body).width, 64);
  }
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_images_generated_total{kind=\"generations\"}"), 6);  // 2 + 1 + 1 + 2
  EXPECT_EQ(metric(text, "zimage_requests_total{status=\"200\"}"), 6);  // 4 POSTs, 2 image GETs
  EXPECT_EQ(metric(text, "zimage_stage_seconds_count{stage=\"denoise\"}"), 4);
  EXPECT_EQ(metric(text, "zimage_request_seconds_count"), 4);
}

TEST(Server, RejectsBadRequestsWith400AndTheField) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.policy.max_pixels = 128 * 128;
  o.policy.max_n = 4;
  TestServer s(model.fn(), o);
  auto c = s.client();
  struct Case {
    std::string body, param, message;
  } cases[] = {
      {"", "", "the request body is empty"},
      {"  \n", "", "the request body is empty"},
      {R"({"prompt": "a", )", "", "not valid JSON"},
      {R"(["a fox"])", "", "must be a JSON object"},
      {R"({"size": "64x64"})", "prompt", "prompt is required"},
      {R"({"prompt": 42})", "prompt", "prompt must be a string"},
      {R"({"prompt": ""})", "prompt", "must not be empty"},
      {R"({"prompt": "a", "n": "2"})", "n", "n must be an integer"},
      {R"({"prompt": "a", "n": 1.5})", "n", "n must be an integer"},
      {R"({"prompt": "a", "n": 5})", "n", "n 5 is out of range (1 to 4)"},
      {R"({"prompt": "a", "n": 0})", "n", "n 0 is out of range"},
      {R"({"prompt": "a", "size": "60x64"})", "size", "width 60 is not a multiple of 16 (nearest valid: 48 or 64)"},
      {R"({"prompt": "a", "width": 64, "height": 100})", "height", "height 100 is not a multiple of 16"},
      {R"({"prompt": "a", "size": "large"})", "size", "size must look like"},
      {R"({"prompt": "a", "size": 64})", "size", "size must be a string"},
      {R"({"prompt": "a", "size": "256x256"})", "size", "256x256 is 65536 pixels, above the server's maximum of 16384"},
      {R"({"prompt": "a", "size": "64x64", "num_inference_steps": 0})", "num_inference_steps", "out of range"},
      {R"({"prompt": "a", "size": "64x64", "guidance_scale": -1})", "guidance_scale", "guidance_scale must be >= 0"},
      {R"({"prompt": "a", "size": "64x64", "guidance_scale": "high"})", "guidance_scale", "must be a number"},
      {R"({"prompt": "a", "size": "64x64", "seed": -3})", "seed", "seed -3 is out of range"},
      {R"({"prompt": "a", "size": "64x64", "n": 2, "seed": [1]})", "seed", "a list of 1 seeds for n = 2"},
      {R"({"prompt": "a", "size": "64x64", "response_format": "jpeg"})", "response_format", "b64_json"},
      {R"({"prompt": "a", "size": "64x64", "output_format": "gif"})", "output_format", "png, jpeg or webp"},
      {R"({"prompt": "a", "size": "64x64", "max_sequence_length": 0})", "max_sequence_length", "out of range"},
      {R"({"prompt": "a", "size": "64x64", "steps": 4})", "steps", "unrecognized request argument supplied: steps"},
      {R"({"prompt": "a", "size": "64x64", "guidance_scale": 1e400})", "", "not valid JSON"},
      {R"({"prompt": "a", "size": "64x64", "guidance_scale": 1e39})", "guidance_scale", "must be a finite number"},
      {R"({"prompt": "a", "size": "99999999999999999999x64"})", "size", "size must look like"},
      {R"({"prompt": "a", "size": "9999999999x9999999999"})", "size", "width 9999999999 is far too large"},
      {R"({"prompt": "a", "size": "-64x64"})", "size", "width must be positive (got -64)"},
      {"{\"prompt\": \"\xff\"}", "", "not valid JSON"},  // not UTF-8
      {std::string(20000, '[') + std::string(20000, ']'), "", "nests deeper than 64 levels"},
      {R"({"prompt": ")" + std::string(70000, 'a') + R"("})", "prompt", "above the limit of 65536 bytes"},
      {R"({"prompt": "a", "negative_prompt": "b\u0000c"})", "negative_prompt", "contains a NUL character"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.body);
    Answer r = answer(c->Post("/v1/images/generations", k.body, "application/json"));
    expect_openai_error(r, 400, "invalid_value", k.param, k.message);
  }
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_errors_total{kind=\"invalid_value\"}"), double(std::size(cases)));
  EXPECT_EQ(metric(text, "zimage_requests_total{status=\"400\"}"), double(std::size(cases)));
  EXPECT_TRUE(model.batches.empty());  // nothing invalid reached the model
}

TEST(Server, BodyOverTheBoundIs413AndTheServerGoesOn) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.max_body_bytes = 4096;
  TestServer s(model.fn(), o);
  json big = small(std::string(8000, 'a'));
  expect_openai_error(post(*s.client(), big), 413, "payload_too_large", "", "limit of 4096 bytes");
  json fits = small(std::string(3000, 'a'));
  auto r = post(*s.client(), fits);
  ASSERT_NE(r.status, -1);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(metric(metrics_text(s), "zimage_errors_total{kind=\"payload_too_large\"}"), 1);
}

TEST(Server, ApiKeyIsRequiredOnEveryRouteButHealth) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.api_key = "sekret";
  TestServer s(model.fn(), o);
  auto c = s.client();
  EXPECT_EQ(get(*c, "/health").status, 200);
  expect_openai_error(get(*c, "/v1/models"), 401, "invalid_api_key", "", "API key");
  expect_openai_error(get(*c, "/metrics"), 401, "invalid_api_key", "", "API key");
  expect_openai_error(get(*c, "/v1/images/0123/content"), 401, "invalid_api_key", "", "API key");
  expect_openai_error(post(*c, small("a")), 401, "invalid_api_key", "", "API key");
  expect_openai_error(post(*c, small("a"), {{"Authorization", "Bearer wrong!"}}), 401, "invalid_api_key", "",
                      "API key");
  expect_openai_error(post(*c, small("a"), {{"Authorization", "sekret"}}), 401, "invalid_api_key", "", "API key");
  EXPECT_TRUE(model.batches.empty());

  const httplib::Headers key = {{"Authorization", "Bearer sekret"}};
  EXPECT_EQ(get(*c, "/v1/models", key).status, 200);
  // The scheme is case-insensitive (RFC 9110); the key is not.
  EXPECT_EQ(get(*c, "/v1/models", {{"Authorization", "bearer sekret"}}).status, 200);
  EXPECT_EQ(get(*c, "/v1/models", {{"Authorization", "BEARER sekret"}}).status, 200);
  auto r = post(*c, small("a"), key);
  ASSERT_EQ(r.status, 200) << r.body;
  auto m = get(*c, "/metrics", key);
  EXPECT_EQ(metric(m.body, "zimage_errors_total{kind=\"invalid_api_key\"}"), 6);
  EXPECT_EQ(metric(m.body, "zimage_requests_total{status=\"401\"}"), 6);
}

// --max-body-bytes holds for the decoded body: a chunked body and a gzip body that inflates past it are
// 413 (they were 200), while small chunked and gzip bodies are read as any other.
TEST(Server, BodyLimitHoldsForChunkedAndGzipBodies) {
  RecordingModel model;
  TestServer s(model.fn());  // 1 MiB
  const std::string head =
      "POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      "Connection: close\r\n";
  {
    RawClient c(s.port);
    std::thread sender([&] {  // 3 MB in 48 chunks; the server stops reading after 1 MiB
      if (!c.send_all(head + "Transfer-Encoding: chunked\r\n\r\n")) return;
      const std::string chunk = "10000\r\n" + std::string(65536, ' ') + "\r\n";
      for (int i = 0; i < 48; ++i)
        if (!c.send_all(chunk)) return;
      c.send_all("0\r\n\r\n");
    });
    const std::string raw = c.read_all(10);
    sender.join();
    EXPECT_EQ(statuses(raw), std::vector<int>{413}) << raw.substr(0, 300);
    EXPECT_NE(raw.find("\"payload_too_large\""), std::string::npos);
  }
  {
    // {"prompt": "a"} then 64 MiB of spaces (valid JSON) is 65 KB as gzip.
    const std::string bomb = gzip(R"({"prompt": "a", "size": "64x64"})" + std::string(size_t(64) << 20, ' '));
    EXPECT_LT(bomb.size(), size_t(100000));
    RawClient c(s.port);
    c.send_all(head + "Content-Encoding: gzip\r\nContent-Length: " + std::to_string(bomb.size()) + "\r\n\r\n" + bomb);
    EXPECT_EQ(statuses(c.read_all(10)), std::vector<int>{413});
  }
  const std::string body = small("chunked").dump();
  {
    RawClient c(s.port);
    const size_t half = body.size() / 2;
    char sizes[64];
    std::snprintf(sizes, sizeof sizes, "%zx", half);
    std::string chunked =
        head + "Transfer-Encoding: chunked\r\n\r\n" + sizes + ";ext=1\r\n" + body.substr(0, half) + "\r\n";
    std::snprintf(sizes, sizeof sizes, "%zX", body.size() - half);
    chunked += std::string(sizes) + "\r\n" + body.substr(half) + "\r\n0\r\nTrailer: x\r\n\r\n";
    c.send_all(chunked);
    const std::string raw = c.read_all(30);
    EXPECT_EQ(statuses(raw), std::vector<int>{200}) << raw.substr(0, 300);
  }
  {
    RawClient c(s.port);
    const std::string packed = gzip(small("gzip").dump());
    c.send_all(head + "Content-Encoding: gzip\r\nContent-Length: " + std::to_string(packed.size()) + "\r\n\r\n" +
               packed);
    EXPECT_EQ(statuses(c.read_all(30)), std::vector<int>{200});
  }
  EXPECT_EQ(model.all_prompts(), (std::vector<std::string>{"chunked", "gzip"}));
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_errors_total{kind=\"payload_too_large\"}"), 2);
  EXPECT_EQ(metric(text, "zimage_requests_total{status=\"413\"}"), 2);
}

// 90 connections sending one header byte every 100 ms neither keep /health nor generation from answering
// at once, and each is answered 408 once its read timeout has passed.
TEST(Server, SlowClientsCannotStarveTheServerAndAreCutAtTheReadTimeout) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.read_timeout = std::chrono::milliseconds(1500);
  TestServer s(model.fn(), o);
  std::vector<std::unique_ptr<RawClient>> slow;
  for (int i = 0; i < 90; ++i) slow.push_back(std::make_unique<RawClient>(s.port));
  std::atomic<bool> stop{false};
  std::thread dribble([&] {
    const std::string head = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";  // never a blank line
    for (size_t i = 0; !stop; ++i) {
      for (auto& c : slow) c->send_all(std::string(1, head[i % head.size()]));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 4; ++i) {
    auto start = std::chrono::steady_clock::now();
    EXPECT_EQ(get(*s.client(), "/health").status, 200);
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 0.5);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(post(*s.client(), small("while slow clients dribble")).status, 200);
  stop = true;
  dribble.join();
  for (auto& c : slow) {
    const std::string raw = c->read_all(5);
    EXPECT_EQ(statuses(raw), std::vector<int>{408}) << raw.substr(0, 200);
  }
  const double cut_after = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(cut_after, 4.0);
  EXPECT_EQ(metric(metrics_text(s), "zimage_requests_total{status=\"408\"}"), 90);
}

// HTTP/1.1 as clients use it: half-close after the request, 405 for a known route's wrong method,
// ambiguous or negative Content-Length refused, pipelined requests answered in order.
TEST(Server, HalfClosePipeliningMethodsAndContentLength) {
  RecordingModel model;
  TestServer s(model.fn());
  auto exchange = [&](const std::string& bytes, bool half_close = false) {
    RawClient c(s.port);
    c.send_all(bytes);
    if (half_close) c.half_close();
    return c.read_all(30);
  };
  std::string raw = exchange(post_text(small("half-closed").dump()), true);
  EXPECT_EQ(statuses(raw), std::vector<int>{200}) << raw.substr(0, 300);
  EXPECT_EQ(model.all_prompts(), std::vector<std::string>{"half-closed"});

  raw = exchange("GET /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(statuses(raw), std::vector<int>{405}) << raw.substr(0, 300);
  EXPECT_NE(raw.find("Allow: POST\r\n"), std::string::npos);
  EXPECT_NE(raw.find("\"method_not_allowed\""), std::string::npos);
  raw = exchange("POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(statuses(raw), std::vector<int>{405});
  EXPECT_NE(raw.find("Allow: GET\r\n"), std::string::npos);
  EXPECT_EQ(statuses(exchange("DELETE /v1/images/abc/content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")),
            std::vector<int>{405});

  const std::string body = small("never").dump();
  raw = exchange(post_text(body, "Content-Length: " + std::to_string(body.size() + 1) + "\r\n"));
  EXPECT_EQ(statuses(raw), std::vector<int>{400}) << raw.substr(0, 300);
  EXPECT_NE(raw.find("two different Content-Length"), std::string::npos);
  raw = exchange("POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}");
  EXPECT_EQ(statuses(raw), std::vector<int>{400});
  EXPECT_NE(raw.find("non-negative integer"), std::string::npos);
  raw = exchange(
      "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
      "Transfer-Encoding: chunked\r\n\r\n{}");
  EXPECT_EQ(statuses(raw), std::vector<int>{400});

  // Three requests in one write: three answers, in order.
  raw = exchange(post_text(small("first").dump()) + "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" +
                 post_text(small("third").dump(), "Connection: close\r\n"));
  EXPECT_EQ(statuses(raw), (std::vector<int>{200, 200, 200})) << raw.substr(0, 300);
  EXPECT_LT(raw.find("b64_json"), raw.find("\"object\":\"list\""));
  EXPECT_EQ(model.all_prompts(), (std::vector<std::string>{"half-closed", "first", "third"}));
}

// Urls are built from --public-url (default: the address listened on), never from the client's Host;
// a url answer never holds more images than the store keeps.
TEST(Server, UrlAnswersUseThePublicUrlAndFitTheStore) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.url_max_images = 2;
  TestServer s(model.fn(), o);
  auto c = s.client();
  json u = small("a");
  u["response_format"] = "url";
  u["n"] = 2;
  auto r = post(*c, u, {{"Host", "attacker.example"}});
  ASSERT_EQ(r.status, 200) << r.body;
  const json answer = json::parse(r.body);  // a range-for over parse(...)["data"] would outlive the parse
  for (const auto& d : answer["data"]) {
    const std::string url = d["url"];
    EXPECT_EQ(url.rfind("http://127.0.0.1:" + std::to_string(s.port) + "/v1/images/", 0), 0u) << url;
    EXPECT_EQ(get(*c, url.substr(url.find("/v1/"))).status, 200);
  }
  u["n"] = 3;
  expect_openai_error(post(*c, u), 400, "invalid_value", "n", "--url-max-images");

  o.public_url = "https://images.example.com/zimage";
  TestServer pub(model.fn(), o);
  u["n"] = 1;
  r = post(*pub.client(), u);
  ASSERT_EQ(r.status, 200) << r.body;
  const std::string url = json::parse(r.body)["data"][0]["url"];
  EXPECT_EQ(url.rfind("https://images.example.com/zimage/v1/images/", 0), 0u) << url;
}

// zimage_requests_total counts every answer, also those refused before a handler ran.
TEST(Server, EveryAnswerIsCountedByStatus) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.api_key = "k";
  o.max_body_bytes = 4096;
  TestServer s(model.fn(), o);
  auto c = s.client();
  const httplib::Headers key = {{"Authorization", "Bearer k"}};
  EXPECT_EQ(post(*c, small("a")).status, 401);
  EXPECT_EQ(post(*c, small(std::string(8000, 'a')), key).status, 413);
  for (const char* length : {"x", "-1"}) {  // HTTP-level 400s, before any handler
    RawClient raw(s.port);
    raw.send_all(std::string("GET /v1/models HTTP/1.1\r\nContent-Length: ") + length + "\r\n\r\n");
    EXPECT_EQ(statuses(raw.read_all(10)), std::vector<int>{400}) << length;
  }
  EXPECT_EQ(get(*c, "/v1/nothing", key).status, 404);
  auto m = get(*c, "/metrics", key);
  EXPECT_EQ(metric(m.body, "zimage_requests_total{status=\"401\"}"), 1);
  EXPECT_EQ(metric(m.body, "zimage_requests_total{status=\"413\"}"), 1);
  EXPECT_EQ(metric(m.body, "zimage_requests_total{status=\"400\"}"), 2);
  EXPECT_EQ(metric(m.body, "zimage_requests_total{status=\"404\"}"), 1);
}

TEST(Server, UnknownImageIdsAndRoutesAre404) {
  RecordingModel model;
  ServerOptions o = test_options();
  o.url_max_images = 1;
  TestServer s(model.fn(), o);
  auto c = s.client();
  expect_openai_error(get(*c, "/v1/images/00000000000000000000000000000000/content"), 404, "not_found", "",
                      "no image with id");
  expect_openai_error(get(*c, "/v1/nothing"), 404, "not_found", "", "no such route");
  expect_openai_error(get(*c, "/v1/images/%FF%FE/content"), 404, "not_found", "", "no image with id");
  // Only the newest url image is kept: the first is evicted by the second.
  json u = small("a");
  u["response_format"] = "url";
  std::string first = json::parse(post(*c, u).body)["data"][0]["url"];
  std::string second = json::parse(post(*c, u).body)["data"][0]["url"];
  expect_openai_error(get(*c, first.substr(first.find("/v1/")).c_str()), 404, "not_found", "", "at most 1 at a time");
  EXPECT_EQ(get(*c, second.substr(second.find("/v1/")).c_str()).status, 200);
}

TEST(Server, FullQueueIs429) {
  Gate gate;
  RecordingModel model;
  model.gate = &gate;
  Batcher::Options bo;
  bo.max_queue = 1;
  bo.max_batch_images = 1;
  TestServer s(model.fn(), test_options(), bo);
  Answer running, queued;
  std::thread a([&] { running = post(*s.client(), small("running")); });
  ASSERT_TRUE(gate.wait_arrived(1));  // the worker holds "running"
  std::thread b([&] { queued = post(*s.client(), small("queued")); });
  ASSERT_TRUE(s.wait_queue_depth(1));
  expect_openai_error(post(*s.client(), small("one too many")), 429, "queue_full", "", "queue is full");
  gate.open();
  a.join();
  b.join();
  EXPECT_EQ(running.status, 200);
  EXPECT_EQ(queued.status, 200);
  EXPECT_EQ(model.all_prompts(), (std::vector<std::string>{"running", "queued"}));
  EXPECT_EQ(metric(metrics_text(s), "zimage_errors_total{kind=\"queue_full\"}"), 1);
}

TEST(Server, QueuedRequestOfAClientThatLeftIsNeverRun) {
  Gate gate;
  RecordingModel model;
  model.gate = &gate;
  Batcher::Options bo;
  bo.max_batch_images = 1;
  TestServer s(model.fn(), test_options(), bo);
  Answer running;
  std::thread a([&] { running = post(*s.client(), small("running")); });
  ASSERT_TRUE(gate.wait_arrived(1));
  std::thread b([&] {
    httplib::Client impatient("127.0.0.1", s.port);
    impatient.set_read_timeout(0, 300000);  // gives up after 0.3 s and hangs up
    EXPECT_EQ(post(impatient, small("abandoned")).status, -1);
  });
  b.join();
  // The server notices the closed connection within its poll interval and drops the queued job.
  for (int i = 0; i < 300 && s.batcher.queue_depth() > 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(s.batcher.queue_depth(), 0u);
  gate.open();
  a.join();
  EXPECT_EQ(running.status, 200);
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_requests_cancelled_total"), 1);
  EXPECT_EQ(metric(text, "zimage_requests_total{status=\"499\"}"), 1);
  EXPECT_EQ(metric(text, "zimage_images_generated_total{kind=\"generations\"}"), 1);
  EXPECT_EQ(model.all_prompts(), std::vector<std::string>{"running"});
}

TEST(Server, RequestTimeoutIs504AndDropsQueuedWork) {
  Gate gate;
  RecordingModel model;
  model.gate = &gate;
  ServerOptions o = test_options();
  o.request_timeout = std::chrono::milliseconds(400);
  Batcher::Options bo;
  bo.max_batch_images = 1;
  TestServer s(model.fn(), o, bo);
  Answer running, queued;
  std::thread a([&] { running = post(*s.client(), small("running")); });
  ASSERT_TRUE(gate.wait_arrived(1));
  std::thread b([&] { queued = post(*s.client(), small("queued")); });
  a.join();
  b.join();
  expect_openai_error(running, 504, "timeout", "", "timeout of 0.4");  // ran too long: answered, result dropped
  expect_openai_error(queued, 504, "timeout", "", "timeout of 0.4");   // never started: dropped from the queue
  EXPECT_EQ(s.batcher.queue_depth(), 0u);
  gate.open();
  EXPECT_EQ(metric(metrics_text(s), "zimage_requests_cancelled_total"), 1);
  EXPECT_EQ(metric(metrics_text(s), "zimage_errors_total{kind=\"timeout\"}"), 2);
}

// Out of device memory cannot be provoked on the CPU backend; a stand-in model raises the pipeline's
// ErrorKind::OutOfMemory for one prompt, as the CUDA allocator does when a batch does not fit.
TEST(Server, OutOfMemoryIs503AndTheServerKeepsServing) {
  TestServer s([](const GenerateRequest& r) {
    if (r.prompts[0] == "too big") throw Error(ErrorKind::OutOfMemory, "cudaMalloc of 80 GiB failed");
    return tiny().generate(r);
  });
  auto c = s.client();
  expect_openai_error(post(*c, small("too big")), 503, "out_of_memory", "", "out of memory");
  auto r = post(*c, small("fits"));
  ASSERT_NE(r.status, -1);
  EXPECT_EQ(r.status, 200);
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_errors_total{kind=\"out_of_memory\"}"), 1);
  EXPECT_EQ(metric(text, "zimage_requests_total{status=\"200\"}"), 1);
}

// A model whose VAE makes NaN (a damaged checkpoint): the request fails with 500 naming the stage
// instead of answering a black image, /metrics counts it by stage, and the server goes on serving.
TEST(Server, NonFiniteImageIs500NamingTheStageAndCounted) {
  static std::unique_ptr<Backend> be = make_cpu_backend();
  ModelSource model = open_model("synthetic:tiny");
  model.vae_weights = zimage::testing::with_nan_tensor(model.vae_weights, "decoder.conv_out.bias");
  static TextToImagePipeline damaged(*be, model);
  TestServer s(
      [](const GenerateRequest& r) { return r.prompts[0] == "damaged" ? damaged.generate(r) : tiny().generate(r); });
  auto c = s.client();
  expect_openai_error(post(*c, small("damaged")), 500, "numerical", "",
                      "the VAE decoder produced 12288 NaN/Inf values in the image");
  EXPECT_EQ(post(*c, small("fine")).status, 200);
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_non_finite_batches_total{stage=\"vae_decode\"}"), 1);
  EXPECT_EQ(metric(text, "zimage_non_finite_batches_total{stage=\"denoise\"}"), 0);
  EXPECT_EQ(metric(text, "zimage_non_finite_batches_total{stage=\"text_encoder\"}"), 0);
  EXPECT_EQ(metric(text, "zimage_errors_total{kind=\"numerical\"}"), 1);
  EXPECT_EQ(metric(text, "zimage_images_generated_total{kind=\"generations\"}"), 1);
}

// Three requests queued behind a held worker run as one batch of four images (guidance on, each with
// its own negative prompt and seeds); each gets the same pixels as when it runs alone.
TEST(Server, ImagesMadeInABatchEqualTheSameRequestsAlone) {
  std::vector<json> requests = {
      {{"prompt", "a red fox in the snow"}, {"seed", 7}},
      {{"prompt", "a quiet harbour at dawn with fishing boats"},
       {"seed", {3, 4}},
       {"n", 2},
       {"negative_prompt", "blurry"}},
      {{"prompt", "a red fox in the snow"}, {"seed", 9}, {"negative_prompt", "dark"}},
  };
  for (auto& r : requests) {
    r["size"] = "64x48";
    r["num_inference_steps"] = 2;
    r["guidance_scale"] = 2.0;
  }
  auto pixels = [](const Answer& r) {
    std::vector<std::vector<uint8_t>> out;
    EXPECT_EQ(r.status, 200);
    if (r.status != 200) return out;
    json j = json::parse(r.body);
    for (const auto& d : j["data"]) out.push_back(decode(base64_decode(d["b64_json"])).rgb);
    return out;
  };

  std::vector<std::vector<std::vector<uint8_t>>> batched(requests.size()), alone(requests.size());
  {
    Gate gate;
    RecordingModel model;
    model.gate = &gate;
    Batcher::Options bo;
    bo.max_batch_images = 4;
    TestServer s(model.fn(), test_options(), bo);
    std::thread hold([&] { post(*s.client(), small("hold the worker")); });
    ASSERT_TRUE(gate.wait_arrived(1));
    std::vector<std::thread> clients;
    for (size_t i = 0; i < requests.size(); ++i)
      clients.emplace_back([&, i] { batched[i] = pixels(post(*s.client(), requests[i])); });
    ASSERT_TRUE(s.wait_queue_depth(requests.size()));
    gate.open();
    for (auto& t : clients) t.join();
    hold.join();
    ASSERT_EQ(model.batches.size(), 2u);
    EXPECT_EQ(model.batches[1].size(), 4u);  // 1 + 2 + 1 images in one batch
    std::string text = metrics_text(s);
    EXPECT_EQ(metric(text, "zimage_batch_images_count"), 2);
    EXPECT_EQ(metric(text, "zimage_batch_images_bucket{le=\"2\"}"), 1);  // the held one; the other held 4
  }
  {
    RecordingModel model;
    Batcher::Options bo;
    bo.max_batch_images = 1;
    TestServer s(model.fn(), test_options(), bo);
    for (size_t i = 0; i < requests.size(); ++i) alone[i] = pixels(post(*s.client(), requests[i]));
    EXPECT_EQ(model.batches.size(), 3u);
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_EQ(batched[i].size(), size_t(requests[i].value("n", 1))) << i;
    ASSERT_EQ(alone[i].size(), batched[i].size()) << i;
    for (size_t k = 0; k < alone[i].size(); ++k) {
      ASSERT_EQ(alone[i][k].size(), size_t(64 * 48 * 3));
      int max_diff = 0;
      for (size_t p = 0; p < alone[i][k].size(); ++p)
        max_diff = std::max(max_diff, std::abs(int(alone[i][k][p]) - int(batched[i][k][p])));
      EXPECT_EQ(max_diff, 0) << "request " << i << " image " << k;
    }
  }
  EXPECT_NE(batched[1][0], batched[1][1]);  // a seed list gives each image its own noise
}

// 16 clients, 3 requests each, two sizes and n of 1 or 2: every answer is the right number of images
// of the right size, labelled with its own request's prompt and seed; nothing is lost; batches form.
TEST(Server, SixteenConcurrentClients) {
  RecordingModel model;
  Batcher::Options bo;
  bo.max_batch_images = 4;
  bo.batch_delay = std::chrono::milliseconds(20);
  TestServer s(model.fn(), test_options(), bo);
  const int clients = 16, per_client = 3;
  std::atomic<int> ok{0}, images{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c)
    threads.emplace_back([&, c] {
      auto client = s.client();
      for (int k = 0; k < per_client; ++k) {
        const int n = 1 + (c + k) % 2, width = (c % 2) ? 64 : 32, seed = 100 * c + k;
        const std::string prompt = "client " + std::to_string(c) + " request " + std::to_string(k);
        json req = {{"prompt", prompt},         {"n", n},      {"width", width}, {"height", 32},
                    {"num_inference_steps", 2}, {"seed", seed}};
        auto r = post(*client, req);
        ASSERT_NE(r.status, -1) << prompt << ": " << r.body;
        ASSERT_EQ(r.status, 200) << r.body;
        json j = json::parse(r.body);
        ASSERT_EQ(j["data"].size(), size_t(n)) << prompt;
        EXPECT_EQ(j["seed"], seed);
        for (const auto& d : j["data"]) {
          std::string png = base64_decode(d["b64_json"]);
          ImageU8 img = decode(png);
          EXPECT_EQ(img.width, width);
          EXPECT_EQ(img.height, 32);
          auto text = read_png_text(reinterpret_cast<const uint8_t*>(png.data()), png.size());
          EXPECT_EQ(text["prompt"], prompt);
          EXPECT_EQ(text["seed"], std::to_string(seed));
          images++;
        }
        ok++;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), clients * per_client);
  std::string text = metrics_text(s);
  EXPECT_EQ(metric(text, "zimage_requests_total{status=\"200\"}"), clients * per_client);
  EXPECT_EQ(metric(text, "zimage_images_generated_total{kind=\"generations\"}"), images.load());
  EXPECT_EQ(metric(text, "zimage_batch_images_sum"), images.load());
  const double batches = metric(text, "zimage_batch_images_count"),
               single = metric(text, "zimage_batch_images_bucket{le=\"1\"}");
  EXPECT_LT(batches, clients * per_client);  // fewer batches than requests...
  EXPECT_LT(single, batches);                // ...because some held more than one image
  EXPECT_EQ(metric(text, "zimage_queue_depth"), 0);
  EXPECT_EQ(metric(text, "zimage_requests_in_flight"), 0);
  // Every batch kept to one size and at most 4 images.
  for (const auto& b : model.batches) EXPECT_LE(b.size(), 4u);
  std::printf("[          ] %d requests, %d images in %.0f batches (%.0f of one image)\n", clients * per_client,
              images.load(), batches, single);
}

// ---- the `zimage serve` binary ----

namespace {

// `zimage serve ...` as a child process; the port comes from its first line of output.
struct ServeProcess {
  pid_t pid = -1;
  int port = -1;
  int out_fd = -1;

  std::string log_path;

  explicit ServeProcess(const std::string& args, const std::string& log = "serve.log")
      : log_path(zimage::testing::temp_path(log)) {
    const char* bin = std::getenv("ZIMAGE_BINARY");
    std::string cmd = std::string(bin && *bin ? bin : ZIMAGE_BINARY) + " serve " + args + " 2>" + log_path;
    int fds[2];
    EXPECT_EQ(pipe(fds), 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    // exec: the shell becomes zimage, so the pid is zimage's and signals reach it.
    const std::string exec_cmd = "exec " + cmd;
    const char* argv[] = {"/bin/sh", "-c", exec_cmd.c_str(), nullptr};
    EXPECT_EQ(posix_spawn(&pid, "/bin/sh", &actions, nullptr, const_cast<char**>(argv), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    out_fd = fds[0];
    std::string line;
    pollfd p{out_fd, POLLIN, 0};
    while (line.find('\n') == std::string::npos && poll(&p, 1, 30000) > 0) {
      char buf[256];
      ssize_t n = read(out_fd, buf, sizeof buf);
      if (n <= 0) break;
      line.append(buf, size_t(n));
    }
    auto colon = line.rfind(':');
    if (line.find("listening on http://127.0.0.1:") != std::string::npos && colon != std::string::npos)
      port = std::atoi(line.c_str() + colon + 1);
  }
  ~ServeProcess() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    if (out_fd >= 0) close(out_fd);
  }
  // The exit code once it exits within `seconds`; -1 if it does not (or was killed by a signal).
  int wait_exit(int seconds) {
    for (int i = 0; i < seconds * 100; ++i) {
      int status = 0;
      if (waitpid(pid, &status, WNOHANG) == pid) {
        pid = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return -1;
  }
  std::unique_ptr<httplib::Client> client() const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port);
    c->set_read_timeout(60, 0);
    return c;
  }
  std::string log() const {
    std::ifstream in(log_path);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  bool wait_health(int status) {
    for (int i = 0; i < 3000; ++i) {
      Answer r = get(*client(), "/health");
      if (r.status == status) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
};

}  // namespace

// SIGTERM with work queued: /health turns 503, new requests get 503, the queued and running requests
// are answered, and the process exits 0.
TEST(ServeBinary, SigtermFinishesQueuedWorkAndExitsZero) {
  ServeProcess p("--model-path synthetic:tiny --backend cpu --port 0 --warmup --warmup-size 64x64 --max-batch-size 1");
  ASSERT_GT(p.port, 0) << "no 'listening on' line";
  ASSERT_TRUE(p.wait_health(200));
  const int requests = 3;
  std::vector<Answer> results(requests);
  std::vector<std::thread> threads;
  for (int i = 0; i < requests; ++i)
    threads.emplace_back([&, i] {
      json req = {
          {"prompt", "slow " + std::to_string(i)}, {"size", "192x192"}, {"num_inference_steps", 2}, {"seed", i}};
      results[size_t(i)] = post(*p.client(), req);
    });
  bool queued = false;
  for (int i = 0; i < 1000 && !queued; ++i) {
    auto m = get(*p.client(), "/metrics");
    // Every request accepted (in flight) before the signal, and at least one still waiting in the queue:
    // a request still in transit when SIGTERM lands is rightly refused with 503.
    queued = metric(m.body, "zimage_requests_in_flight") >= requests && metric(m.body, "zimage_queue_depth") >= 1;
    if (!queued) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(queued) << "no request was waiting in the queue";
  ASSERT_EQ(kill(p.pid, SIGTERM), 0);
  ASSERT_TRUE(p.wait_health(503));
  expect_openai_error(post(*p.client(), small("too late")), 503, "shutting_down", "", "shutting down");
  for (auto& t : threads) t.join();
  for (int i = 0; i < requests; ++i) {
    ASSERT_EQ(results[size_t(i)].status, 200) << results[size_t(i)].body;
    ImageU8 img = decode(base64_decode(json::parse(results[size_t(i)].body)["data"][0]["b64_json"]));
    EXPECT_EQ(img.width, 192);
  }
  EXPECT_EQ(p.wait_exit(20), 0);
}

TEST(ServeBinary, BadFlagsExitWithCode2) {
  ServeProcess p("--model-path synthetic:tiny --max-batch-size 0");
  EXPECT_EQ(p.port, -1);
  EXPECT_EQ(p.wait_exit(20), 2);
  ServeProcess missing("--model-path /no/such/model --port 0");
  EXPECT_EQ(missing.port, -1);  // the model folder is checked before anything listens
  EXPECT_EQ(missing.wait_exit(20), 2);
  ServeProcess bad_url("--model-path synthetic:tiny --port 0 --public-url ftp://images.example.com", "bad_url.log");
  EXPECT_EQ(bad_url.port, -1);
  EXPECT_EQ(bad_url.wait_exit(20), 2);
  EXPECT_NE(bad_url.log().find("--public-url must start with http:// or https://"), std::string::npos) << bad_url.log();
}

// One server per port: a second `zimage serve` on a port in use fails before loading anything.
TEST(ServeBinary, SecondServerOnAPortInUseExitsOne) {
  ServeProcess first("--model-path synthetic:tiny --backend cpu --port 0", "first.log");
  ASSERT_GT(first.port, 0);
  ASSERT_TRUE(first.wait_health(200));
  ServeProcess second("--model-path synthetic:tiny --backend cpu --port " + std::to_string(first.port), "second.log");
  EXPECT_EQ(second.port, -1);
  EXPECT_EQ(second.wait_exit(20), 1);
  EXPECT_NE(second.log().find("address in use"), std::string::npos) << second.log();
  EXPECT_EQ(get(*first.client(), "/v1/models").status, 200);
}
