#include "model/component_files.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "model/weights/checkpoint_layout.h"

namespace zimage {

namespace fs = std::filesystem;

namespace {

struct Part {
  Config config;
  std::shared_ptr<WeightSource> weights;
};

// One component from a file or a folder: its layout from the keys; its config from the folder's
// config.json when there is one, else from the shapes.
Part open_part(const std::string& path, ModelPart want) {
  auto stored = open_stored_tensors(path);
  DetectedLayout layout = detect_layout(*stored);
  if (layout.part != want)
    throw Error(ErrorKind::InvalidArgument, path + " holds a " + model_part_name(layout.part) + " (" + layout.name +
                                                " layout), not a " + model_part_name(want));
  auto w = std::make_shared<LayoutWeights>(stored, layout);
  const fs::path config = fs::path(path) / "config.json";
  Config c = fs::is_directory(path) && fs::exists(config) ? Config::load(config.string())
                                                          : infer_component_config(*w, path + " (config from shapes)");
  return {std::move(c), std::move(w)};
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

}  // namespace

ModelSource open_model(const std::string& spec, const ComponentFiles& files) {
  if (spec.empty() && !files.any())
    throw Error(ErrorKind::InvalidArgument,
                "give --model (a folder or synthetic:tiny|turbo), or --diffusion-model, "
                "--text-encoder and --vae");
  if (!files.any() && files.recipe.empty()) return open_model(spec);
  ModelSource m;
  if (!spec.empty()) {
    m = open_model(spec);
  } else {
    if (files.diffusion_model.empty() || files.text_encoder.empty() || files.vae.empty())
      throw Error(ErrorKind::InvalidArgument,
                  "without --model, give all three of --diffusion-model, --text-encoder and --vae");
    m.name = files.diffusion_model;
    m.model_index = builtin_model_index("built-in model_index.json");
    m.scheduler = builtin_scheduler_config("built-in scheduler_config.json");
    m.tokenizer_dir = assets_dir();
  }
  if (!files.diffusion_model.empty()) {
    Part p = open_part(files.diffusion_model, ModelPart::DiT);
    m.transformer = std::move(p.config);
    m.transformer_weights = std::move(p.weights);
    m.synthetic = false;
  }
  if (!files.text_encoder.empty()) {
    Part p = open_part(files.text_encoder, ModelPart::TextEncoder);
    m.text_encoder = std::move(p.config);
    m.text_encoder_weights = std::move(p.weights);
  }
  if (!files.vae.empty()) {
    Part p = open_part(files.vae, ModelPart::Vae);
    m.vae = std::move(p.config);
    m.vae_weights = std::move(p.weights);
  }
  std::string recipe = files.recipe;
  if (recipe.empty() && !files.diffusion_model.empty() &&
      lower(fs::path(files.diffusion_model).filename().string()).find("turbo") != std::string::npos)
    recipe = "turbo";
  if (recipe == "turbo") {
    m.default_steps = kTurboSteps;
    m.default_guidance = 0.0f;
  } else if (recipe == "base") {
    m.default_steps = 50;
    m.default_guidance = 5.0f;
  } else if (!recipe.empty()) {
    throw Error(ErrorKind::InvalidArgument, "--recipe must be turbo or base, not '" + recipe + "'");
  }
  return m;
}

}  // namespace zimage
