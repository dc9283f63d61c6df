#include "pipeline/denoise.h"

#include <algorithm>

#include "core/error.h"

namespace zimage {

namespace {

// [B, ...] -> [2B, ...]: the same latents for the positive and the negative branch.
Tensor repeat_twice(Backend& be, const Tensor& x) {
  Shape s = x.shape();
  Tensor rows = x.reshape({s[0] * s[1] * s[2], s[3]});
  s[0] *= 2;
  return be.concat_rows(rows, rows).reshape(s);
}

}  // namespace

int strength_begin_index(int steps, double strength) {
  const double init_timestep = std::min(double(steps) * strength, double(steps));
  return int(std::max(double(steps) - init_timestep, 0.0));
}

DenoiseMarks denoise(Backend& be, const DitCall& dit, const DenoiseSpec& spec, Tensor& latents, Tensor& non_finite,
                     int64_t first_slot, const std::function<void(int, int)>& progress) {
  const FlowMatchSchedule& sched = *spec.schedule;
  const int n = int(sched.timesteps.size());
  ZI_ASSERT(spec.begin >= 0 && spec.begin < n);
  const bool cfg = spec.guidance > 0;
  const size_t b = spec.caps.size();
  ZI_ASSERT(int64_t(b) == latents.dim(0) && (!cfg || spec.neg_caps.size() == b));
  std::vector<Tensor> all_caps = spec.caps;
  all_caps.insert(all_caps.end(), spec.neg_caps.begin(), spec.neg_caps.end());

  DenoiseMarks marks;
  marks.begin = be.mark();
  const int run = n - spec.begin;
  for (int i = spec.begin; i < n; ++i) {
    const float t = sched.dit_time(size_t(i));
    float g = spec.guidance;
    if (cfg && spec.cfg_truncation <= 1.0f && t > spec.cfg_truncation) g = 0.0f;  // truncated: positive branch only
    const bool apply_cfg = cfg && g > 0;
    Tensor out = apply_cfg ? dit(repeat_twice(be, latents), std::vector<float>(2 * b, t), all_caps, true)
                           : dit(latents, std::vector<float>(b, t), spec.caps, false);
    marks.dit.push_back(be.mark());
    be.cfg_euler_step_(latents, out, apply_cfg ? g : 0.0f, spec.cfg_normalization, sched.dt(size_t(i)));
    // Inpainting: the known region goes back to the init latents noised to the next sigma (0 after the
    // last step: the clean init latents).
    if (spec.blend)
      be.flow_match_blend_(latents, spec.blend->init, spec.blend->noise, &spec.blend->mask,
                           sched.sigmas[size_t(i) + 1]);
    const int k = i - spec.begin;
    be.count_non_finite(latents, non_finite, first_slot + k);
    marks.step.push_back(be.mark());
    if (progress) {  // reports steps done, not steps queued: only then does the loop wait for the device
      be.wait(marks.step.back());
      progress(k + 1, run);
    }
  }
  return marks;
}

}  // namespace zimage
