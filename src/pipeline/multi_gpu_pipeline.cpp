#include "pipeline/multi_gpu_pipeline.h"

#include "core/error.h"
#include "parallel/sequence_parallel_plan.h"

namespace zimage {

MultiGpuPipeline::MultiGpuPipeline(const std::vector<Backend*>& backends, RankWorld& world, const ModelSource& model,
                                   const ParallelConfig& config, PipelineLimits limits)
    : world_(world), config_(config) {
  const int n = config.num_gpus, u = config.ulysses_degree, rings = config.ring_degree, seq = config.sequence_degree();
  ZI_CHECK(n == world.size() && size_t(n) == backends.size() && n == seq * config.cfg_groups(), ErrorKind::Internal,
           "multi-GPU pipeline: " + std::to_string(backends.size()) + " backends and a world of " +
               std::to_string(world.size()) + " ranks for " + std::to_string(n) + " GPUs");
  // Communicators by world rank, within each CFG branch of seq = U R ranks: Ulysses groups are U
  // consecutive ranks, rings the R ranks with the same place in their Ulysses groups; CFG pairs are the
  // ranks with the same place in the two branches.
  auto make_groups = [&](std::vector<std::unique_ptr<Communicator>>& out, int groups, int size, auto member) {
    out.resize(size_t(n));
    for (int c = 0; c < config.cfg_groups(); ++c)
      for (int g = 0; g < groups; ++g) {
        std::vector<int> members;
        for (int j = 0; j < size; ++j) members.push_back(c * seq + member(g, j));
        auto comms = world.make_group(members);
        for (int j = 0; j < size; ++j) out[size_t(members[size_t(j)])] = std::move(comms[size_t(j)]);
      }
  };
  if (u > 1) make_groups(ulysses_, rings, u, [u](int g, int j) { return g * u + j; });
  if (rings > 1) make_groups(ring_, u, rings, [u](int g, int j) { return j * u + g; });
  if (config.cfg_parallel) {
    cfg_.resize(size_t(n));
    for (int j = 0; j < seq; ++j) {
      auto comms = world.make_group({j, seq + j});
      cfg_[size_t(j)] = std::move(comms[0]);
      cfg_[size_t(seq + j)] = std::move(comms[1]);
    }
  }
  ranks_.resize(size_t(n));
  world.run([&](int r) {
    RankContext ctx;
    ctx.rank = r;
    if (!ulysses_.empty()) ctx.ulysses = ulysses_[size_t(r)].get();
    if (!ring_.empty()) ctx.ring = ring_[size_t(r)].get();
    if (!cfg_.empty()) ctx.cfg = cfg_[size_t(r)].get();
    ranks_[size_t(r)] = std::make_unique<TextToImagePipeline>(*backends[size_t(r)], model, limits, ctx);
  });
}

GenerateRequest MultiGpuPipeline::resolve(GenerateRequest r) const {
  r = ranks_[0]->resolve(std::move(r));
  const int m = ranks_[0]->size_multiple();
  plan_sequence_parallel(r.height / m, r.width / m, config_.ulysses_degree,
                         DitConfig::from(ranks_[0]->model().transformer).heads, config_.ring_degree);
  return r;
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
