// How one generate request is spread over GPUs: `--num-gpus N`, `--ulysses-degree U`, `--ring-degree R`,
// `--cfg-parallel`. N = U * R without CFG parallelism and N = 2 U R with it: GPUs [0, U R) run the
// positive branch of a CFG request (and the whole batch of a request without CFG), GPUs [U R, 2 U R) the
// negative branch. Within a branch, each image's tokens are split into U R shards
// (sequence_parallel_plan.h): GPU s holds shard s; the U consecutive GPUs of a Ulysses group exchange
// heads (all-to-all), and the R GPUs with the same place in their Ulysses groups form a ring that passes
// K/V blocks (parallel/usp_attention.h). Validated at the CLI edge, before anything is loaded.
#pragma once

#include <cstdint>

namespace zimage {

struct ParallelConfig {
  int num_gpus = 1, ulysses_degree = 1, ring_degree = 1;
  bool cfg_parallel = false;

  int cfg_groups() const { return cfg_parallel ? 2 : 1; }
  int sequence_degree() const { return ulysses_degree * ring_degree; }  // GPUs per CFG branch
  // GPU g holds shard sequence_rank(g) of CFG branch cfg_rank(g): member ulysses_rank(g) of its Ulysses
  // group and member ring_rank(g) of its ring.
  int cfg_rank(int gpu) const { return gpu / sequence_degree(); }
  int sequence_rank(int gpu) const { return gpu % sequence_degree(); }
  int ulysses_rank(int gpu) const { return sequence_rank(gpu) % ulysses_degree; }
  int ring_rank(int gpu) const { return sequence_rank(gpu) / ulysses_degree; }
};

// ulysses_degree and ring_degree 0: derived. With neither given, U is the largest divisor of `heads` that
// divides N / (2 with --cfg-parallel, else 1) and R the rest (30 heads on 4 GPUs: U 2, R 2; on 8: U 2,
// R 4); with one given, the other is what N leaves. `heads`: the DiT's attention heads (U must divide
// them); `gpus_found`: the GPUs this build and machine can use (checked when N > 1: one device may be the
// CPU). Throws InvalidArgument saying what is wrong.
ParallelConfig parallel_config(int num_gpus, int ulysses_degree, int ring_degree, bool cfg_parallel, int64_t heads,
                               int gpus_found);

}  // namespace zimage
