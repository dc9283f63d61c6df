// A Z-Image model: the diffusers folder layout (model_index.json; transformer/, text_encoder/, vae/,
// scheduler/, tokenizer/ each with a config), or a built-in synthetic model ("synthetic:tiny",
// "synthetic:turbo") whose configs are compiled in and whose weights are generated in memory.
#pragma once

#include <memory>
#include <string>

#include "io/config.h"
#include "model/weights.h"

namespace zimage {

struct ModelSource {
  std::string name;  // the folder path or "synthetic:<kind>"
  Config model_index, transformer, text_encoder, vae, scheduler;
  std::shared_ptr<WeightSource> transformer_weights, text_encoder_weights, vae_weights;
  std::string tokenizer_dir;  // folder holding tokenizer.json (+ tokenizer_config.json)
  // The recipe the model was made for: Turbo is distilled to 9 steps without CFG; the base model
  // runs 50 steps with guidance 5.
  int default_steps = 50;
  float default_guidance = 5.0f;
  bool synthetic = false;
};

// `spec` is a folder or "synthetic:tiny" / "synthetic:turbo". Missing folders, files or config keys
// raise NotFound naming what is missing.
ModelSource open_model(const std::string& spec);

// The folder holding the shipped tokenizer and other data files: $ZIMAGE_ASSETS, else the source tree's assets/.
std::string assets_dir();

}  // namespace zimage
