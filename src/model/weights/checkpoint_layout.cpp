#include "model/weights/checkpoint_layout.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>

#include "core/error.h"

namespace zimage {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// Suffixes of the tensors that travel with an FP8 weight rather than being weights themselves.
const char* const kScaleSuffixes[] = {".weight_scale", ".scale_weight", ".input_scale", ".scale_input", ".comfy_quant"};

bool is_scale_tensor(const std::string& n) {
  for (const char* s : kScaleSuffixes)
    if (ends_with(n, s)) return true;
  return false;
}

// One anchor tensor per layout: the first stored name that ends with it gives the prefix.
struct Anchor {
  const char* suffix;
  const char* not_after;  // a longer name that also ends with `suffix` but belongs to another layout
  ModelPart part;
  LayoutKind kind;
  const char* name;
};

const Anchor kAnchors[] = {
    {"all_x_embedder.2-1.weight", nullptr, ModelPart::DiT, LayoutKind::DiffusersDit, "diffusers_dit"},
    {"x_embedder.weight", "all_", ModelPart::DiT, LayoutKind::ComfyDit, "comfy_dit"},
    {"encoder.down_blocks.0.resnets.0.conv1.weight", nullptr, ModelPart::Vae, LayoutKind::DiffusersVae,
     "diffusers_vae"},
    {"encoder.down.0.block.0.conv1.weight", nullptr, ModelPart::Vae, LayoutKind::BflVae, "bfl_vae"},
    {"embed_tokens.weight", nullptr, ModelPart::TextEncoder, LayoutKind::Qwen3, "qwen3"},
    {"token_embd.weight", nullptr, ModelPart::TextEncoder, LayoutKind::LlamaCppQwen3, "llama_cpp_qwen3"},
};

// comfy_dit: renames of the name after the prefix. `to` empty: a fused q|k|v (rows split in three parts).
struct Rename {
  const char* from;
  const char* to;
  bool at_start;  // `from` must start the name (else: appear anywhere)
};
const Rename kComfyDit[] = {
    {".attention.qkv.", "", false},
    {".attention.out.", ".attention.to_out.0.", false},
    {".attention.q_norm.", ".attention.norm_q.", false},
    {".attention.k_norm.", ".attention.norm_k.", false},
    {"x_embedder.", "all_x_embedder.2-1.", true},
    {"final_layer.", "all_final_layer.2-1.", true},
};
const char* const kComfyDitIgnored[] = {"norm_final.weight", "scaled_fp8"};

// bfl_vae: regular-expression renames applied in order to the name after the prefix; "{up}" stands for
// the reversed decoder level (diffusers' up_blocks.i is BFL's up.(levels - 1 - i)).
struct RegexRename {
  const char* from;
  const char* to;
};
const RegexRename kBflVae[] = {
    {R"(^encoder\.down\.(\d+)\.block\.(\d+)\.)", "encoder.down_blocks.$1.resnets.$2."},
    {R"(^encoder\.down\.(\d+)\.downsample\.)", "encoder.down_blocks.$1.downsamplers.0."},
    {R"(^decoder\.up\.(\d+)\.block\.(\d+)\.)", "decoder.up_blocks.{up}.resnets.$2."},
    {R"(^decoder\.up\.(\d+)\.upsample\.)", "decoder.up_blocks.{up}.upsamplers.0."},
    {R"(\.nin_shortcut\.)", ".conv_shortcut."},
    {R"(^(encoder|decoder)\.mid\.block_1\.)", "$1.mid_block.resnets.0."},
    {R"(^(encoder|decoder)\.mid\.block_2\.)", "$1.mid_block.resnets.1."},
    {R"(^(encoder|decoder)\.mid\.attn_1\.norm\.)", "$1.mid_block.attentions.0.group_norm."},
    {R"(^(encoder|decoder)\.mid\.attn_1\.q\.)", "$1.mid_block.attentions.0.to_q."},
    {R"(^(encoder|decoder)\.mid\.attn_1\.k\.)", "$1.mid_block.attentions.0.to_k."},
    {R"(^(encoder|decoder)\.mid\.attn_1\.v\.)", "$1.mid_block.attentions.0.to_v."},
    {R"(^(encoder|decoder)\.mid\.attn_1\.proj_out\.)", "$1.mid_block.attentions.0.to_out.0."},
    {R"(^(encoder|decoder)\.norm_out\.)", "$1.conv_norm_out."},
};

// llama_cpp_qwen3: llama.cpp's tensor names (llama-arch.cpp) to transformers' Qwen3Model names.
const RegexRename kLlamaCpp[] = {
    {R"(^token_embd\.)", "embed_tokens."},
    {R"(^output_norm\.)", "norm."},
    {R"(^blk\.(\d+)\.attn_norm\.)", "layers.$1.input_layernorm."},
    {R"(^blk\.(\d+)\.attn_q\.)", "layers.$1.self_attn.q_proj."},
    {R"(^blk\.(\d+)\.attn_k\.)", "layers.$1.self_attn.k_proj."},
    {R"(^blk\.(\d+)\.attn_v\.)", "layers.$1.self_attn.v_proj."},
    {R"(^blk\.(\d+)\.attn_output\.)", "layers.$1.self_attn.o_proj."},
    {R"(^blk\.(\d+)\.attn_q_norm\.)", "layers.$1.self_attn.q_norm."},
    {R"(^blk\.(\d+)\.attn_k_norm\.)", "layers.$1.self_attn.k_norm."},
    {R"(^blk\.(\d+)\.ffn_norm\.)", "layers.$1.post_attention_layernorm."},
    {R"(^blk\.(\d+)\.ffn_gate\.)", "layers.$1.mlp.gate_proj."},
    {R"(^blk\.(\d+)\.ffn_up\.)", "layers.$1.mlp.up_proj."},
    {R"(^blk\.(\d+)\.ffn_down\.)", "layers.$1.mlp.down_proj."},
};

int count_indices(const std::vector<std::string>& names, const std::string& head) {
  // Distinct N in names "<head>N.<...>".
  std::set<int> seen;
  for (const auto& n : names) {
    if (!starts_with(n, head)) continue;
    size_t i = head.size(), j = i;
    while (j < n.size() && std::isdigit(static_cast<unsigned char>(n[j]))) ++j;
    if (j > i && j < n.size() && n[j] == '.') seen.insert(std::stoi(n.substr(i, j - i)));
  }
  return int(seen.size());
}

Error format_error(const std::string& file, const std::string& what) {
  return Error(ErrorKind::Format, file + ": " + what);
}

}  // namespace

const char* model_part_name(ModelPart p) {
  switch (p) {
    case ModelPart::DiT: return "diffusion model";
    case ModelPart::TextEncoder: return "text encoder";
    case ModelPart::Vae: return "VAE";
  }
  return "?";
}

DetectedLayout detect_layout(const StoredTensors& file) {
  const std::vector<std::string> names = file.names();
  for (const Anchor& a : kAnchors) {
    for (const auto& n : names) {
      if (!ends_with(n, a.suffix)) continue;
      std::string prefix = n.substr(0, n.size() - std::string(a.suffix).size());
      if (a.not_after && ends_with(prefix, a.not_after)) continue;
      if (!prefix.empty() && prefix.back() != '.') continue;
      return {a.part, a.kind, prefix, a.name};
    }
  }
  std::string first;
  for (size_t i = 0; i < names.size() && i < 3; ++i) first += (i ? ", '" : "'") + names[i] + "'";
  throw format_error(file.describe(),
                     "unknown checkpoint layout: not a Z-Image diffusion model (diffusers or ComfyUI names), a VAE "
                     "(diffusers or BFL/LDM names) or a Qwen3 text encoder (" +
                         std::to_string(names.size()) + " tensors" + (first.empty() ? "" : ", first " + first) + ")");
}

LayoutWeights::LayoutWeights(std::shared_ptr<StoredTensors> file, DetectedLayout layout)
    : file_(std::move(file)), layout_(std::move(layout)) {
  const std::vector<std::string> all = file_->names();
  std::vector<std::string> local;  // names after the prefix
  for (const auto& n : all) {
    if (is_scale_tensor(n) || n == "scaled_fp8" || ends_with(n, ".scaled_fp8")) {  // ComfyUI's scaled FP8 marker
      scaled_ = true;
      continue;
    }
    if (starts_with(n, layout_.prefix)) local.push_back(n.substr(layout_.prefix.size()));
  }
  if (std::string q = file_->metadata("_quantization_metadata"); !q.empty()) {
    nlohmann::json j = nlohmann::json::parse(q, nullptr, false);
    if (!j.is_object() || !j.contains("layers") || !j["layers"].is_object())
      throw format_error(file_->describe(),
                         "the _quantization_metadata header entry is not JSON with a \"layers\" object");
    quantization_ = j["layers"];
    scaled_ = true;
  }
  const int up_levels = count_indices(local, "decoder.up.");
  std::vector<std::pair<std::regex, std::string>> regex_table;
  if (layout_.kind == LayoutKind::BflVae)
    for (const auto& r : kBflVae) regex_table.emplace_back(std::regex(r.from), r.to);
  if (layout_.kind == LayoutKind::LlamaCppQwen3)
    for (const auto& r : kLlamaCpp) regex_table.emplace_back(std::regex(r.from), r.to);

  for (const auto& name : local) {
    const std::string stored = layout_.prefix + name;
    Source src{stored};
    std::string canonical = name;
    switch (layout_.kind) {
      case LayoutKind::DiffusersDit:
      case LayoutKind::DiffusersVae: break;
      case LayoutKind::Qwen3:
        if (starts_with(name, "lm_head.")) continue;  // the causal LM's head: not part of the encoder
        break;
      case LayoutKind::ComfyDit: {
        if (std::find(std::begin(kComfyDitIgnored), std::end(kComfyDitIgnored), name) != std::end(kComfyDitIgnored))
          continue;
        bool fused = false;
        for (const Rename& r : kComfyDit) {
          size_t at = r.at_start ? (starts_with(canonical, r.from) ? 0 : std::string::npos) : canonical.find(r.from);
          if (at == std::string::npos) continue;
          if (*r.to == '\0') {
            fused = true;
            const Shape s = file_->shape(stored);
            if (s.size() != 2 || s[0] % 3 != 0)
              throw format_error(file_->describe(), "fused tensor '" + stored + "' has shape " + shape_str(s) +
                                                        ", expected [3 * dim, dim]");
            // Z-Image's released models have as many key/value heads as query heads: q, k, v are equal thirds.
            const int64_t part = s[0] / 3;
            const char* parts[] = {".attention.to_q.", ".attention.to_k.", ".attention.to_v."};
            for (int p = 0; p < 3; ++p) {
              std::string c = canonical;
              c.replace(at, std::string(r.from).size(), parts[p]);
              map_[c] = Source{stored, p * part, part, false};
            }
            break;
          }
          canonical.replace(at, std::string(r.from).size(), r.to);
        }
        if (fused) continue;
        break;
      }
      case LayoutKind::LlamaCppQwen3:
      case LayoutKind::BflVae: {
        std::smatch m;
        for (const auto& [re, to] : regex_table) {
          if (!std::regex_search(canonical, m, re)) continue;
          std::string replacement = to;
          if (size_t at = replacement.find("{up}"); at != std::string::npos) {
            const int level = std::stoi(m[1].str());
            replacement.replace(at, 4, std::to_string(up_levels - 1 - level));
          }
          canonical = std::regex_replace(canonical, re, replacement, std::regex_constants::format_first_only);
        }
        const Shape s = file_->shape(stored);
        src.squeeze = canonical.find(".mid_block.attentions.0.to_") != std::string::npos && s.size() == 4 &&
                      s[2] == 1 && s[3] == 1;
        break;
      }
    }
    map_[canonical] = src;
  }
}

std::string LayoutWeights::describe() const { return file_->describe() + " (" + layout_.name + ")"; }

std::vector<std::string> LayoutWeights::canonical_names() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : map_) out.push_back(n);
  return out;
}

std::string LayoutWeights::stored_name(const std::string& canonical) const {
  auto it = map_.find(canonical);
  return it == map_.end() ? "" : it->second.stored;
}

Shape LayoutWeights::shape(const std::string& canonical) const {
  auto it = map_.find(canonical);
  if (it == map_.end()) throw Error(ErrorKind::NotFound, describe() + ": no tensor serves '" + canonical + "'");
  const Source& s = it->second;
  Shape shape = file_->shape(s.stored);
  if (s.rows >= 0) shape[0] = s.rows;
  if (s.squeeze) shape.resize(2);
  return shape;
}

// The stored tensor with its validated scale: a scaled file's FP8 weight must name its format where the
// file says one (comfy_quant, _quantization_metadata) and carry a finite scale, one per tensor or per row.
StoredWeight LayoutWeights::read_stored(const std::string& stored) const {
  if (std::optional<StoredWeight> blocks = file_->read_blocks(stored)) return *blocks;
  auto as_stored = [](Tensor t, Tensor scale) {
    StoredWeight w;
    w.shape = t.shape();
    w.data = std::move(t);
    w.scale = std::move(scale);
    return w;
  };
  Tensor t = file_->read(stored);
  if (t.dtype() == DType::U8 || t.dtype() == DType::I32 || t.dtype() == DType::I64)
    throw format_error(file_->describe(),
                       "weight '" + stored + "' is stored as " + dtype_name(t.dtype()) +
                           ": a quantization other than FP8 and GGUF (e.g. ComfyUI's int8 or nvfp4), "
                           "which this engine does not read");
  if (t.dtype() != DType::F8E4M3 && t.dtype() != DType::F8E5M2) return as_stored(t, Tensor());
  const std::string module = ends_with(stored, ".weight") ? stored.substr(0, stored.size() - 7) : stored;
  const std::string want = t.dtype() == DType::F8E4M3 ? "float8_e4m3fn" : "float8_e5m2";
  const std::string unprefixed = module.substr(std::min(module.size(), layout_.prefix.size()));
  for (const std::string& key : {module, unprefixed}) {
    if (!quantization_.is_object() || !quantization_.contains(key)) continue;
    const nlohmann::json& e = quantization_[key];
    if (!e.is_object() || !e.contains("format") || !e["format"].is_string() || e["format"].get<std::string>() != want)
      throw format_error(file_->describe(), "_quantization_metadata entry '" + key + "' does not give the format \"" +
                                                want + "\" of its " + dtype_name(t.dtype()) + " weight");
  }
  if (file_->has(module + ".comfy_quant")) {
    Tensor q = file_->read(module + ".comfy_quant");
    std::string text;
    if (q.dtype() == DType::U8) text.assign(q.data_as<const char>(), size_t(q.numel()));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (!j.is_object() || !j.contains("format") || !j["format"].is_string() || j["format"].get<std::string>() != want)
      throw format_error(file_->describe(), "'" + module + ".comfy_quant' is not the JSON {\"format\": \"" + want +
                                                "\"} its " + dtype_name(t.dtype()) + " weight needs");
  }
  Tensor scale;
  for (const char* s : {".weight_scale", ".scale_weight"})
    if (file_->has(module + s)) scale = file_->read(module + s).to_f32();
  const bool needs_scale = scaled_ || file_->has(module + ".comfy_quant");
  if (!scale.defined() || scale.numel() == 0) {
    if (needs_scale)
      throw format_error(file_->describe(), "FP8 weight '" + stored + "' has no scale ('" + module +
                                                ".weight_scale' or '.scale_weight') in a file of scaled FP8 weights");
    return as_stored(t, Tensor());  // plain FP8: the values themselves
  }
  const int64_t rows = t.ndim() >= 1 ? t.dim(0) : 1;
  if (scale.numel() != 1 && scale.numel() != rows)
    throw format_error(file_->describe(), "scale of FP8 weight '" + stored + "' has " + std::to_string(scale.numel()) +
                                              " values; one per tensor or one per row (" + std::to_string(rows) +
                                              ") expected");
  for (float v : scale.to_vector())
    if (!std::isfinite(v)) throw format_error(file_->describe(), "scale of FP8 weight '" + stored + "' is not finite");
  return as_stored(t, scale.numel() == 1 ? scale.reshape({1}) : scale.reshape({rows}));
}

StoredWeight LayoutWeights::stored_weight(const std::string& canonical) const {
  auto it = map_.find(canonical);
  if (it == map_.end())
    throw Error(ErrorKind::NotFound, describe() + ": missing tensor '" + canonical + "' (a " +
                                         model_part_name(layout_.part) + " file of another model?)");
  const Source& s = it->second;
  StoredWeight w = read_stored(s.stored);
  if (s.rows >= 0) {
    ZI_CHECK(w.data.ndim() == 2 && w.shape.size() == 2, ErrorKind::Format,
             describe() + ": fused tensor '" + s.stored + "' is not a matrix");
    w.data = w.data.narrow0(s.row_begin, s.rows);
    w.shape[0] = s.rows;
    if (w.scale.defined() && w.scale.numel() > 1) w.scale = w.scale.narrow0(s.row_begin, s.rows);
  }
  if (s.squeeze) {
    ZI_CHECK(!w.blocks(), ErrorKind::Format, describe() + ": 1x1 convolution '" + s.stored + "' is block-quantized");
    w.data = w.data.reshape({w.data.dim(0), w.data.dim(1)});
    w.shape = w.data.shape();
  }
  return w;
}

Tensor dequantize(const StoredWeight& w) { return w.quantized() ? dequantize_on_host(w) : w.data; }

std::optional<StoredWeight> LayoutWeights::quantized(const std::string& name, const Shape& shape) const {
  auto it = map_.find(name);
  if (it == map_.end()) return std::nullopt;  // get() reports the missing tensor
  const std::string& stored = it->second.stored;
  const DType dt = file_->dtype(stored);
  if (dt != DType::F8E4M3 && dt != DType::F8E5M2 && !file_->read_blocks(stored)) return std::nullopt;
  StoredWeight w = stored_weight(name);
  if (w.shape != shape)
    throw Error(ErrorKind::Format, describe() + ": tensor '" + stored + "' (served as '" + name + "') has shape " +
                                       shape_str(w.shape) + ", the config implies " + shape_str(shape));
  return w;
}

Tensor LayoutWeights::get(const std::string& name, const Shape& shape) const {
  Tensor t = dequantize(stored_weight(name));
  if (t.shape() != shape)
    throw Error(ErrorKind::Format, describe() + ": tensor '" + stored_name(name) + "' (served as '" + name +
                                       "') has shape " + shape_str(t.shape()) + ", the config implies " +
                                       shape_str(shape));
  return t;
}

std::string comfy_dit_name(const std::string& canonical, int* qkv_part) {
  *qkv_part = -1;
  const char* parts[] = {".attention.to_q.", ".attention.to_k.", ".attention.to_v."};
  std::string name = canonical;
  for (int p = 0; p < 3; ++p)
    if (size_t at = name.find(parts[p]); at != std::string::npos) {
      *qkv_part = p;
      return name.replace(at, std::string(parts[p]).size(), ".attention.qkv.");
    }
  for (const Rename& r : kComfyDit) {
    if (*r.to == '\0') continue;
    const size_t at = r.at_start ? (starts_with(name, r.to) ? 0 : std::string::npos) : name.find(r.to);
    if (at != std::string::npos) name.replace(at, std::string(r.to).size(), r.from);
  }
  return name;
}

Config infer_component_config(const LayoutWeights& w, const std::string& where) {
  const auto names = w.canonical_names();
  nlohmann::json j;
  switch (w.layout().part) {
    case ModelPart::DiT: {
      const Shape x = w.shape("all_x_embedder.2-1.weight");  // [dim, patch^2 * in_channels]
      const Shape cap = w.shape("cap_embedder.1.weight");    // [dim, cap_feat_dim]
      const Shape qn = w.shape("layers.0.attention.norm_q.weight");
      const Shape k = w.shape("layers.0.attention.to_k.weight");
      const int64_t dim = x[0], head_dim = qn[0];
      ZI_CHECK(head_dim > 0 && dim % head_dim == 0 && head_dim % 8 == 0 && x[1] % 4 == 0, ErrorKind::Format,
               w.describe() + ": DiT shapes are not Z-Image's (dim " + std::to_string(dim) + ", head_dim " +
                   std::to_string(head_dim) + ")");
      j = {{"_class_name", "ZImageTransformer2DModel"},
           {"all_f_patch_size", {1}},
           {"all_patch_size", {2}},
           {"axes_dims", {head_dim / 4, head_dim * 3 / 8, head_dim * 3 / 8}},
           {"axes_lens", {1536, 512, 512}},
           {"cap_feat_dim", cap[1]},
           {"dim", dim},
           {"in_channels", x[1] / 4},
           {"n_heads", dim / head_dim},
           {"n_kv_heads", k[0] / head_dim},
           {"n_layers", count_indices(names, "layers.")},
           {"n_refiner_layers", count_indices(names, "noise_refiner.")},
           {"norm_eps", 1e-5},
           {"qk_norm", true},
           {"rope_theta", 256.0},
           {"t_scale", 1000.0}};
      break;
    }
    case ModelPart::Vae: {
      const int levels = count_indices(names, "encoder.down_blocks.");
      std::vector<int64_t> channels;
      for (int i = 0; i < levels; ++i)
        channels.push_back(w.shape("encoder.down_blocks." + std::to_string(i) + ".resnets.0.conv1.weight")[0]);
      j = {{"_class_name", "AutoencoderKL"},
           {"block_out_channels", channels},
           {"in_channels", w.shape("encoder.conv_in.weight")[1]},
           {"latent_channels", w.shape("decoder.conv_in.weight")[1]},
           {"layers_per_block", count_indices(names, "encoder.down_blocks.0.resnets.")},
           {"norm_num_groups", 32},
           {"out_channels", w.shape("decoder.conv_out.weight")[0]},
           {"scaling_factor", 0.3611},
           {"shift_factor", 0.1159},
           {"mid_block_add_attention", w.has("encoder.mid_block.attentions.0.to_q.weight")},
           {"use_quant_conv", w.has("quant_conv.weight")},
           {"use_post_quant_conv", w.has("post_quant_conv.weight")}};
      break;
    }
    case ModelPart::TextEncoder: {
      ZI_CHECK(w.has("layers.0.self_attn.q_norm.weight"), ErrorKind::Format,
               w.describe() + ": not a Qwen3 text encoder (no layers.0.self_attn.q_norm.weight)");
      const Shape emb = w.shape("embed_tokens.weight");  // [vocab, hidden]
      const int64_t head_dim = w.shape("layers.0.self_attn.q_norm.weight")[0];
      ZI_CHECK(head_dim > 0, ErrorKind::Format, w.describe() + ": q_norm is empty");
      j = {{"architectures", {"Qwen3Model"}},
           {"head_dim", head_dim},
           {"hidden_size", emb[1]},
           {"intermediate_size", w.shape("layers.0.mlp.gate_proj.weight")[0]},
           {"num_attention_heads", w.shape("layers.0.self_attn.q_proj.weight")[0] / head_dim},
           {"num_hidden_layers", count_indices(names, "layers.")},
           {"num_key_value_heads", w.shape("layers.0.self_attn.k_proj.weight")[0] / head_dim},
           {"rms_norm_eps", 1e-6},
           {"rope_theta", 1000000.0},
           {"vocab_size", emb[0]}};
      break;
    }
  }
  return Config(j, where);
}

}  // namespace zimage
