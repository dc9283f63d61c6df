#include "pipeline/flow_match_scheduler.h"

#include <cmath>

#include "core/error.h"

namespace zimage {

float FlowMatchSchedule::dit_time(size_t i) const { return (1000.0f - timesteps[i]) / 1000.0f; }

// torch.linspace(start, end, steps) for float32 on the CPU: the first half counts up from start, the
// second half down from end, with a float32 step.
static std::vector<float> torch_linspace(float start, float end, int steps) {
  std::vector<float> v(static_cast<size_t>(steps));
  if (steps == 1) {
    v[0] = start;
    return v;
  }
  float step = (end - start) / float(steps - 1);
  int halfway = steps / 2;
  for (int i = 0; i < steps; ++i)
    v[size_t(i)] = i < halfway ? start + step * float(i) : end - step * float(steps - i - 1);
  return v;
}

FlowMatchSchedule flow_match_schedule(const Config& cfg, int steps, int64_t image_seq_len) {
  ZI_CHECK(steps >= 1, ErrorKind::InvalidArgument,
           "num_inference_steps must be at least 1 (got " + std::to_string(steps) + ")");
  const float train_steps = float(cfg.integer_in_or("num_train_timesteps", 1000, 1, 1000000));
  std::vector<float> s = torch_linspace(1.0f, 1.0f / float(steps), steps);  // Z-Image's default sigmas
  FlowMatchSchedule out;
  if (cfg.boolean_or("use_dynamic_shifting", false)) {
    // diffusers' calculate_shift: mu linear in the image sequence length; exponential time shift.
    double base_len = double(cfg.integer_or("base_image_seq_len", 256)), max_len = double(cfg.integer_or("max_image_seq_len", 4096));
    double base_shift = cfg.number_or("base_shift", 0.5), max_shift = cfg.number_or("max_shift", 1.15);
    double m = (max_shift - base_shift) / (max_len - base_len);
    double mu = double(image_seq_len) * m + (base_shift - m * base_len);
    ZI_CHECK(cfg.has("time_shift_type") ? cfg.string("time_shift_type") == "exponential" : true, ErrorKind::Format,
             cfg.where() + ": only the exponential time_shift_type is supported");
    for (float& x : s) x = float(std::exp(mu) / (std::exp(mu) + (1.0 / double(x) - 1.0)));
  } else {
    const float shift = float(cfg.number_or("shift", 1.0));
    for (float& x : s) x = shift * x / (1.0f + (shift - 1.0f) * x);
  }
  // A stranger's scheduler_config.json (a shift of 0 or -1, base_image_seq_len == max_image_seq_len)
  // can make sigmas that are not numbers, or outside (0, 1]: the image would come out black or noise.
  // (Rounding may put a valid first sigma an ulp above 1.)
  for (float x : s)
    ZI_CHECK(std::isfinite(x) && x > 0.0f && x <= 1.0f + 1e-5f, ErrorKind::Format,
             cfg.where() + ": the shift settings give a sigma of " + std::to_string(x) +
                 ", outside (0, 1]; check shift, base_shift, max_shift and the image_seq_len keys");
  for (float x : s) {
    out.sigmas.push_back(x);
    out.timesteps.push_back(x * train_steps);
  }
  out.sigmas.push_back(0.0f);
  return out;
}

}  // namespace zimage
