#include "model/zimage_controlnet.h"

#include <algorithm>

#include "core/error.h"
#include "model/weight_loading.h"

namespace zimage {

namespace {

constexpr char kSyntheticPrefix[] = "synthetic:";
constexpr uint64_t kSyntheticSeed = 0x5eedc0de;

Error bad(const std::string& message) { return Error(ErrorKind::InvalidArgument, message); }

std::string embedder_prefix(const DitConfig& dit) { return "control_all_x_embedder." + std::to_string(dit.patch) + "-1."; }
std::string layer_prefix(size_t k) { return "control_layers." + std::to_string(k) + "."; }
std::string refiner_prefix(size_t k) { return "control_noise_refiner." + std::to_string(k) + "."; }

std::vector<int64_t> every(int64_t step, int64_t count) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < count; ++i) v.push_back(i * step);
  return v;
}

std::string list(const std::vector<int64_t>& v) {
  std::string s;
  for (int64_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return "[" + s + "]";
}

// Places strictly increasing in [0, limit); `first_zero`: the first is 0 (the block with before_proj).
void check_places(const std::vector<int64_t>& places, int64_t limit, bool first_zero, const std::string& what) {
  bool ok = !places.empty() && (!first_zero || places[0] == 0);
  for (size_t i = 0; ok && i < places.size(); ++i)
    ok = places[i] >= 0 && places[i] < limit && (i == 0 || places[i] > places[i - 1]);
  if (!ok)
    throw bad(what + " " + list(places) + " must be increasing layer indices below " + std::to_string(limit) +
              (first_zero ? ", starting at 0" : ""));
}

void check(ControlNetConfig& cc, const DitConfig& dit, const std::string& where) {
  check_places(cc.layer_places, dit.layers, true, where + ": control_layers_places");
  if (cc.in_channels != dit.in_channels && cc.in_channels != 2 * dit.in_channels + 1)
    throw bad(where + ": control_in_dim " + std::to_string(cc.in_channels) + " is neither the DiT's " +
              std::to_string(dit.in_channels) + " latent channels nor " + std::to_string(2 * dit.in_channels + 1) +
              " (control latents, mask, masked-image latents)");
  if (cc.refiner == ControlRefiner::Plain) return;
  check_places(cc.refiner_places, dit.refiner_layers, false, where + ": control_refiner_layers_places");
  const size_t hints =
      cc.refiner == ControlRefiner::ControlLayers ? cc.layer_places.size() : size_t(cc.refiner_layers);
  if (cc.refiner_places.size() > hints)
    throw bad(where + ": " + std::to_string(cc.refiner_places.size()) + " control_refiner_layers_places for " +
              std::to_string(hints) + " refiner blocks");
}

// The control latents of the released v2 layouts: whether the checkpoint's own refiner blocks are in use
// (v2.1) or not (v2.0, whose file has none or all-zero ones), as diffusers tells them apart.
ControlRefiner v2_refiner(const Checkpoint& ckpt) {
  const std::string name = refiner_prefix(0) + "before_proj.weight";
  if (!ckpt.has(name)) return ControlRefiner::ControlLayers;
  const Tensor w = ckpt.get(name).to_f32();
  const float* p = w.f32();
  return std::all_of(p, p + w.numel(), [](float v) { return v == 0.0f; }) ? ControlRefiner::ControlLayers
                                                                          : ControlRefiner::ControlBlocks;
}

}  // namespace

ControlNetConfig ControlNetConfig::from(const Config& c, const DitConfig& dit) {
  const std::string where = c.where();
  ControlNetConfig cc;
  cc.variant = "config";
  cc.layer_places = c.integers("control_layers_places");
  cc.in_channels = c.integer_in("control_in_dim", 1, 1 << 20);
  if (c.has("add_control_noise_refiner")) {
    const std::string mode = c.string("add_control_noise_refiner");
    if (mode == "control_layers")
      cc.refiner = ControlRefiner::ControlLayers;
    else if (mode == "control_noise_refiner")
      cc.refiner = ControlRefiner::ControlBlocks;
    else
      throw bad(where + ": add_control_noise_refiner '" + mode +
                "' is none of null, \"control_layers\", \"control_noise_refiner\"");
    cc.refiner_places = c.has("control_refiner_layers_places") ? c.integers("control_refiner_layers_places")
                                                               : std::vector<int64_t>{};
  }
  cc.refiner_layers = c.integer_in_or("n_refiner_layers", 2, 0, 1024);
  if (cc.refiner == ControlRefiner::ControlLayers) cc.refiner_layers = 0;
  // The blocks run on the DiT's own code and layout: every shape parameter must be the DiT's.
  const auto patches = c.integers("all_patch_size");
  const bool same = c.integer("dim") == dit.dim && c.integer("n_heads") == dit.heads &&
                    c.integer_or("n_kv_heads", dit.heads) == dit.heads && patches.size() == 1 &&
                    patches[0] == dit.patch && c.number_or("norm_eps", dit.norm_eps) == dit.norm_eps &&
                    c.boolean_or("qk_norm", true);
  if (!same)
    throw bad(where + ": this ControlNet's dim, heads, patch size or norm_eps differ from the DiT's (dim " +
              std::to_string(dit.dim) + ", " + std::to_string(dit.heads) + " heads, patch " +
              std::to_string(dit.patch) + "): it was made for another model");
  check(cc, dit, where);
  return cc;
}

ControlNetConfig ControlNetConfig::released(const std::string& variant, const DitConfig& dit) {
  ControlNetConfig cc;
  cc.variant = variant;
  const int64_t v2_in = 2 * dit.in_channels + 1;
  if (variant == "v1") {
    cc.layer_places = every(5, 6);
    cc.in_channels = dit.in_channels;
  } else if (variant == "v2.0" || variant == "v2.1" || variant == "lite") {
    cc.layer_places = variant == "lite" ? every(10, 3) : every(2, 15);
    cc.in_channels = v2_in;
    cc.refiner_places = {0, 1};
    cc.refiner = variant == "v2.0" ? ControlRefiner::ControlLayers : ControlRefiner::ControlBlocks;
    cc.refiner_layers = variant == "v2.0" ? 0 : 2;
  } else {
    throw bad("unknown ControlNet variant '" + variant + "' (v1, v2.0, v2.1, lite)");
  }
  check(cc, dit, "the released " + variant + " ControlNet layout (made for Z-Image's 30-layer DiT)");
  return cc;
}

ControlNetConfig ControlNetConfig::detect(const Checkpoint& ckpt, const DitConfig& dit) {
  const std::string emb = embedder_prefix(dit) + "weight";
  if (!ckpt.has(emb))
    throw bad(ckpt.description() + " is not a Z-Image ControlNet: it has no " + emb);
  const Tensor e = ckpt.get(emb);
  const int64_t patch_values = dit.patch * dit.patch;
  if (e.ndim() != 2 || e.dim(1) % patch_values)
    throw bad(ckpt.description() + ": " + emb + " is not a [dim, patch^2 * channels] matrix");
  const int64_t in = e.dim(1) / patch_values;
  size_t blocks = 0, refiners = 0;
  while (ckpt.has(layer_prefix(blocks) + "adaLN_modulation.0.weight")) ++blocks;
  while (ckpt.has(refiner_prefix(refiners) + "adaLN_modulation.0.weight")) ++refiners;
  std::string variant;
  if (blocks == 6 && in == dit.in_channels) variant = "v1";
  if (blocks == 15 && in == 2 * dit.in_channels + 1) variant = "v2";
  if (blocks == 3 && in == 2 * dit.in_channels + 1) variant = "lite";
  if (variant.empty())
    throw bad(ckpt.description() + " holds " + std::to_string(blocks) + " control blocks over " + std::to_string(in) +
              " input channels: not a released Z-Image ControlNet layout (v1: 6 blocks over " +
              std::to_string(dit.in_channels) + ", v2.x: 15 over " + std::to_string(2 * dit.in_channels + 1) +
              ", lite: 3); give its diffusers config with --controlnet-config");
  if (variant == "v2") variant = v2_refiner(ckpt) == ControlRefiner::ControlLayers ? "v2.0" : "v2.1";
  ControlNetConfig cc = released(variant, dit);
  if (variant == "v1") cc.refiner_layers = int64_t(refiners);  // plain refiner blocks, if a file has any
  if (variant == "lite") {  // which refiner, as v2.x tells it
    cc.refiner = v2_refiner(ckpt);
    cc.refiner_layers = cc.refiner == ControlRefiner::ControlLayers ? 0 : int64_t(refiners);
  }
  check(cc, dit, ckpt.description());
  return cc;
}

ControlNetSource ControlNetSource::open(const std::string& spec, const std::string& config_path) {
  ControlNetSource s;
  s.name = spec;
  if (!config_path.empty()) s.config = Config::load(config_path);
  if (spec.starts_with(kSyntheticPrefix)) {
    s.synthetic_variant = spec.substr(sizeof kSyntheticPrefix - 1);
    if (s.config) throw bad("--controlnet-config does not apply to a synthetic ControlNet");
    s.weights = std::make_shared<SyntheticWeights>(kSyntheticSeed, "synthetic ControlNet " + s.synthetic_variant);
    return s;
  }
  s.checkpoint = Checkpoint::open_file(spec);
  s.weights = std::make_shared<CheckpointWeights>(*s.checkpoint);
  return s;
}

ControlNetConfig ControlNetSource::config_for(const DitConfig& dit) const {
  if (!synthetic_variant.empty()) return ControlNetConfig::released(synthetic_variant, dit);
  if (!config) return ControlNetConfig::detect(*checkpoint, dit);
  ControlNetConfig cc = ControlNetConfig::from(*config, dit);
  if (cc.refiner == ControlRefiner::Plain) {  // plain refiner blocks: those the file holds (v1's has none)
    int64_t present = 0;
    while (present < cc.refiner_layers && weights->has(refiner_prefix(size_t(present)) + "adaLN_modulation.0.weight"))
      ++present;
    cc.refiner_layers = present;
  }
  return cc;
}

void attach_controlnet(ModelSource& model, const std::string& spec, const std::string& config_path) {
  auto source = std::make_shared<ControlNetSource>(ControlNetSource::open(spec, config_path));
  source->config_for(DitConfig::from(model.transformer));  // throws on a layout this DiT cannot run
  model.controlnet = std::move(source);
}

std::vector<WeightSpec> ZImageControlNet::weight_specs(const DitConfig& dit, const ControlNetConfig& cfg) {
  const int64_t d = dit.dim;
  std::vector<WeightSpec> s = {{embedder_prefix(dit) + "weight", {d, dit.patch * dit.patch * cfg.in_channels}},
                               {embedder_prefix(dit) + "bias", {d}}};
  auto control = [&](const std::string& p, bool first) {
    add_dit_block_specs(s, dit, p, true);
    for (const char* proj : first ? std::vector<const char*>{"before_proj", "after_proj"}
                                  : std::vector<const char*>{"after_proj"}) {
      s.push_back({p + proj + ".weight", {d, d}});
      s.push_back({p + proj + ".bias", {d}});
    }
  };
  for (size_t k = 0; k < cfg.layer_places.size(); ++k) control(layer_prefix(k), k == 0);
  for (size_t k = 0; k < size_t(cfg.refiner_layers); ++k) {
    if (cfg.refiner == ControlRefiner::ControlBlocks)
      control(refiner_prefix(k), k == 0);
    else
      add_dit_block_specs(s, dit, refiner_prefix(k), true);
  }
  return s;
}

ZImageControlNet::ZImageControlNet(Backend& be, const DitConfig& dit, ControlNetConfig cfg, const WeightSource& ws)
    : cfg_(std::move(cfg)) {
  const int64_t d = dit.dim;
  embed_ = load_linear(be, ws, embedder_prefix(dit) + "weight", {d, dit.patch * dit.patch * cfg_.in_channels},
                       embedder_prefix(dit) + "bias");
  std::vector<std::pair<DitBlock*, std::string>> modulated;
  auto load = [&](const std::string& p, bool first, bool control) {
    DitBlock b = load_dit_block(be, dit, ws, p);
    if (first) b.before_proj = load_linear(be, ws, p + "before_proj.weight", {d, d}, p + "before_proj.bias");
    if (control) b.after_proj = load_linear(be, ws, p + "after_proj.weight", {d, d}, p + "after_proj.bias");
    return b;
  };
  for (size_t k = 0; k < cfg_.layer_places.size(); ++k) layers_.push_back(load(layer_prefix(k), k == 0, true));
  const bool control_refiner = cfg_.refiner == ControlRefiner::ControlBlocks;
  for (size_t k = 0; k < size_t(cfg_.refiner_layers); ++k)
    refiner_.push_back(load(refiner_prefix(k), control_refiner && k == 0, control_refiner));
  for (size_t k = 0; k < layers_.size(); ++k) modulated.emplace_back(&layers_[k], layer_prefix(k));
  for (size_t k = 0; k < refiner_.size(); ++k) modulated.emplace_back(&refiner_[k], refiner_prefix(k));
  mod_ = load_adaln_stack(be, dit, ws, modulated);
}

}  // namespace zimage
