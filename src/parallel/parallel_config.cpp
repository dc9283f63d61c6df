#include "parallel/parallel_config.h"

#include <string>

#include "core/error.h"
#include "parallel/sequence_parallel_plan.h"

namespace zimage {

ParallelConfig parallel_config(int num_gpus, int ulysses_degree, int ring_degree, bool cfg_parallel, int64_t heads,
                               int gpus_found) {
  using std::to_string;
  ZI_CHECK(num_gpus >= 1, ErrorKind::InvalidArgument, "--num-gpus must be at least 1, got " + to_string(num_gpus));
  ZI_CHECK(ulysses_degree >= 0, ErrorKind::InvalidArgument,
           "--ulysses-degree must be at least 1, got " + to_string(ulysses_degree));
  ZI_CHECK(ring_degree >= 0, ErrorKind::InvalidArgument, "--ring-degree must be at least 1, got " + to_string(ring_degree));
  ParallelConfig c;
  c.num_gpus = num_gpus;
  c.cfg_parallel = cfg_parallel;
  ZI_CHECK(
      !cfg_parallel || num_gpus % 2 == 0, ErrorKind::InvalidArgument,
      "--cfg-parallel runs the positive and negative branches on two groups of GPUs: --num-gpus must be even, got " +
          to_string(num_gpus));
  const int seq = num_gpus / c.cfg_groups();
  const std::string cfg_factor = cfg_parallel ? " x 2 (--cfg-parallel)" : "";
  auto multiple_of = [&](const char* flag, int v) {
    ZI_CHECK(seq % v == 0, ErrorKind::InvalidArgument,
             "--num-gpus " + to_string(num_gpus) + " must be a multiple of " + flag + " " + to_string(v) + cfg_factor +
                 (cfg_parallel ? " = " + to_string(2 * v) : std::string()));
    return seq / v;
  };
  if (ulysses_degree == 0 && ring_degree == 0) {
    c.ulysses_degree = 1;
    for (int u = 1; u <= seq; ++u)
      if (seq % u == 0 && heads % u == 0) c.ulysses_degree = u;
    c.ring_degree = seq / c.ulysses_degree;
  } else if (ring_degree == 0) {
    c.ulysses_degree = ulysses_degree;
    c.ring_degree = multiple_of("--ulysses-degree", ulysses_degree);
  } else if (ulysses_degree == 0) {
    c.ring_degree = ring_degree;
    c.ulysses_degree = multiple_of("--ring-degree", ring_degree);
  } else {
    c.ulysses_degree = ulysses_degree;
    c.ring_degree = ring_degree;
    ZI_CHECK(num_gpus == c.sequence_degree() * c.cfg_groups(), ErrorKind::InvalidArgument,
             "--num-gpus " + to_string(num_gpus) + " must equal --ulysses-degree " + to_string(ulysses_degree) +
                 " x --ring-degree " + to_string(ring_degree) + cfg_factor + " = " +
                 to_string(c.sequence_degree() * c.cfg_groups()));
  }
  ZI_CHECK(heads % c.ulysses_degree == 0, ErrorKind::InvalidArgument,
           "--ulysses-degree " + to_string(c.ulysses_degree) + " does not divide the model's " + to_string(heads) +
               " attention heads (" + valid_ulysses_degrees(heads) + "; --ring-degree splits the rest)");
  ZI_CHECK(
      num_gpus == 1 || gpus_found >= num_gpus, ErrorKind::InvalidArgument,
      "--num-gpus " + to_string(num_gpus) + " needs " + to_string(num_gpus) + " GPUs, found " + to_string(gpus_found));
  return c;
}

}  // namespace zimage
