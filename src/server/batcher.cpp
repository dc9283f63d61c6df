#include "server/batcher.h"

#include <new>

#include "core/log.h"

namespace zimage::server {

namespace {

// Requests that can share one denoising loop: everything but the prompts and the seeds must match.
// An edit runs alone: the pipeline draws an image batch's VAE samples and noise from one generator
// (diffusers' order), so two edits in one batch would not get the draws each gets alone. A ControlNet
// request runs alone too: its control image conditions its whole batch.
bool compatible(const ImageRequest& a, const ImageRequest& b) {
  if (a.runs_alone() || b.runs_alone()) return false;
  return a.width == b.width && a.height == b.height && a.steps == b.steps && a.guidance == b.guidance &&
         a.cfg_normalization == b.cfg_normalization && a.cfg_truncation == b.cfg_truncation &&
         a.max_sequence_length == b.max_sequence_length;
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The batch request for these jobs: prompts repeated per image, one noise group per seed.
GenerateRequest batch_request(const std::vector<std::shared_ptr<Job>>& jobs) {
  const ImageRequest& first = jobs.front()->request();
  GenerateRequest g;
  g.width = first.width;
  g.height = first.height;
  g.steps = first.steps;
  g.guidance = first.guidance;
  g.cfg_normalization = first.cfg_normalization;
  g.cfg_truncation = first.cfg_truncation;
  g.max_sequence_length = first.max_sequence_length;
  g.generator = GeneratorDevice::Cuda;  // as SGLang; the engine computes torch's CUDA stream on any backend
  g.num_images_per_prompt = 1;
  if (first.runs_alone()) {  // alone in its batch (compatible())
    ZI_ASSERT(jobs.size() == 1);
    g.prompts.assign(size_t(first.n), first.prompt);
    g.negative_prompts.assign(size_t(first.n), first.negative_prompt);
    if (first.seeds.size() == 1) {  // an edit's images: one generator seeded with its seed
      g.seed = first.seeds[0];
    } else {
      for (uint64_t s : first.seeds) g.noise_groups.push_back({1, s});
    }
    g.images = first.images;
    g.masks = first.masks;
    g.strength = first.strength;
    g.control_image = first.control_image;
    g.controlnet_scale = first.controlnet_scale;
    if (!first.adapters.empty()) g.lora_groups.push_back({first.n, first.adapters});
    return g;
  }
  for (const auto& job : jobs) {
    const ImageRequest& r = job->request();
    for (int i = 0; i < r.n; ++i) {
      g.prompts.push_back(r.prompt);
      g.negative_prompts.push_back(r.negative_prompt);
    }
    g.lora_groups.push_back({r.n, r.adapters});  // different adapters share the batch, per image
    if (r.seeds.size() == 1) {
      g.noise_groups.push_back({r.n, r.seeds[0]});
    } else {
      for (uint64_t s : r.seeds) g.noise_groups.push_back({1, s});
    }
  }
  bool any_lora = false;
  for (const auto& lg : g.lora_groups) any_lora = any_lora || !lg.adapters.empty();
  if (!any_lora) g.lora_groups.clear();
  return g;
}

}  // namespace

Job::Job(ImageRequest request) : request_(std::move(request)), arrival_(Clock::now()) {
  ZI_ASSERT(request_.seeds.size() == 1 || request_.seeds.size() == size_t(request_.n));
}

bool Job::wait_until(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  return done_.wait_until(lock, deadline, [&] { return result_.has_value(); });
}

void Job::finish(JobResult result) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    result_ = std::move(result);
  }
  done_.notify_all();
}

Batcher::Batcher(GenerateFn generate, Options options, Metrics& metrics)
    : generate_(std::move(generate)), options_(options), metrics_(metrics), worker_([this] { work(); }) {}

Batcher::~Batcher() { drain(); }

Batcher::Admission Batcher::submit(std::shared_ptr<Job> job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return Admission::ShuttingDown;
    if (queue_.size() >= options_.max_queue) return Admission::QueueFull;
    queue_.push_back(std::move(job));
    metrics_.set_queue_depth(queue_.size());
  }
  changed_.notify_all();
  return Admission::Queued;
}

bool Batcher::cancel(const std::shared_ptr<Job>& job) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = queue_.begin(); it != queue_.end(); ++it)
    if (*it == job) {
      queue_.erase(it);
      metrics_.set_queue_depth(queue_.size());
      metrics_.add_cancelled();
      return true;
    }
  return false;
}

void Batcher::drain() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();
}

size_t Batcher::queue_depth() {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

std::vector<std::shared_ptr<Job>> Batcher::take_batch(std::unique_lock<std::mutex>& lock) {
  std::vector<std::shared_ptr<Job>> batch{queue_.front()};
  queue_.pop_front();
  int images = batch[0]->request().n;
  const auto deadline = Clock::now() + options_.batch_delay;
  for (;;) {
    for (auto it = queue_.begin(); it != queue_.end() && images < options_.max_batch_images;) {
      const ImageRequest& r = (*it)->request();
      if (compatible(r, batch[0]->request()) && images + r.n <= options_.max_batch_images) {
        images += r.n;
        batch.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    // While draining nothing new can arrive, so waiting would only delay the shutdown.
    if (images >= options_.max_batch_images || stopping_ || Clock::now() >= deadline) break;
    changed_.wait_until(lock, deadline);
  }
  metrics_.set_queue_depth(queue_.size());
  return batch;
}

void Batcher::work() {
  for (;;) {
    std::vector<std::shared_ptr<Job>> batch;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return !queue_.empty() || stopping_; });
      if (queue_.empty()) return;  // stopping, and everything queued has run
      batch = take_batch(lock);
    }
    run_batch(batch);
  }
}

void Batcher::run_batch(const std::vector<std::shared_ptr<Job>>& batch) {
  int images = 0;
  for (const auto& job : batch) {
    metrics_.observe_queue_wait(seconds_since(job->arrival()));
    images += job->request().n;
  }
  JobResult failed;
  failed.batch_images = images;
  const auto t0 = Clock::now();
  try {
    GenerateResult res = generate_(batch_request(batch));
    const double inference_s = seconds_since(t0);
    metrics_.observe_batch(images, res.times);
    metrics_.add_images(images, batch[0]->request().is_edit() ? "edits" : "generations");
    int64_t offset = 0;
    for (const auto& job : batch) {
      JobResult r;
      r.ok = true;
      r.images = res.images.narrow0(offset, job->request().n);
      r.inference_s = inference_s;
      r.batch_images = images;
      offset += job->request().n;
      job->finish(std::move(r));
    }
    return;
  } catch (const NonFiniteError& e) {
    metrics_.add_non_finite(e.stage());
    failed.error_kind = e.kind();
    failed.error = e.what();
  } catch (const Error& e) {
    failed.error_kind = e.kind();
    failed.error = e.what();
  } catch (const std::bad_alloc&) {
    failed.error_kind = ErrorKind::OutOfMemory;
    failed.error = "host memory exhausted";
  } catch (const std::exception& e) {
    failed.error_kind = ErrorKind::Internal;
    failed.error = e.what();
  }
  // The whole batch shares the failure (an out-of-memory batch fails as one); the worker goes on.
  log_warn("a batch of " + std::to_string(images) + " image(s) failed: " + failed.error);
  failed.inference_s = seconds_since(t0);
  for (const auto& job : batch) job->finish(failed);
}

}  // namespace zimage::server
