#include "server/metrics.h"

#include <algorithm>
#include <charconv>

namespace zimage::server {

namespace {

// Shortest text that reads back as the same double (Prometheus parses Go floats).
std::string num(double v) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

void header(std::string& out, const std::string& name, const char* type, const char* help) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, const std::string& labels, double v) {
  // Appended piece by piece: GCC 12 warns (-Wrestrict, falsely) on "{" + labels.
  out += name;
  if (!labels.empty()) out.append(1, '{').append(labels).append(1, '}');
  out.append(1, ' ').append(num(v)).append(1, '\n');
}

// Latency buckets from 5 ms (a GPU text encoder call) to 10 min (the default request timeout).
std::vector<double> seconds_buckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  size_t i = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin());  // first bound >= v
  counts_[i]++;
  sum_ += v;
  count_++;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& labels) const {
  const std::string prefix = labels.empty() ? "" : labels + ",";
  int64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    sample(out, name + "_bucket", prefix + "le=\"" + num(bounds_[i]) + "\"", double(cumulative));
  }
  sample(out, name + "_bucket", prefix + "le=\"+Inf\"", double(count_));
  sample(out, name + "_sum", labels, sum_);
  sample(out, name + "_count", labels, double(count_));
}

Metrics::Metrics()
    : batch_images_({1, 2, 4, 8, 16, 32, 64}),
      request_seconds_(seconds_buckets()),
      queue_wait_seconds_(seconds_buckets()) {
  for (const char* stage : {"text_encoder", "denoise", "vae_decode"}) {
    stage_seconds_.emplace(stage, seconds_buckets());
    non_finite_by_stage_[stage] = 0;  // every stage from the start: a counter that appears late hides its rate
  }
}

void Metrics::set_ready(bool ready) {
  std::lock_guard<std::mutex> lock(mutex_);
  ready_ = ready;
}

void Metrics::set_queue_depth(size_t requests) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_depth_ = requests;
}

void Metrics::request_started(const std::string& kind) {
  std::lock_guard<std::mutex> lock(mutex_);
  in_flight_++;
  requests_by_kind_[kind]++;
}

void Metrics::request_finished(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  in_flight_--;
  request_seconds_.observe(seconds);
}

void Metrics::add_response(int status) {
  std::lock_guard<std::mutex> lock(mutex_);
  requests_by_status_[status]++;
}

void Metrics::observe_queue_wait(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_wait_seconds_.observe(seconds);
}

void Metrics::observe_batch(int images, const StageTimes& t) {
  std::lock_guard<std::mutex> lock(mutex_);
  batch_images_.observe(images);
  stage_seconds_.at("text_encoder").observe(t.text_encoder_ms / 1000);
  stage_seconds_.at("denoise").observe(t.denoise_ms / 1000);
  stage_seconds_.at("vae_decode").observe(t.vae_decode_ms / 1000);
}

void Metrics::add_images(int64_t n, const std::string& kind) {
  std::lock_guard<std::mutex> lock(mutex_);
  images_by_kind_[kind] += n;
}

void Metrics::add_cancelled() {
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_++;
}

void Metrics::add_error(const std::string& kind) {
  std::lock_guard<std::mutex> lock(mutex_);
  errors_by_kind_[kind]++;
}

void Metrics::add_non_finite(const std::string& stage) {
  std::lock_guard<std::mutex> lock(mutex_);
  non_finite_by_stage_[stage]++;
}

void Metrics::set_device_memory(const MemoryStats& stats) {
  std::lock_guard<std::mutex> lock(mutex_);
  memory_ = stats;
}

std::string Metrics::render() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  header(out, "zimage_ready", "gauge", "1 once the model is loaded and warmed up, 0 while loading or shutting down.");
  sample(out, "zimage_ready", "", ready_ ? 1 : 0);
  header(out, "zimage_queue_depth", "gauge", "Generation requests waiting for the batch worker.");
  sample(out, "zimage_queue_depth", "", double(queue_depth_));
  header(out, "zimage_requests_in_flight", "gauge",
         "Generation requests accepted and not yet answered (queued or running).");
  sample(out, "zimage_requests_in_flight", "", double(in_flight_));
  header(out, "zimage_requests_total", "counter",
         "HTTP requests answered on any route, by status (also those refused before routing; 499: the client left "
         "first).");
  for (const auto& [status, n] : requests_by_status_)
    sample(out, "zimage_requests_total", "status=\"" + std::to_string(status) + "\"", double(n));
  header(out, "zimage_requests_cancelled_total", "counter",
         "Queued requests dropped before they ran because the client went away or the request timed out.");
  sample(out, "zimage_requests_cancelled_total", "", double(cancelled_));
  header(out, "zimage_image_requests_total", "counter",
         "Requests that reached an image endpoint, by kind (generations, edits), whatever their answer.");
  for (const char* kind : {"generations", "edits"}) {
    auto it = requests_by_kind_.find(kind);
    sample(out, "zimage_image_requests_total", std::string("kind=\"") + kind + "\"",
           double(it == requests_by_kind_.end() ? 0 : it->second));
  }
  header(out, "zimage_images_generated_total", "counter", "Images generated, by kind (generations, edits).");
  for (const char* kind : {"generations", "edits"}) {
    auto it = images_by_kind_.find(kind);
    sample(out, "zimage_images_generated_total", std::string("kind=\"") + kind + "\"",
           double(it == images_by_kind_.end() ? 0 : it->second));
  }
  header(out, "zimage_errors_total", "counter", "Error answers, by OpenAI error code.");
  for (const auto& [kind, n] : errors_by_kind_) sample(out, "zimage_errors_total", "kind=\"" + kind + "\"", double(n));
  header(out, "zimage_non_finite_batches_total", "counter",
         "Batches failed because a pipeline stage produced NaN or Inf values, by stage.");
  for (const auto& [stage, n] : non_finite_by_stage_)
    sample(out, "zimage_non_finite_batches_total", "stage=\"" + stage + "\"", double(n));
  header(out, "zimage_batch_images", "histogram", "Images per batch run by the worker.");
  batch_images_.render(out, "zimage_batch_images", "");
  header(out, "zimage_stage_seconds", "histogram", "Pipeline stage time per batch.");
  for (const auto& [stage, h] : stage_seconds_) h.render(out, "zimage_stage_seconds", "stage=\"" + stage + "\"");
  header(out, "zimage_queue_wait_seconds", "histogram", "Time a request waited in the queue before its batch started.");
  queue_wait_seconds_.render(out, "zimage_queue_wait_seconds", "");
  header(out, "zimage_request_seconds", "histogram", "End-to-end time of a generation request, arrival to answer.");
  request_seconds_.render(out, "zimage_request_seconds", "");
  header(out, "zimage_device_memory_bytes", "gauge", "Device memory held by the engine (0 on the CPU backend).");
  sample(out, "zimage_device_memory_bytes", "kind=\"in_use\"", double(memory_.in_use));
  sample(out, "zimage_device_memory_bytes", "kind=\"peak\"", double(memory_.peak));
  sample(out, "zimage_device_memory_bytes", "kind=\"cached\"", double(memory_.cached));
  return out;
}

}  // namespace zimage::server
