// A model assembled from component files, as ComfyUI users have them: a diffusion model file
// (diffusers, ComfyUI, FP8 or GGUF), a text encoder file or folder, a VAE file or folder. Each one
// replaces that part of a model folder; with all three no folder is needed (the tokenizer and the
// scheduler are built in). Each file's layout is detected from its keys (model/weights/checkpoint_layout.h)
// and, for a single file, its config from its tensors' shapes.
#pragma once

#include <string>

#include "model/model_source.h"

namespace zimage {

struct ComponentFiles {
  std::string diffusion_model, text_encoder, vae;
  std::string recipe;  // "turbo", "base" or "" (from the diffusion model's file name, else the model's)
  bool any() const { return !diffusion_model.empty() || !text_encoder.empty() || !vae.empty(); }
};

// `spec` as open_model, with the parts of `files` replaced; `spec` may be empty when all three files
// are given. InvalidArgument when a part is missing or a file holds another part (a VAE given as the
// diffusion model); Format errors from the layouts name the file and the tensor.
ModelSource open_model(const std::string& spec, const ComponentFiles& files);

}  // namespace zimage
