#include "model/save_model.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

#include "core/error.h"
#include "core/log.h"
#include "io/safetensors.h"
#include "model/qwen3.h"
#include "model/vae.h"
#include "model/zimage_dit.h"

namespace zimage {

namespace fs = std::filesystem;

namespace {

// Shard limits of Tongyi-MAI/Z-Image-Turbo: the transformer (12.3 GB) comes in 3 shards of <= 5 GB, the
// Qwen3-4B text encoder (8.0 GB) in 3 of <= 4 GB, the VAE in one file.
constexpr uint64_t kTransformerShardBytes = 5'000'000'000ull, kTextEncoderShardBytes = 4'000'000'000ull;
constexpr uint64_t kOneFile = std::numeric_limits<uint64_t>::max();

// Files of a Hugging Face tokenizer folder that are copied when present (tokenizer.json is required).
const char* const kTokenizerFiles[] = {"tokenizer.json",      "tokenizer_config.json",
                                       "chat_template.jinja", "special_tokens_map.json",
                                       "added_tokens.json",   "vocab.json",
                                       "merges.txt"};
const char* const kComponents[] = {"transformer", "text_encoder", "vae", "scheduler", "tokenizer"};

struct Component {
  const char* folder;
  const char* stem;    // file name stem of the safetensors files
  std::string prefix;  // put before every spec name in the file
  const Config& config;
  std::vector<WeightSpec> specs;
  WeightSource& source;
  uint64_t shard_bytes;
};

void write_json(const fs::path& path, const nlohmann::json& j) {
  std::ofstream f(path);
  f << j.dump(2) << "\n";
  f.close();
  if (!f) throw Error(ErrorKind::Io, path.string() + ": write failed");
}

std::string gigabytes(uint64_t bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f GB", double(bytes) / 1e9);
  return s;
}

// An absent or empty destination is used as is; a model folder is cleared when allowed; anything else is
// left alone.
void prepare_destination(const ModelSource& model, const fs::path& dir, bool overwrite) {
  if (!fs::exists(dir)) return;
  if (!fs::is_directory(dir)) throw Error(ErrorKind::InvalidArgument, dir.string() + " exists and is not a folder");
  if (!model.synthetic && fs::exists(model.name) && fs::equivalent(model.name, dir))
    throw Error(ErrorKind::InvalidArgument, dir.string() + " is the model being saved; choose another output folder");
  if (fs::is_empty(dir)) return;
  if (!overwrite)
    throw Error(
        ErrorKind::InvalidArgument,
        dir.string() + " is not empty (--force replaces a model folder there, or choose another output folder)");
  if (!fs::exists(dir / "model_index.json"))
    throw Error(ErrorKind::InvalidArgument,
                dir.string() + " is not empty and holds no model (no model_index.json): nothing there is replaced");
  fs::remove(dir / "model_index.json");
  for (const char* c : kComponents) fs::remove_all(dir / c);
}

void check_free_space(const fs::path& dir, uint64_t bytes) {
  fs::path p = dir;
  while (!p.empty() && !fs::exists(p)) p = p.parent_path();
  std::error_code ec;
  fs::space_info space = fs::space(p.empty() ? fs::current_path() : p, ec);
  if (!ec && space.available < bytes)
    throw Error(ErrorKind::Io, dir.string() + ": the model needs " + gigabytes(bytes) + " of disk space, " +
                                   gigabytes(space.available) + " is free");
}

}  // namespace

SavedModel save_model(const ModelSource& model, const std::string& dir_str, const SaveModelOptions& options) {
  const fs::path dir(dir_str);
  auto limit = [&](uint64_t real) { return options.shard_bytes ? options.shard_bytes : real; };
  std::vector<Component> components = {
      {"transformer", "diffusion_pytorch_model", "", model.transformer, ZImageDit::weight_specs(model.transformer),
       *model.transformer_weights, limit(kTransformerShardBytes)},
      {"text_encoder", "model", kQwen3CausalLmPrefix, model.text_encoder,
       Qwen3TextEncoder::weight_specs(model.text_encoder), *model.text_encoder_weights, limit(kTextEncoderShardBytes)},
      {"vae", "diffusion_pytorch_model", "", model.vae, Vae::weight_specs(model.vae), *model.vae_weights,
       limit(kOneFile)},
  };
  const fs::path tokenizer_dir(model.tokenizer_dir);
  if (!fs::exists(tokenizer_dir / "tokenizer.json"))
    throw Error(ErrorKind::NotFound, model.tokenizer_dir + ": tokenizer.json is missing");
  uint64_t bytes = 0;
  for (const auto& c : components)
    for (const auto& s : c.specs) bytes += uint64_t(shape_numel(s.shape)) * dtype_size(DType::BF16);

  prepare_destination(model, dir, options.overwrite);
  check_free_space(dir, bytes);
  for (const char* c : kComponents) fs::create_directories(dir / c);

  SavedModel saved;
  auto wrote = [&](const std::string& rel) { saved.files.push_back(rel); };
  for (const auto& c : components) {
    write_json(dir / c.folder / "config.json", c.config.json());
    wrote(std::string(c.folder) + "/config.json");
    std::vector<CheckpointEntry> entries;
    for (const auto& s : c.specs) entries.push_back({c.prefix + s.name, DType::BF16, s.shape});
    const size_t prefix_len = c.prefix.size();
    WrittenCheckpoint w =
        write_checkpoint((dir / c.folder).string(), c.stem, entries, c.shard_bytes, [&](const CheckpointEntry& e) {
          Tensor t = c.source.get(e.name.substr(prefix_len), e.shape);
          if (t.dtype() != DType::BF16) return t.to_dtype(DType::BF16);
          return t.is_contiguous() ? t : t.clone();
        });
    for (const auto& f : w.files) wrote(std::string(c.folder) + "/" + f);
    saved.weight_bytes += w.total_bytes;
    const size_t shards = w.files.size() - (w.files.size() > 1);  // the last of several files is the index
    log_info("wrote " + (dir / c.folder).string() + ": " + std::to_string(c.specs.size()) + " tensors, " +
             gigabytes(w.total_bytes) + " in " + std::to_string(shards) + " shard(s)");
  }
  write_json(dir / "scheduler" / "scheduler_config.json", model.scheduler.json());
  wrote("scheduler/scheduler_config.json");
  for (const char* f : kTokenizerFiles) {
    if (!fs::exists(tokenizer_dir / f)) continue;
    std::error_code ec;
    fs::copy_file(tokenizer_dir / f, dir / "tokenizer" / f, fs::copy_options::overwrite_existing, ec);
    if (ec)
      throw Error(ErrorKind::Io,
                  (dir / "tokenizer" / f).string() + ": cannot copy the tokenizer file: " + ec.message());
    wrote(std::string("tokenizer/") + f);
  }
  // The recipe goes with the weights: open_model would otherwise guess it from the folder's name.
  nlohmann::json index = model.model_index.json();
  index[kRecipeKey] = {{"num_inference_steps", model.default_steps}, {"guidance_scale", model.default_guidance}};
  write_json(dir / "model_index.json", index);
  wrote("model_index.json");
  return saved;
}

}  // namespace zimage
