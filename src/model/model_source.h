// A Z-Image model: the diffusers folder layout (model_index.json; transformer/, text_encoder/, vae/,
// scheduler/, tokenizer/ each with a config), or a built-in synthetic model ("synthetic:tiny",
// "synthetic:turbo") whose configs are compiled in and whose weights are generated in memory.
#pragma once

#include <memory>
#include <string>

#include "io/config.h"
#include "model/weights.h"

namespace zimage {

// model_index.json key with the recipe a folder written by `zimage save-model` was made for:
// {"num_inference_steps": 8, "guidance_scale": 0.0}. diffusers ignores keys that start with '_'.
inline constexpr char kRecipeKey[] = "_zimage_recipe";

// Turbo's recipe: 8 steps without CFG. Z-Image-Turbo is distilled for 8 function evaluations; diffusers
// used 9 steps while its schedule ended with a redundant sigma-0 step (9 steps = 8 DiT forwards that
// mattered), and moved its default and docs to 8 when it fixed the schedule to linspace(1, 1/N, N)
// (diffusers PR #13730, May 2026), which is the schedule this engine computes.
inline constexpr int kTurboSteps = 8;

struct ControlNetSource;  // model/zimage_controlnet.h

struct ModelSource {
  std::string name;  // the folder path or "synthetic:<kind>"
  Config model_index, transformer, text_encoder, vae, scheduler;
  std::shared_ptr<WeightSource> transformer_weights, text_encoder_weights, vae_weights;
  std::string tokenizer_dir;  // folder holding tokenizer.json (+ tokenizer_config.json)
  // The recipe the model was made for: Turbo kTurboSteps without CFG; the base model runs 50 steps
  // with guidance 5.
  int default_steps = 50;
  float default_guidance = 5.0f;
  bool synthetic = false;
  // An optional ControlNet (--controlnet) that requests with a control image use.
  std::shared_ptr<const ControlNetSource> controlnet;

  // Starts reading all three checkpoints into memory in the background (WeightSource::prefetch): call
  // it before the slow setup that precedes a load (device initialization), so the two overlap.
  void prefetch_weights() const;
};

// `spec` is a folder or "synthetic:tiny" / "synthetic:turbo". Missing folders, files or config keys
// raise NotFound naming what is missing. A folder's recipe is model_index.json's kRecipeKey if present,
// else Turbo's when the folder's name contains "turbo", else the base model's.
ModelSource open_model(const std::string& spec);

// The scheduler config and model_index.json every Z-Image model shares (for models assembled from
// component files, see component_files.h).
Config builtin_scheduler_config(const std::string& where);
Config builtin_model_index(const std::string& where);

// The folder holding the shipped tokenizer and other data files: $ZIMAGE_ASSETS when set; else
// <folder of the running executable>/../share/zimage when it holds tokenizer.json (what
// `cmake --install` lays out); else the source tree's assets/ (a binary run from its build tree).
std::string assets_dir();

}  // namespace zimage
