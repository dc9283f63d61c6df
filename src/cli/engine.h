// The devices a command runs on: one backend, or --num-gpus ranks (NCCL over GPUs, or ranks simulated
// on the CPU), and the generator that drives them. Commands that generate share these flags.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/model_source.h"
#include "parallel/parallel_config.h"
#include "parallel/rank_world.h"
#include "pipeline/text_to_image.h"

namespace zimage::cli {

// "cpu", "cuda" or "auto" (the GPU when this build has CUDA and a device is present, else the CPU).
std::unique_ptr<Backend> make_backend(const std::string& which, int device = 0);

struct DeviceOptions {
  std::string backend = "auto";
  int num_gpus = 1, ulysses_degree = 0, ring_degree = 0;  // 0: derived from --num-gpus
  bool cfg_parallel = false;
  bool low_memory = false;  // PipelineLimits::low_memory
  bool cuda_graphs = false;  // PipelineLimits::cuda_graphs
};

// --backend, --num-gpus, --ulysses-degree, --ring-degree, --cfg-parallel, --low-memory.
void add_device_options(CLI::App* cmd, DeviceOptions& o);

// The flags checked against the model's heads and the GPUs present, before anything is loaded.
ParallelConfig check_device_options(const DeviceOptions& o, const ModelSource& model);

// Declared in destruction order: the generator goes first, then the world, then the backends.
struct Engine {
  std::vector<std::unique_ptr<Backend>> backends;
  std::unique_ptr<RankWorld> world;
  std::unique_ptr<ImageGenerator> generator;

  // "cuda:0 NVIDIA H200", or with " x2" for two ranks.
  std::string device() const;
  void synchronize();  // every backend's queued work done
};

// Loads the model on every rank.
Engine make_engine(const DeviceOptions& o, const ParallelConfig& par, const ModelSource& model,
                   PipelineLimits limits = {});

}  // namespace zimage::cli
