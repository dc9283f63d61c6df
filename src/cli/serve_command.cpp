// `zimage serve`: the model loaded once behind an OpenAI-compatible HTTP API (src/server/). Flags follow
// SGLang's `sglang serve` where it has one. The listener opens first, so /health answers 503 while the
// model loads and warms up; SIGTERM or SIGINT stops taking requests, finishes the queued and running
// ones and exits 0 (a second signal exits at once). Behind a load balancer: /ready, X-Request-Id and the
// agent check (--agent-port) are what scripts/cluster.sh and deploy/ use.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <optional>

#include "cli/commands.h"
#include "cli/component_flags.h"
#include "cli/engine.h"
#include "core/error.h"
#include "core/log.h"
#include "pipeline/text_to_image.h"
#include "server/agent_check.h"
#include "server/batcher.h"
#include "server/http_server.h"
#include "server/lora_library.h"

namespace zimage::cli {

namespace {

struct ServeOptions {
  std::string model, host = "127.0.0.1", api_key, warmup_size = "1024x1024", public_url, lora_dir;
  size_t lora_cache = 16;
  int port = 30000, max_batch_size = 4, batch_delay_ms = 10, max_queue = 64, max_n = 4, max_connections = 1024;
  int agent_port = -1;  // none
  double request_timeout_s = 600, read_timeout_s = 30;
  int64_t max_pixels = int64_t(2048) * 2048;
  size_t max_body_bytes = size_t(1) << 20, url_max_images = 256;
  int url_ttl_s = 3600;
  ComponentFiles files;
  ControlNetFlags controlnet;
  QuantizationFlags quantization;
  bool warmup = false;
  DeviceOptions device;
};

// The signal handler only writes a byte to this pipe (async-signal-safe); the main thread reads it.
// A handler rather than sigwait: threads started before main (OpenBLAS') do not block the signals.
int g_signal_pipe[2] = {-1, -1};
std::atomic<int> g_signals{0};

void on_signal(int) {
  if (g_signals.fetch_add(1) >= 1) _exit(1);  // asked twice: stop now
  char byte = 1;
  ssize_t ignored = write(g_signal_pipe[1], &byte, 1);
  (void)ignored;
}

void install_signal_handlers() {
  ZI_CHECK(pipe(g_signal_pipe) == 0, ErrorKind::Io, "cannot create the signal pipe");
  struct sigaction sa = {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

void block_until_signal() {
  char byte;
  while (read(g_signal_pipe[0], &byte, 1) < 0 && errno == EINTR) {
  }
}

// "1024x1024" -> width, height.
std::pair<int, int> parse_warmup_size(const std::string& s) {
  int w = 0, h = 0, end = 0;
  ZI_CHECK(std::sscanf(s.c_str(), "%dx%d%n", &w, &h, &end) == 2 && size_t(end) == s.size(), ErrorKind::InvalidArgument,
           "--warmup-size must look like 1024x1024, got '" + s + "'");
  return {w, h};
}

// "https://images.example.com/zimage" -> itself without a trailing '/'.
std::string check_public_url(std::string url) {
  ZI_CHECK(url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0, ErrorKind::InvalidArgument,
           "--public-url must start with http:// or https://, got '" + url + "'");
  while (url.back() == '/') url.pop_back();
  return url;
}

}  // namespace

Command add_serve(CLI::App& app) {
  auto* cmd = app.add_subcommand("serve", "Serve the model over an OpenAI-compatible HTTP API");
  auto o = std::make_shared<ServeOptions>();
  cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_option("--model-path,--model", o->model, "Model folder (diffusers layout) or synthetic:tiny|turbo");
  add_component_flags(cmd, o->files);
  add_controlnet_flags(cmd, o->controlnet);
  add_quantization_flags(cmd, o->quantization);
  cmd->add_option("--host", o->host, "Address to listen on (default 127.0.0.1: this machine only)");
  cmd->add_option("--port", o->port, "Port to listen on (0: any free port, printed at start)")
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--agent-port", o->agent_port,
                  "Port of HAProxy's agent check (0: any free port, printed at start; default: none): it answers "
                  "'ready N%' (N: the free share of the queue) or 'drain' while shutting down")
      ->check(CLI::Range(0, 65535));
  add_device_options(cmd, o->device);
  cmd->add_flag("--warmup", o->warmup, "Generate one image before /health reports ready");
  cmd->add_option("--warmup-size", o->warmup_size, "Image size of the warm-up generation, WxH (default 1024x1024)");
  cmd->add_option("--max-batch-size", o->max_batch_size, "Most images the worker runs as one batch")
      ->check(CLI::Range(1, 256));
  cmd->add_option("--batch-delay-ms", o->batch_delay_ms, "Longest wait for more requests to fill a batch")
      ->check(CLI::Range(0, 60000));
  cmd->add_option("--max-queue", o->max_queue, "Requests that may wait; more get 429")->check(CLI::Range(1, 100000));
  cmd->add_option("--request-timeout", o->request_timeout_s, "Seconds a request may take, queue included; then 504")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--api-key", o->api_key, "Require 'Authorization: Bearer KEY' on every route but /health");
  cmd->add_option("--max-pixels", o->max_pixels, "Largest width*height accepted")
      ->check(CLI::Range(int64_t(256), int64_t(1) << 30));
  cmd->add_option("--max-n", o->max_n, "Most images per request (n)")->check(CLI::Range(1, 256));
  cmd->add_option("--max-body-bytes", o->max_body_bytes,
                  "Largest request body after chunked/gzip decoding; larger gets 413")
      ->check(CLI::Range(size_t(64), size_t(1) << 30));
  cmd->add_option("--url-ttl", o->url_ttl_s, "Seconds the images of url answers are kept")
      ->check(CLI::Range(1, 7 * 24 * 3600));
  cmd->add_option("--url-max-images", o->url_max_images,
                  "Most images of url answers kept at a time (oldest go first); a url request with more n is 400")
      ->check(CLI::Range(size_t(1), size_t(1) << 20));
  cmd->add_option("--public-url", o->public_url,
                  "Start of the urls in url answers, e.g. https://images.example.com (default: http://HOST:PORT)");
  cmd->add_option("--read-timeout", o->read_timeout_s,
                  "Seconds a client has to send a whole request (headers and body); then 408 and the connection closes")
      ->check(CLI::Range(0.1, 3600.0));
  cmd->add_option("--max-connections", o->max_connections,
                  "Connections served at once, one thread each (default 1024); more get 503")
      ->check(CLI::Range(1, 100000));
  cmd->add_option(
      "--lora-dir", o->lora_dir,
      "Folder of LoRA files (*.safetensors) requests may name (\"lora\": [{\"name\": STEM, \"scale\": S}]); "
      "applied per request, base weights unchanged");
  cmd->add_option("--lora-cache", o->lora_cache, "LoRA files kept loaded (least recently used dropped; default 16)")
      ->check(CLI::Range(1, 100000));
  return {cmd, [o] {
            install_signal_handlers();
            const auto [warmup_w, warmup_h] = parse_warmup_size(o->warmup_size);
            const std::string public_url = o->public_url.empty() ? "" : check_public_url(o->public_url);
            ModelSource model = open_model(o->model, o->files);  // configs only: a bad path fails before anything listens
            attach_controlnet(model, o->controlnet);
            apply_quantization(model, o->quantization);
            const ParallelConfig par = check_device_options(o->device, model);
            server::Metrics metrics;
            Engine engine;
            // Requests reach the pipeline only after set_ready(), when it exists.
            auto generate = [&](const GenerateRequest& r) {
              GenerateResult res = engine.generator->generate(r);
              metrics.set_device_memory(engine.generator->backend().memory_stats());
              return res;
            };
            server::Batcher::Options bo;
            bo.max_batch_images = o->max_batch_size;
            bo.batch_delay = std::chrono::milliseconds(o->batch_delay_ms);
            bo.max_queue = size_t(o->max_queue);
            server::Batcher batcher(generate, bo, metrics);

            server::ServerOptions so;
            so.host = o->host;
            so.port = o->port;
            so.api_key = o->api_key;
            so.max_body_bytes = o->max_body_bytes;
            so.request_timeout = std::chrono::milliseconds(int64_t(o->request_timeout_s * 1000));
            so.url_ttl = std::chrono::seconds(o->url_ttl_s);
            so.url_max_images = o->url_max_images;
            so.public_url = public_url;
            so.read_timeout = std::chrono::milliseconds(int64_t(o->read_timeout_s * 1000));
            so.max_connections = o->max_connections;
            so.model_id = model.name;
            so.policy.max_n = o->max_n;
            so.policy.max_pixels = o->max_pixels;
            so.policy.default_steps = model.default_steps;
            so.policy.default_guidance = model.default_guidance;
            so.policy.controlnet = model.controlnet != nullptr;
            if (!o->lora_dir.empty()) {
              so.loras = std::make_shared<server::LoraLibrary>(o->lora_dir, ZImageDit::weight_specs(model.transformer),
                                                               o->lora_cache);
              so.policy.lora_names.insert(so.loras->names().begin(), so.loras->names().end());
              log_info("LoRA adapters in " + o->lora_dir + ": " + std::to_string(so.loras->names().size()));
            }
            server::HttpServer http(so, batcher, metrics);
            int port = http.start();
            std::printf("zimage serve: listening on http://%s:%d\n", o->host.c_str(), port);
            // Destroyed before `http`, whose state it reports; it says "drain" until the process exits.
            std::optional<server::AgentCheck> agent;
            if (o->agent_port >= 0) {
              agent.emplace([&http] { return http.agent_status(); });
              const int agent_port = agent->start(o->host, o->agent_port);
              std::printf("zimage serve: agent check on %s:%d\n", o->host.c_str(), agent_port);
            }
            std::fflush(stdout);

            auto t0 = std::chrono::steady_clock::now();
            model.prefetch_weights();  // the files are read while the device initializes
            PipelineLimits limits;
            limits.max_pixels = o->max_pixels;
            limits.max_batch = std::max(o->max_batch_size, o->max_n);
            engine = make_engine(o->device, par, model, limits);
            engine.synchronize();  // uploads are asynchronous: the load ends when the last one has landed
            double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            log_info("loaded " + model.name + " on " + engine.device() + " in " + std::to_string(load_s) + " s");
            if (o->warmup) {
              GenerateRequest r;
              r.prompts = {"warm-up"};
              r.width = warmup_w;
              r.height = warmup_h;
              r.steps = 1;  // every kernel and shape of a real request, at a fraction of its time
              engine.generator->generate(r);
              log_info("warmed up at " + o->warmup_size);
            }
            metrics.set_device_memory(engine.generator->backend().memory_stats());
            http.set_ready();
            log_info("ready: POST http://" + o->host + ":" + std::to_string(port) + "/v1/images/generations");

            block_until_signal();
            log_info("shutting down: finishing " + std::to_string(batcher.queue_depth()) + " queued request(s)");
            http.begin_drain();
            batcher.drain();
            http.stop();
            log_info("stopped");
            return 0;
          }};
}

}  // namespace zimage::cli
