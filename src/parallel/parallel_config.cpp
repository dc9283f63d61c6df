#include "parallel/parallel_config.h"

#include <string>

#include "core/error.h"
#include "parallel/sequence_parallel_plan.h"

namespace zimage {

ParallelConfig parallel_config(int num_gpus, int ulysses_degree, bool cfg_parallel, int64_t heads, int gpus_found) {
  using std::to_string;
  ZI_CHECK(num_gpus >= 1, ErrorKind::InvalidArgument, "--num-gpus must be at least 1, got " + to_string(num_gpus));
  ZI_CHECK(ulysses_degree >= 0, ErrorKind::InvalidArgument,
           "--ulysses-degree must be at least 1, got " + to_string(ulysses_degree));
  ParallelConfig c;
  c.num_gpus = num_gpus;
  c.cfg_parallel = cfg_parallel;
  ZI_CHECK(
      !cfg_parallel || num_gpus % 2 == 0, ErrorKind::InvalidArgument,
      "--cfg-parallel runs the positive and negative branches on two groups of GPUs: --num-gpus must be even, got " +
          to_string(num_gpus));
  c.ulysses_degree = ulysses_degree ? ulysses_degree : num_gpus / c.cfg_groups();
  ZI_CHECK(num_gpus == c.ulysses_degree * c.cfg_groups(), ErrorKind::InvalidArgument,
           "--num-gpus " + to_string(num_gpus) + " must equal --ulysses-degree " + to_string(c.ulysses_degree) +
               (cfg_parallel ? " x 2 (--cfg-parallel) = " + to_string(c.ulysses_degree * 2) : std::string()));
  ZI_CHECK(heads % c.ulysses_degree == 0, ErrorKind::InvalidArgument,
           "--ulysses-degree " + to_string(c.ulysses_degree) + " does not divide the model's " + to_string(heads) +
               " attention heads (" + valid_ulysses_degrees(heads) + ")");
  ZI_CHECK(
      num_gpus == 1 || gpus_found >= num_gpus, ErrorKind::InvalidArgument,
      "--num-gpus " + to_string(num_gpus) + " needs " + to_string(num_gpus) + " GPUs, found " + to_string(gpus_found));
  return c;
}

}  // namespace zimage
