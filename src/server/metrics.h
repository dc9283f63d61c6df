// What the server tells operators, in Prometheus' text format (GET /metrics): readiness, queue depth,
// requests in flight, the size of every batch, latency histograms per pipeline stage (per batch) and
// per request (queue wait, end to end), images generated, cancelled requests, errors by kind, batches
// failed by a NaN/Inf per stage and the device memory the engine holds. Updated from the HTTP threads
// and the batch worker; one lock.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "pipeline/text_to_image.h"

namespace zimage::server {

// Cumulative buckets with fixed upper bounds, as Prometheus histograms are.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  // Appends the _bucket, _sum and _count lines; `labels` ("stage=\"denoise\"") goes into each.
  void render(std::string& out, const std::string& name, const std::string& labels) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // per bucket, not cumulative; one more for +Inf
  double sum_ = 0;
  int64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();

  void set_ready(bool ready);
  void set_queue_depth(size_t requests);
  // A request to an image endpoint reached its handler; `kind` is the endpoint: "generations" or "edits"
  // (zimage_image_requests_total{kind})...
  void request_started(const std::string& kind);
  void request_finished(double seconds);  // ...and was answered after `seconds`
  // Any HTTP answer, on any route, by status: also those refused before routing (400, 408, 413) and
  // 401s; 499 when the client left before its answer.
  void add_response(int status);
  void observe_queue_wait(double seconds);
  // One batch run by the worker: how many images it held and the pipeline's stage times.
  void observe_batch(int images, const StageTimes& times);
  void add_images(int64_t n, const std::string& kind);  // zimage_images_generated_total{kind}
  void add_cancelled();                     // a queued request dropped before it ran (client gone, timeout)
  void add_error(const std::string& kind);  // an error answer, by its OpenAI error code
  // A batch failed by the numerical guards: `stage` (text_encoder, denoise, vae_decode) produced NaN/Inf.
  void add_non_finite(const std::string& stage);
  void set_device_memory(const MemoryStats& stats);

  std::string render() const;

 private:
  mutable std::mutex mutex_;
  bool ready_ = false;
  size_t queue_depth_ = 0;
  int64_t in_flight_ = 0, cancelled_ = 0;
  std::map<std::string, int64_t> requests_by_kind_, images_by_kind_;
  std::map<int, int64_t> requests_by_status_;
  std::map<std::string, int64_t> errors_by_kind_;
  std::map<std::string, int64_t> non_finite_by_stage_;
  MemoryStats memory_;
  Histogram batch_images_, request_seconds_, queue_wait_seconds_;
  std::map<std::string, Histogram> stage_seconds_;  // text_encoder, denoise, vae_decode
};

}  // namespace zimage::server
