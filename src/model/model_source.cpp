#include "model/model_source.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "core/error.h"
#include "model/qwen3.h"

namespace zimage {

namespace fs = std::filesystem;

namespace {

// Configs of the built-in models. "tiny" has the shapes of the golden test model (all code paths,
// milliseconds per image); "turbo" has the shapes of Tongyi-MAI/Z-Image-Turbo (same FLOPs and memory).
struct SyntheticSpec {
  const char* kind;
  const char* transformer;
  const char* text_encoder;
  const char* vae;
};

const char* kScheduler = R"({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
  "shift": 3.0, "use_dynamic_shifting": false})";

// What diffusers writes for a ZImagePipeline (the real checkpoints' model_index.json).
const char* kModelIndex = R"({"_class_name": "ZImagePipeline",
  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "Qwen3Model"],
  "tokenizer": ["transformers", "Qwen2Tokenizer"], "transformer": ["diffusers", "ZImageTransformer2DModel"],
  "vae": ["diffusers", "AutoencoderKL"]})";

const SyntheticSpec kSynthetic[] = {
    {"tiny",
     R"({"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
        "axes_dims": [8, 12, 12], "axes_lens": [1536, 512, 512], "cap_feat_dim": 32, "dim": 64,
        "in_channels": 16, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1,
        "norm_eps": 1e-05, "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0})",
     R"({"architectures": ["Qwen3Model"], "head_dim": 16, "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "vocab_size": 151936})",
     R"({"_class_name": "AutoencoderKL", "block_out_channels": [32, 32, 64, 64], "in_channels": 3,
        "latent_channels": 16, "layers_per_block": 1, "norm_num_groups": 32, "out_channels": 3,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "mid_block_add_attention": true,
        "use_quant_conv": false, "use_post_quant_conv": false})"},
    {"turbo",
     R"({"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
        "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840,
        "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2,
        "norm_eps": 1e-05, "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0})",
     R"({"architectures": ["Qwen3Model"], "head_dim": 128, "hidden_size": 2560, "intermediate_size": 9728,
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "vocab_size": 151936})",
     R"({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "in_channels": 3,
        "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "mid_block_add_attention": true,
        "use_quant_conv": false, "use_post_quant_conv": false})"},
};

ModelSource open_synthetic(const std::string& spec, const std::string& kind) {
  for (const auto& s : kSynthetic) {
    if (kind != s.kind) continue;
    ModelSource m;
    m.name = spec;
    m.synthetic = true;
    m.model_index = Config::parse(kModelIndex, spec + "/model_index.json");
    m.transformer = Config::parse(s.transformer, spec + "/transformer/config.json");
    m.text_encoder = Config::parse(s.text_encoder, spec + "/text_encoder/config.json");
    m.vae = Config::parse(s.vae, spec + "/vae/config.json");
    m.scheduler = Config::parse(kScheduler, spec + "/scheduler/scheduler_config.json");
    m.transformer_weights = std::make_shared<SyntheticWeights>(1, spec + "/transformer");
    m.text_encoder_weights = std::make_shared<SyntheticWeights>(2, spec + "/text_encoder");
    m.vae_weights = std::make_shared<SyntheticWeights>(3, spec + "/vae");
    m.tokenizer_dir = assets_dir();
    m.default_steps = kTurboSteps;  // both built-ins follow the Turbo recipe
    m.default_guidance = 0.0f;
    return m;
  }
  throw Error(ErrorKind::InvalidArgument, "unknown synthetic model '" + spec + "' (use synthetic:tiny or synthetic:turbo)");
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

// The recipe of a folder: written down by `zimage save-model`, else guessed from the name (Z-Image-Turbo
// and Z-Image share one layout; the distilled Turbo checkpoint is known by its name).
void set_recipe(ModelSource& m, const fs::path& root) {
  if (m.model_index.has(kRecipeKey)) {
    Config r = m.model_index.child(kRecipeKey);
    m.default_steps = int(r.integer("num_inference_steps"));
    m.default_guidance = float(r.number("guidance_scale"));
    ZI_CHECK(m.default_steps >= 1 && std::isfinite(m.default_guidance) && m.default_guidance >= 0, ErrorKind::Format,
             m.model_index.where() + ": " + kRecipeKey + " needs num_inference_steps >= 1 and guidance_scale >= 0");
    return;
  }
  std::string leaf = lower(fs::weakly_canonical(root).filename().string());
  if (leaf.find("turbo") != std::string::npos) {
    m.default_steps = kTurboSteps;
    m.default_guidance = 0.0f;
  }
}

}  // namespace

Config builtin_scheduler_config(const std::string& where) { return Config::parse(kScheduler, where); }
Config builtin_model_index(const std::string& where) { return Config::parse(kModelIndex, where); }

std::string assets_dir() {
  if (const char* e = std::getenv("ZIMAGE_ASSETS"); e && *e) return e;
  // An installed tree (P/bin/zimage, P/share/zimage/) is found from the executable's own path, so a
  // prefix can be moved or copied whole; a binary in the build tree falls through to the source tree.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  const fs::path installed = ec ? fs::path() : (exe.parent_path() / ZIMAGE_DATA_FROM_BIN).lexically_normal();
  if (!installed.empty() && fs::exists(installed / "tokenizer.json", ec)) return installed.string();
  if (fs::exists(fs::path(ZIMAGE_ASSETS_DIR) / "tokenizer.json", ec) || installed.empty()) return ZIMAGE_ASSETS_DIR;
  return installed.string();  // neither holds the data: errors name where an installed binary looks
}

ModelSource open_model(const std::string& spec) {
  const std::string prefix = "synthetic:";
  if (spec.rfind(prefix, 0) == 0) return open_synthetic(spec, spec.substr(prefix.size()));

  fs::path root(spec);
  if (!fs::is_directory(root))
    throw Error(ErrorKind::NotFound, "model folder '" + spec + "' does not exist (or use synthetic:tiny / synthetic:turbo)");
  ModelSource m;
  m.name = spec;
  m.model_index = Config::load((root / "model_index.json").string());
  for (const char* comp : {"transformer", "text_encoder", "vae", "scheduler", "tokenizer"})
    if (!fs::is_directory(root / comp))
      throw Error(ErrorKind::NotFound, spec + ": the model folder has no '" + comp + "' component folder");
  m.transformer = Config::load((root / "transformer" / "config.json").string());
  m.text_encoder = Config::load((root / "text_encoder" / "config.json").string());
  m.vae = Config::load((root / "vae" / "config.json").string());
  m.scheduler = Config::load((root / "scheduler" / "scheduler_config.json").string());
  m.transformer_weights = std::make_shared<CheckpointWeights>(Checkpoint::open_dir((root / "transformer").string()));
  Checkpoint text_encoder = Checkpoint::open_dir((root / "text_encoder").string());
  const std::string causal_lm = kQwen3CausalLmPrefix;
  std::string names_under = text_encoder.has(causal_lm + "embed_tokens.weight") ? causal_lm : "";
  m.text_encoder_weights = std::make_shared<CheckpointWeights>(std::move(text_encoder), names_under);
  m.vae_weights = std::make_shared<CheckpointWeights>(Checkpoint::open_dir((root / "vae").string()));
  m.tokenizer_dir = (root / "tokenizer").string();
  if (!fs::exists(root / "tokenizer" / "tokenizer.json"))
    throw Error(ErrorKind::NotFound, spec + ": tokenizer/tokenizer.json is missing");
  set_recipe(m, root);
  return m;
}

void ModelSource::prefetch_weights() const {
  for (const auto& w : {text_encoder_weights, transformer_weights, vae_weights})
    if (w) w->prefetch();
}

}  // namespace zimage
