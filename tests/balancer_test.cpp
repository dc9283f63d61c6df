// What a load balancer sees of one in-process server on the tiny synthetic model: /ready through
// loading, a filling queue and a drain, the agent check's line over TCP, and X-Request-Id on every
// answer and in the log. The worker is held in front of the model so that the queue depth is exact.
// The replicas behind a real HAProxy are tests/cluster_test.py's.
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <future>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "core/error.h"
#include "model/model_source.h"
#include "pipeline/text_to_image.h"
#include "server/agent_check.h"
#include "server/batcher.h"
#include "server/http_server.h"
#include "golden_requests.h"

using namespace zimage;
using namespace zimage::server;
using nlohmann::json;

namespace {

TextToImagePipeline& tiny() { return zimage::testing::synthetic_tiny_pipeline(); }

// The model behind a gate: every batch waits at it until open() (the future is shared by all batches).
struct GatedModel {
  std::promise<void> gate;
  std::shared_future<void> opened = gate.get_future().share();
  std::atomic<int> started{0};

  Batcher::GenerateFn fn() {
    return [this](const GenerateRequest& r) {
      started++;
      opened.wait();
      return tiny().generate(r);
    };
  }
  void open() { gate.set_value(); }
};

// A server with at most two requests waiting, one image per batch, and an agent check on a free port.
struct Replica {
  Metrics metrics;
  Batcher batcher;
  HttpServer http;
  AgentCheck agent;
  int port, agent_port;

  Replica(Batcher::GenerateFn fn, const std::string& api_key = "")
      : batcher(std::move(fn), {1, std::chrono::milliseconds(0), 2}, metrics),
        http(options(api_key), batcher, metrics),
        agent([this] { return http.agent_status(); }),
        port(http.start()),
        agent_port(agent.start("127.0.0.1", 0)) {}

  static ServerOptions options(const std::string& api_key) {
    ServerOptions o;
    o.port = 0;
    o.api_key = api_key;
    o.model_id = "synthetic:tiny";
    o.policy.default_steps = 2;
    return o;
  }
  httplib::Result get(const std::string& path, const httplib::Headers& headers = {}) {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    return c.Get(path.c_str(), headers);
  }
  httplib::Result generate(const std::string& prompt, const httplib::Headers& headers = {}) {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(60, 0);
    json body = {{"prompt", prompt}, {"size", "64x64"}, {"num_inference_steps", 2}, {"seed", 7}};
    return c.Post("/v1/images/generations", headers, body.dump(), "application/json");
  }
  // What the agent check port says to one connection, as HAProxy reads it.
  std::string agent_line() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(uint16_t(agent_port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string line;
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
      char buf[64];
      for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) line.append(buf, size_t(n));
    }
    close(fd);
    return line;
  }
  bool wait_queue_depth(size_t n) {
    for (int i = 0; i < 2000 && batcher.queue_depth() != n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return batcher.queue_depth() == n;
  }
};

// /ready's status and its JSON "status", or -1 when nothing answered.
std::pair<int, std::string> ready(Replica& r) {
  auto res = r.get("/ready");
  if (!res) return {-1, ""};
  return {res->status, json::parse(res->body)["status"].get<std::string>()};
}

}  // namespace

TEST(Readiness, LoadingThenReadyThenQueueFullThenDraining) {
  GatedModel model;
  Replica r(model.fn());
  EXPECT_EQ(ready(r), std::make_pair(503, std::string("loading")));
  EXPECT_EQ(r.get("/health")->status, 503);
  EXPECT_EQ(r.agent_line(), "ready 100%\n");  // health, not the agent, keeps a loading replica out

  r.http.set_ready();
  auto res = r.get("/ready");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(json::parse(res->body), json({{"status", "ok"}, {"queue_depth", 0}, {"max_queue", 2}}));

  // One request runs (held at the gate), then the queue's two places fill one by one.
  std::vector<std::thread> clients;
  std::vector<int> statuses(3, -1);
  auto send = [&](int i) {
    clients.emplace_back([&, i] {
      auto a = r.generate("p" + std::to_string(i));
      statuses[size_t(i)] = a ? a->status : -1;
    });
  };
  send(0);
  for (int i = 0; i < 2000 && model.started == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(model.started, 1);
  EXPECT_EQ(ready(r), std::make_pair(200, std::string("ok")));
  send(1);
  ASSERT_TRUE(r.wait_queue_depth(1));
  EXPECT_EQ(ready(r), std::make_pair(200, std::string("ok")));
  EXPECT_EQ(r.agent_line(), "ready 50%\n");
  send(2);
  ASSERT_TRUE(r.wait_queue_depth(2));
  res = r.get("/ready");
  EXPECT_EQ(res->status, 503);
  EXPECT_EQ(json::parse(res->body), json({{"status", "queue_full"}, {"queue_depth", 2}, {"max_queue", 2}}));
  EXPECT_EQ(r.get("/health")->status, 200);  // liveness: a busy replica is alive
  EXPECT_EQ(r.agent_line(), "ready 1%\n");
  EXPECT_EQ(r.generate("one too many")->status, 429);

  model.open();
  for (auto& t : clients) t.join();
  EXPECT_EQ(statuses, std::vector<int>({200, 200, 200}));
  EXPECT_EQ(ready(r), std::make_pair(200, std::string("ok")));
  EXPECT_EQ(r.agent_line(), "ready 100%\n");

  r.http.begin_drain();
  EXPECT_EQ(ready(r), std::make_pair(503, std::string("shutting_down")));
  EXPECT_EQ(r.agent_line(), "drain\n");
}

TEST(Readiness, ProbesNeedNoApiKey) {
  GatedModel model;
  model.open();
  Replica r(model.fn(), "secret");
  r.http.set_ready();
  EXPECT_EQ(r.get("/ready")->status, 200);
  EXPECT_EQ(r.get("/health")->status, 200);
  EXPECT_EQ(r.get("/v1/models")->status, 401);
  EXPECT_EQ(r.get("/v1/models", {{"Authorization", "Bearer secret"}})->status, 200);
}

// An id that arrives is answered back and logged with the request's status and time; a missing or
// unfit one (a space, 129 characters) is replaced by 32 fresh hex digits, different for each request.
TEST(RequestId, KeptWhenFitGeneratedOtherwiseAndLogged) {
  GatedModel model;
  model.open();
  Replica r(model.fn());
  r.http.set_ready();
  ::testing::internal::CaptureStderr();
  auto ok = r.generate("a cat", {{"X-Request-Id", "0f8c2a3e-5b9d-4c1e-9a7f-2d6b8e4c1a93"}});
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
  EXPECT_EQ(ok->get_header_value("X-Request-Id"), "0f8c2a3e-5b9d-4c1e-9a7f-2d6b8e4c1a93");
  EXPECT_TRUE(std::regex_search(
      log, std::regex(R"(info: request 0f8c2a3e-5b9d-4c1e-9a7f-2d6b8e4c1a93 generations: 200 in [0-9]+\.[0-9]{3} s)")))
      << log;

  EXPECT_EQ(r.get("/ready", {{"X-Request-Id", "haproxy:42"}})->get_header_value("X-Request-Id"), "haproxy:42");
  EXPECT_EQ(r.get("/no/such/route", {{"X-Request-Id", "lost-1"}})->get_header_value("X-Request-Id"), "lost-1");
  auto bad = r.generate("", {{"X-Request-Id", "bad-1"}});
  EXPECT_EQ(bad->status, 400);
  EXPECT_EQ(bad->get_header_value("X-Request-Id"), "bad-1");

  const std::regex fresh("[0-9a-f]{32}");
  const std::string a = r.get("/ready")->get_header_value("X-Request-Id");
  const std::string b = r.get("/ready")->get_header_value("X-Request-Id");
  EXPECT_TRUE(std::regex_match(a, fresh)) << a;
  EXPECT_TRUE(std::regex_match(b, fresh)) << b;
  EXPECT_NE(a, b);
  for (const std::string& unfit : {std::string("two words"), std::string(129, 'x')}) {
    const std::string got = r.get("/ready", {{"X-Request-Id", unfit}})->get_header_value("X-Request-Id");
    EXPECT_TRUE(std::regex_match(got, fresh)) << got;
  }
  EXPECT_EQ(r.get("/ready", {{"X-Request-Id", std::string(128, 'x')}})->get_header_value("X-Request-Id"),
            std::string(128, 'x'));
}

TEST(AgentCheckPort, APortInUseIsAnErrorThatSaysSo) {
  AgentCheck first([] { return std::string("ready 100%"); });
  const int port = first.start("127.0.0.1", 0);
  ASSERT_GT(port, 0);
  AgentCheck second([] { return std::string("ready 100%"); });
  try {
    second.start("127.0.0.1", port);
    FAIL() << "a second agent check listened on port " << port;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("address in use"), std::string::npos) << e.what();
  }
}
