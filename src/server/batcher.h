// The generation queue and its one worker thread. Requests wait in a bounded FIFO; the worker takes the
// oldest, adds the queued requests that can share its batch (same size, steps, guidance and CFG
// settings, max_sequence_length) up to `max_batch_images` images, waiting at most `batch_delay` for more,
// and runs them as one GenerateRequest. Each request keeps its own noise (one NoiseGroup per request, or
// per image for a seed list), so an image made in a batch is the image the request gets alone. An edit
// (image to image, inpainting) runs in a batch of its own: the pipeline draws an image batch's VAE
// samples and noise from one generator, as diffusers does, so only alone does it get its own draws.
//
// One worker because one model owns the device: batching, not concurrency, is what fills it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "core/error.h"
#include "pipeline/text_to_image.h"
#include "server/image_request.h"
#include "server/metrics.h"

namespace zimage::server {

using Clock = std::chrono::steady_clock;

struct JobResult {
  bool ok = false;
  ErrorKind error_kind = ErrorKind::Internal;
  std::string error;
  Tensor images;           // uint8 [n, H, W, 3] on the host
  double inference_s = 0;  // wall time of the batch's generation
  int batch_images = 0;    // images in the batch this request ran in
};

// One request in the queue. The HTTP thread that made it waits on it; the worker finishes it.
class Job {
 public:
  explicit Job(ImageRequest request);  // request.seeds must be filled in (one seed, or one per image)

  const ImageRequest& request() const { return request_; }
  Clock::time_point arrival() const { return arrival_; }
  // Waits until the result is there or `deadline` passes; true when it is there.
  bool wait_until(Clock::time_point deadline);
  const JobResult& result() const { return *result_; }  // once wait_until returned true

 private:
  friend class Batcher;
  void finish(JobResult result);

  ImageRequest request_;
  Clock::time_point arrival_;
  std::mutex mutex_;
  std::condition_variable done_;
  std::optional<JobResult> result_;
};

class Batcher {
 public:
  // The model: the pipeline's generate, or a stand-in in tests.
  using GenerateFn = std::function<GenerateResult(const GenerateRequest&)>;
  struct Options {
    int max_batch_images = 4;
    std::chrono::milliseconds batch_delay{10};
    size_t max_queue = 64;  // requests waiting, not counting the batch that runs
  };
  enum class Admission { Queued, QueueFull, ShuttingDown };

  Batcher(GenerateFn generate, Options options, Metrics& metrics);  // starts the worker
  ~Batcher();                                                       // drain()

  Admission submit(std::shared_ptr<Job> job);
  // Drops a job that is still queued: true when it will never run. A running job runs to the end.
  bool cancel(const std::shared_ptr<Job>& job);
  // Refuses new jobs, runs every queued one, then stops the worker. Returns when all are finished.
  void drain();
  size_t queue_depth();
  size_t max_queue() const { return options_.max_queue; }

 private:
  void work();
  std::vector<std::shared_ptr<Job>> take_batch(std::unique_lock<std::mutex>& lock);
  void run_batch(const std::vector<std::shared_ptr<Job>>& batch);

  GenerateFn generate_;
  Options options_;
  Metrics& metrics_;
  std::mutex mutex_;
  std::condition_variable changed_;  // a job arrived, or stopping_ was set
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace zimage::server
