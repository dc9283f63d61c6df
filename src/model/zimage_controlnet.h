// alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (diffusers' ZImageControlNetModel): control blocks
// that are DiT blocks (model/zimage_dit.h's DitBlock) with a before_proj (the first) and an after_proj,
// run over [control tokens + caption] with the main model's time embedding, RoPE and refined caption;
// block k's after_proj output, times the conditioning scale, is added to the hidden state after main
// layer layer_places[k]. The DiT runs them (ZImageDit::set_control); this file holds their layout and
// weights.
//   v1:   6 blocks at layers 0, 5, ..., 25; 16 input channels (the control image's latents).
//   v2.0: 15 blocks at 0, 2, ..., 28; 33 input channels (control latents, mask, masked-image latents);
//         the control blocks first run over the image tokens and their first two hints go into noise
//         refiner layers 0 and 1 ("control_layers").
//   v2.1: as v2.0, with two control blocks of its own for that pass ("control_noise_refiner").
//   lite: 3 blocks at 0, 10, 20 (assumed: no config of it was at hand), as v2.x otherwise.
// A released file is recognised from its tensors; anything else needs its diffusers config json.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/linear.h"
#include "model/model_source.h"
#include "model/weight_spec.h"
#include "model/weights.h"
#include "model/zimage_dit.h"

namespace zimage {

// How the control tokens are refined before the control blocks (diffusers' add_control_noise_refiner).
enum class ControlRefiner {
  Plain,          // null: control_noise_refiner.N are plain DiT blocks over the control tokens (none in v1)
  ControlLayers,  // "control_layers": the control blocks run over the image tokens first (v2.0)
  ControlBlocks,  // "control_noise_refiner": control_noise_refiner.N are control blocks for that pass (v2.1)
};

struct ControlNetConfig {
  std::vector<int64_t> layer_places;    // main layer after which control block k's output is added
  std::vector<int64_t> refiner_places;  // noise-refiner layer after which refiner hint k is added
  int64_t in_channels = 16;             // the DiT's latent channels (v1) or 2 * channels + 1 (v2)
  ControlRefiner refiner = ControlRefiner::Plain;
  int64_t refiner_layers = 0;           // control_noise_refiner blocks (Plain, ControlBlocks)
  std::string variant;                  // "v1", "v2.0", "v2.1", "lite", or "config"

  // A diffusers config json (ZImageControlNetModel), checked against the DiT it controls.
  static ControlNetConfig from(const Config& c, const DitConfig& dit);
  // A released file's layout from its tensors; InvalidArgument naming what was found when it is none.
  static ControlNetConfig detect(const Checkpoint& ckpt, const DitConfig& dit);
  // A released layout by name ("v1", "v2.0", "v2.1", "lite"), for synthetic weights.
  static ControlNetConfig released(const std::string& variant, const DitConfig& dit);
  // True for the inpainting-capable layout: control latents, mask and masked-image latents.
  bool takes_mask(int64_t latent_channels) const { return in_channels == 2 * latent_channels + 1; }
};

// Where a ControlNet comes from: a safetensors file (and optionally its config json), or
// "synthetic:<variant>" (random weights of a released layout, for benchmarks).
struct ControlNetSource {
  std::string name;
  std::optional<Config> config;        // --controlnet-config
  std::optional<Checkpoint> checkpoint;  // null for synthetic
  std::string synthetic_variant;
  std::shared_ptr<WeightSource> weights;

  static ControlNetSource open(const std::string& spec, const std::string& config_path);
  // The layout for this DiT: the config json, else the released layout the tensors show.
  ControlNetConfig config_for(const DitConfig& dit) const;
};

// Sets model.controlnet from a file (with an optional config json) or "synthetic:<variant>", checked
// against the model's DiT now, before any weight is loaded.
void attach_controlnet(ModelSource& model, const std::string& spec, const std::string& config_path);

class ZImageControlNet {
 public:
  ZImageControlNet(Backend& be, const DitConfig& dit, ControlNetConfig cfg, const WeightSource& ws);
  static std::vector<WeightSpec> weight_specs(const DitConfig& dit, const ControlNetConfig& cfg);
  const ControlNetConfig& config() const { return cfg_; }

 private:
  friend class ZImageDit;  // runs the blocks on its own block code and token layout
  ControlNetConfig cfg_;
  Linear embed_;                                 // control_all_x_embedder: patch values -> dim
  std::vector<DitBlock> layers_, refiner_;       // control_layers, control_noise_refiner
  Linear mod_;                                   // every modulated block's adaLN, stacked
};

}  // namespace zimage
