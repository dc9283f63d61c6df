// N ranks of a model simulated on CPU backends: the multi-GPU pipeline as it runs over NCCL, for the
// tests that compare it with one rank. Header-only: for the tests that link the pipeline.
#pragma once

#include <memory>
#include <vector>

#include "parallel/local_communicator.h"
#include "parallel/parallel_config.h"
#include "pipeline/multi_gpu_pipeline.h"

namespace zimage::testing {

struct SimulatedRanks {
  std::vector<std::unique_ptr<Backend>> backends;
  LocalWorld world;
  std::unique_ptr<MultiGpuPipeline> pipeline;

  SimulatedRanks(const ParallelConfig& c, const ModelSource& model) : world(c.num_gpus) {
    std::vector<Backend*> raw;
    for (int r = 0; r < c.num_gpus; ++r) {
      backends.push_back(make_cpu_backend());
      raw.push_back(backends.back().get());
    }
    pipeline = std::make_unique<MultiGpuPipeline>(raw, world, model, c);
  }
};

// U Ulysses ranks times R ring ranks, times 2 with cfg (a CFG pair).
inline ParallelConfig parallel(int u, bool cfg, int ring = 1) {
  ParallelConfig c;
  c.ulysses_degree = u;
  c.ring_degree = ring;
  c.cfg_parallel = cfg;
  c.num_gpus = u * ring * c.cfg_groups();
  return c;
}

}  // namespace zimage::testing
