// How one generate request is spread over GPUs: `--num-gpus N`, `--ulysses-degree U`, `--cfg-parallel`.
// N = U without CFG parallelism and N = 2U with it: GPUs [0, U) run the positive branch of a CFG
// request (and the whole batch of a request without CFG), GPUs [U, 2U) the negative branch, and each
// group of U splits every image's tokens (sequence_parallel_plan.h). Validated at the CLI edge, before
// anything is loaded.
#pragma once

#include <cstdint>

namespace zimage {

struct ParallelConfig {
  int num_gpus = 1, ulysses_degree = 1;
  bool cfg_parallel = false;

  int cfg_groups() const { return cfg_parallel ? 2 : 1; }
  // GPU g is rank ulysses_rank(g) of the sequence-parallel group of CFG branch cfg_rank(g).
  int cfg_rank(int gpu) const { return gpu / ulysses_degree; }
  int ulysses_rank(int gpu) const { return gpu % ulysses_degree; }
};

// ulysses_degree 0: N / (2 with --cfg-parallel, else 1). `heads`: the DiT's attention heads;
// `gpus_found`: the GPUs this build and machine can use (checked when N > 1: one device may be the
// CPU). Throws InvalidArgument saying what is wrong.
ParallelConfig parallel_config(int num_gpus, int ulysses_degree, bool cfg_parallel, int64_t heads, int gpus_found);

}  // namespace zimage
