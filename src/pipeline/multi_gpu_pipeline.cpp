#include "pipeline/multi_gpu_pipeline.h"

#include "core/error.h"

namespace zimage {

MultiGpuPipeline::MultiGpuPipeline(const std::vector<Backend*>& backends, RankWorld& world, const ModelSource& model,
                                   const ParallelConfig& config, PipelineLimits limits)
    : world_(world) {
  const int n = config.num_gpus, u = config.ulysses_degree;
  ZI_CHECK(n == world.size() && size_t(n) == backends.size() && n == u * config.cfg_groups(), ErrorKind::Internal,
           "multi-GPU pipeline: " + std::to_string(backends.size()) + " backends and a world of " +
               std::to_string(world.size()) + " ranks for " + std::to_string(n) + " GPUs");
  // Communicators by world rank: Ulysses groups are the U consecutive ranks of one CFG branch, CFG
  // pairs are the ranks with the same place in the two branches.
  if (u > 1) {
    ulysses_.resize(size_t(n));
    for (int c = 0; c < config.cfg_groups(); ++c) {
      std::vector<int> members;
      for (int j = 0; j < u; ++j) members.push_back(c * u + j);
      auto comms = world.make_group(members);
      for (int j = 0; j < u; ++j) ulysses_[size_t(members[size_t(j)])] = std::move(comms[size_t(j)]);
    }
  }
  if (config.cfg_parallel) {
    cfg_.resize(size_t(n));
    for (int j = 0; j < u; ++j) {
      auto comms = world.make_group({j, u + j});
      cfg_[size_t(j)] = std::move(comms[0]);
      cfg_[size_t(u + j)] = std::move(comms[1]);
    }
  }
  ranks_.resize(size_t(n));
  world.run([&](int r) {
    RankContext ctx;
    ctx.rank = r;
    if (!ulysses_.empty()) ctx.ulysses = ulysses_[size_t(r)].get();
    if (!cfg_.empty()) ctx.cfg = cfg_[size_t(r)].get();
    ranks_[size_t(r)] = std::make_unique<TextToImagePipeline>(*backends[size_t(r)], model, limits, ctx);
  });
}

GenerateResult MultiGpuPipeline::generate(const GenerateRequest& request, const std::function<void(int, int)>& progress) {
  // A bad request fails here, on the caller's thread, and not on every rank (which would abort NCCL).
  const GenerateRequest resolved = resolve(request);
  GenerateResult out;
  world_.run([&](int r) {
    GenerateResult res = ranks_[size_t(r)]->generate_unchecked(resolved, r == 0 ? progress : nullptr);
    if (r == 0) out = std::move(res);
  });
  check_finite(out.non_finite);  // here too, so that a NaN fails the request and not the ranks
  return out;
}

}  // namespace zimage
