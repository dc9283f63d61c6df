// Flow-match Euler schedule as Z-Image uses diffusers' FlowMatchEulerDiscreteScheduler:
// sigmas s_i = linspace(1, 1/N, N) in float32, shifted s' = shift*s / (1 + (shift-1)*s) (or the
// resolution-dependent exponential shift when the config asks for dynamic shifting), a terminal 0
// appended; timesteps t_i = 1000 * s'_i. The Euler step itself is the backend's cfg_euler_step_.
#pragma once

#include <vector>

#include "io/config.h"

namespace zimage {

struct FlowMatchSchedule {
  std::vector<float> sigmas;     // N + 1, ending in 0
  std::vector<float> timesteps;  // N
  // The DiT's time input at step i: (1000 - t_i) / 1000.
  float dit_time(size_t i) const;
  float dt(size_t i) const { return sigmas[i + 1] - sigmas[i]; }
};

// `image_seq_len` (latent patches of the image) only matters with use_dynamic_shifting.
FlowMatchSchedule flow_match_schedule(const Config& scheduler_config, int steps, int64_t image_seq_len);

}  // namespace zimage
