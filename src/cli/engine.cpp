// How a command gets its backend(s) and generator from --backend / --num-gpus / --ulysses-degree /
// --cfg-parallel.
#include "cli/engine.h"

#include "core/error.h"
#include "core/log.h"
#include "parallel/local_communicator.h"
#include "parallel/nccl_communicator.h"
#include "pipeline/multi_gpu_pipeline.h"

namespace zimage::cli {

std::unique_ptr<Backend> make_backend(const std::string& which, int device) {
  if (which == "cpu") return make_cpu_backend();
  if (which == "cuda") return make_cuda_backend(device);
  if (which == "auto") return cuda_device_count() > 0 ? make_cuda_backend(device) : make_cpu_backend();
  throw Error(ErrorKind::InvalidArgument, "unknown backend '" + which + "' (use cpu, cuda or auto)");
}

void add_device_options(CLI::App* cmd, DeviceOptions& o) {
  cmd->add_option("--backend", o.backend, "cpu, cuda or auto")->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->add_option("--num-gpus", o.num_gpus,
                  "GPUs for one request (= --ulysses-degree x --ring-degree, x2 with --cfg-parallel); with --backend "
                  "cpu the ranks are simulated in one process, one at a time (a check of the multi-GPU path, not a "
                  "speed-up)");
  cmd->add_option("--ulysses-degree", o.ulysses_degree,
                  "GPUs that split each image's heads (must divide the DiT's heads; default: the largest divisor of "
                  "the heads that divides --num-gpus)");
  cmd->add_option("--ring-degree", o.ring_degree,
                  "Ulysses groups that pass K/V blocks around a ring (ring attention; default: what --num-gpus "
                  "leaves after --ulysses-degree)");
  cmd->add_flag("--cfg-parallel", o.cfg_parallel, "Run the positive and negative CFG branches on two groups of GPUs");
  cmd->add_flag("--low-memory", o.low_memory,
                "Keep the text encoder in host memory and stream its layers to the device per prompt "
                "(peak 13.8 instead of 20.6 GiB at 1024x1024; ~0.33 s more per request from model files)");
  cmd->add_flag("--cuda-graphs", o.cuda_graphs,
                "Replay the text encoder and each denoising step as recorded CUDA graphs (one device). H200: text "
                "encoder 3.9 -> 3.3 ms, DiT within 1%; reserves one forward's activations per graph (+1.3 GiB at "
                "1024x1024)");
}

ParallelConfig check_device_options(const DeviceOptions& o, const ModelSource& model) {
  const int found = o.backend == "cpu" ? o.num_gpus : cuda_device_count();
  return parallel_config(o.num_gpus, o.ulysses_degree, o.ring_degree, o.cfg_parallel,
                         DitConfig::from(model.transformer).heads, found);
}

std::string Engine::device() const {
  std::string d = backends[0]->name();
  if (backends.size() > 1) d += " x" + std::to_string(backends.size());
  return d;
}

void Engine::synchronize() {
  for (auto& b : backends) b->synchronize();
}

Engine make_engine(const DeviceOptions& o, const ParallelConfig& par, const ModelSource& model, PipelineLimits limits) {
  limits.low_memory = o.low_memory;
  limits.cuda_graphs = o.cuda_graphs;
  Engine e;
  if (par.num_gpus == 1) {
    e.backends.push_back(make_backend(o.backend));
    e.generator = std::make_unique<TextToImagePipeline>(*e.backends[0], model, limits);
    return e;
  }
  std::vector<Backend*> raw;
  std::vector<int> devices;
  for (int g = 0; g < par.num_gpus; ++g) {
    e.backends.push_back(make_backend(o.backend, g));
    raw.push_back(e.backends.back().get());
    devices.push_back(g);
  }
  if (o.backend == "cpu") {
    log_info(std::to_string(par.num_gpus) + " ranks simulated on the CPU, one at a time");
    e.world = std::make_unique<LocalWorld>(par.num_gpus);
  } else {
    e.world = make_nccl_world(devices, raw);
  }
  e.generator = std::make_unique<MultiGpuPipeline>(raw, *e.world, model, par, limits);
  return e;
}

}  // namespace zimage::cli
