// The one denoising loop of every pipeline (text to image, image to image, inpainting): flow-match
// Euler steps with classifier-free guidance over the schedule's steps [begin, N), as diffusers'
// ZImagePipeline / ZImageImg2ImgPipeline / ZImageInpaintPipeline loops run them. What differs between
// the pipelines is the spec: where the schedule starts (img2img's strength cut), the start latents
// (start_latents.h) and, for inpainting, the blend of the known region after each step.
#pragma once

#include <functional>
#include <vector>

#include "backend/backend.h"
#include "pipeline/flow_match_scheduler.h"
#include "pipeline/start_latents.h"

namespace zimage {

// One DiT forward of the loop: latents [B, C, h, w] (or [2B, ...] with cfg_batch: positives, then
// negatives), the DiT's time input per item, one caption per item -> the raw model output, same shape.
using DitCall = std::function<Tensor(const Tensor& latents, const std::vector<float>& t,
                                     const std::vector<Tensor>& caps, bool cfg_batch)>;

// diffusers' strength cut: begin = int(max(N - min(N * strength, N), 0)), in double as Python computes it.
// Steps [begin, N) run; strength 1 runs them all.
int strength_begin_index(int steps, double strength);

struct DenoiseSpec {
  const FlowMatchSchedule* schedule = nullptr;
  int begin = 0;                        // first step that runs (scheduler.set_begin_index)
  std::vector<Tensor> caps;             // positive caption embeddings, one per image
  std::vector<Tensor> neg_caps;         // negative ones with CFG (guidance > 0), else empty
  float guidance = 0.0f;                // CFG runs when > 0
  float cfg_normalization = 0.0f;       // > 0: cap ‖pred‖ at this multiple of ‖pos‖
  float cfg_truncation = 1.0f;          // steps whose DiT time (1000 - t)/1000 exceeds it run without CFG
  const InpaintBlend* blend = nullptr;  // inpainting: blend the known region back after each step
};

// Marks in the backend's queue: before the loop, after each step's DiT forward, after each step.
struct DenoiseMarks {
  Backend::Mark begin;
  std::vector<Backend::Mark> dit, step;
};

// Runs the spec's steps in place on latents [B, C, h, w] float32. After the k-th step run,
// non_finite[first_slot + k] counts its NaN/Inf latents (numerical guard, read by the caller once).
// progress(k + 1, steps run) after each step has finished on the device (none: the host never waits).
DenoiseMarks denoise(Backend& be, const DitCall& dit, const DenoiseSpec& spec, Tensor& latents, Tensor& non_finite,
                     int64_t first_slot, const std::function<void(int, int)>& progress = nullptr);

}  // namespace zimage
