#include "model/save_model.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "core/error.h"
#include "core/log.h"
#include "core/parallel.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/weights/checkpoint_layout.h"
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

namespace zimage {

namespace {

// One tensor of a ComfyUI DiT file: its ComfyUI name and the canonical tensors stacked in its rows
// (q, k, v for the fused attention.qkv; one otherwise).
struct ComfyTensor {
  std::string name;
  Shape shape;
  std::vector<WeightSpec> parts;
};

std::vector<ComfyTensor> comfy_tensors(const std::vector<WeightSpec>& specs) {
  std::vector<ComfyTensor> out;
  std::map<std::string, size_t> at;
  for (const auto& s : specs) {
    int part = -1;
    const std::string name = comfy_dit_name(s.name, &part);
    auto it = at.find(name);
    if (it == at.end()) {
      at[name] = out.size();
      out.push_back({name, s.shape, {s}});
      continue;
    }
    ComfyTensor& t = out[it->second];  // q, k, v come in that order in the specs
    ZI_ASSERT(part == int(t.parts.size()) && t.shape.size() == 2 && s.shape[1] == t.shape[1]);
    t.parts.push_back(s);
    t.shape[0] += s.shape[0];
  }
  return out;
}

// The tensor's values in float32, its parts' rows stacked.
Tensor read_f32(const WeightSource& ws, const ComfyTensor& t) {
  Tensor out = Tensor::empty(t.shape, DType::F32);
  float* dst = out.f32();
  for (const auto& p : t.parts) {
    Tensor v = ws.get(p.name, p.shape);
    convert_to_f32(v.dtype(), (v.is_contiguous() ? v : v.clone()).data(), dst, size_t(v.numel()));
    dst += v.numel();
  }
  return out;
}

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ComfyUI's Z-Image FP8 files quantize the transformer blocks' matrices and the final adaLN.
bool fp8_quantized(const ComfyTensor& t) {
  return t.shape.size() == 2 && ends_with(t.name, ".weight") &&
         (starts_with(t.name, "layers.") || starts_with(t.name, "noise_refiner.") ||
          starts_with(t.name, "context_refiner.") || starts_with(t.name, "final_layer.adaLN_modulation."));
}

// The ggml type city96's tools give tensor t in a file quantized to `target` (save_model.h).
GgmlType gguf_type(const ComfyTensor& t, GgmlType target) {
  const int64_t n = shape_numel(t.shape);
  if (t.shape.size() == 1 || n <= 1024 || contains(t.name, "final_layer.linear.")) return GgmlType::F32;
  if (target == GgmlType::BF16 || !ends_with(t.name, ".weight") || contains(t.name, "final_layer."))
    return GgmlType::BF16;
  int64_t be = 0, bb = 0;
  ggml_block_layout(uint32_t(target), &be, &bb);
  return t.shape.back() % be == 0 ? target : GgmlType::BF16;
}

// Rows of `values` [rows, cols] quantized to `type`, rows in parallel (each row is whole blocks).
Tensor quantize_rows(const Tensor& values, GgmlType type, uint64_t nbytes) {
  Tensor out = Tensor::empty({int64_t(nbytes)}, DType::U8);
  const int64_t cols = values.dim(-1), rows = values.numel() / cols, row_bytes = int64_t(nbytes) / rows;
  parallel_for(rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      ggml_quantize(uint32_t(type), values.f32() + r * cols, out.data_as<uint8_t>() + r * row_bytes, cols);
  });
  return out;
}

// ComfyUI's per-tensor scale: the largest |w| lands on e4m3's largest finite value, 448.
float fp8_scale(const Tensor& values) {
  float amax = 0;
  for (int64_t i = 0; i < values.numel(); ++i) amax = std::max(amax, std::fabs(values.f32()[i]));
  return amax > 0 ? amax / 448.0f : 1.0f;
}

void check_destination(const fs::path& path, const char* extension, bool overwrite) {
  if (path.extension() != extension)
    throw Error(ErrorKind::InvalidArgument, path.string() + ": the file name must end in " + extension);
  if (fs::exists(path) && !overwrite)
    throw Error(ErrorKind::InvalidArgument, path.string() + " exists (--force replaces it)");
  if (fs::is_directory(path)) throw Error(ErrorKind::InvalidArgument, path.string() + " is a folder");
  if (!path.parent_path().empty()) fs::create_directories(path.parent_path());
}

}  // namespace

SavedDiffusionModel save_diffusion_model(const ModelSource& model, const std::string& path_str, DitFileFormat format,
                                         DitQuantization quantize, bool overwrite) {
  const fs::path path(path_str);
  const bool gguf = format == DitFileFormat::Gguf;
  if (quantize == DitQuantization::Fp8 && gguf)
    throw Error(ErrorKind::InvalidArgument, "--quantize fp8 writes a ComfyUI safetensors file: use --format comfyui");
  if ((quantize == DitQuantization::Q8_0 || quantize == DitQuantization::Q4_K) && !gguf)
    throw Error(ErrorKind::InvalidArgument, "--quantize q8_0 and q4_k are GGUF block formats: use --format gguf");
  check_destination(path, gguf ? ".gguf" : ".safetensors", overwrite);
  const std::vector<ComfyTensor> tensors = comfy_tensors(ZImageDit::weight_specs(model.transformer));
  const WeightSource& ws = *model.transformer_weights;
  SavedDiffusionModel saved;
  if (gguf) {
    const GgmlType target = quantize == DitQuantization::Q8_0   ? GgmlType::Q8_0
                            : quantize == DitQuantization::Q4_K ? GgmlType::Q4_K
                                                                : GgmlType::BF16;
    // llama.cpp's file types: MOSTLY_Q8_0 7, MOSTLY_Q4_K_S 14 (every quantized matrix Q4_K), MOSTLY_BF16 32.
    const uint32_t file_type = target == GgmlType::Q8_0 ? 7 : target == GgmlType::Q4_K ? 14 : 32;
    std::vector<GgufEntry> entries;
    for (const auto& t : tensors) {
      entries.push_back({t.name, t.shape, uint32_t(gguf_type(t, target))});
      const GgmlType type = GgmlType(entries.back().type);
      saved.quantized += type != GgmlType::F32 && type != GgmlType::BF16;
    }
    size_t next = 0;
    write_gguf(path.string(),
               {{"general.architecture", "lumina2"},
                {"general.quantization_version", 2u},
                {"general.file_type", file_type}},
               entries, [&](const GgufEntry& e) {
                 const Tensor values = read_f32(ws, tensors[next++]);
                 return quantize_rows(values, GgmlType(e.type), e.nbytes());
               });
  } else {
    const std::string prefix = "model.diffusion_model.";
    std::vector<CheckpointEntry> entries;
    std::map<std::string, const ComfyTensor*> by_name;
    for (const auto& t : tensors) {
      const bool fp8 = quantize == DitQuantization::Fp8 && fp8_quantized(t);
      entries.push_back({prefix + t.name, fp8 ? DType::F8E4M3 : DType::BF16, t.shape});
      by_name[prefix + t.name] = &t;
      if (!fp8) continue;
      ++saved.quantized;
      const std::string module = t.name.substr(0, t.name.size() - std::string(".weight").size());
      entries.push_back({prefix + module + ".scale_weight", DType::F32, {}});
    }
    if (quantize == DitQuantization::Fp8) entries.push_back({prefix + "scaled_fp8", DType::F8E4M3, {0}});
    // A file's tensors go in name order, so "<module>.scale_weight" comes right before "<module>.weight":
    // the weight's values and scale, computed for the scale entry, are kept for the weight.
    std::string cached_name;
    Tensor cached;
    float cached_scale = 1;
    auto values_of = [&](const ComfyTensor& t) {
      if (cached_name != t.name) {
        cached = read_f32(ws, t);
        cached_scale = fp8_scale(cached);
        cached_name = t.name;
      }
      return cached;
    };
    const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    write_checkpoint(dir.string(), path.stem().string(), entries, kOneFile, [&](const CheckpointEntry& e) -> Tensor {
      if (e.name == prefix + "scaled_fp8") return Tensor::zeros({0}, DType::F8E4M3);
      if (ends_with(e.name, ".scale_weight")) {
        const std::string module = e.name.substr(prefix.size(), e.name.size() - prefix.size() - 13);
        Tensor s = Tensor::empty({}, DType::F32);
        values_of(*by_name.at(prefix + module + ".weight"));
        s.f32()[0] = cached_scale;
        return s;
      }
      const ComfyTensor& t = *by_name.at(e.name);
      const Tensor values = values_of(t);
      if (e.dtype == DType::BF16) return values.to_dtype(DType::BF16);
      const float scale = cached_scale;  // w / scale, rounded to nearest even, as ComfyUI's converters do
      Tensor q = Tensor::empty(t.shape, DType::F8E4M3);
      parallel_for(values.numel(), int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) q.data_as<uint8_t>()[i] = f32_to_f8e4m3(values.f32()[i] / scale);
      });
      return q;
    });
  }
  saved.tensors = int64_t(tensors.size());
  saved.bytes = fs::file_size(path);
  log_info("wrote " + path.string() + ": " + std::to_string(saved.tensors) + " tensors (" +
           std::to_string(saved.quantized) + " quantized), " + gigabytes(saved.bytes));
  return saved;
}

}  // namespace zimage
