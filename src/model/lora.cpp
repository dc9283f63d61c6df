#include "model/lora.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "core/parallel.h"
#include "model/zimage_dit.h"

namespace zimage {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& x) {
  return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
}
std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
    s.replace(at, from.size(), to);
  return s;
}

// ---- The one mapping table: every spelling of every LoRA-able module -> rows of canonical weights. ----

struct Part {  // canonical weight `target` [rows, in], rows [row_offset, row_offset + rows) of the module's output
  std::string target;
  int64_t row_offset = 0, rows = 0, in = 0;
};

struct ModuleEntry {
  std::string canonical;    // the module's diffusers name ("layers.0.attention.to_q", "layers.0.attention.qkv")
  std::vector<Part> parts;  // one, or three for a fused qkv
  // A spelling of a module that files may carry beside the diffusers one (ComfyUI's attention.out,
  // the fused qkv): when both are present, diffusers uses the individual projections and so do we.
  bool secondary = false;
};

// Spellings of one module name: diffusers, ComfyUI/original (final_layer, x_embedder, attention.out),
// the dot form of some trainers (to.q), and kohya's (every '.' -> '_', also '-' -> '_').
std::vector<std::pair<std::string, bool>> spellings(const std::string& m) {
  static const std::regex kComfyEmbed(R"(^all_(final_layer|x_embedder)\.\d+-1(\.|$))");
  std::string comfy = std::regex_replace(m, kComfyEmbed, "$1$2");
  comfy = replace_all(comfy, ".attention.to_out.0", ".attention.out");
  std::string dotted = m;
  for (const char* p : {"q", "k", "v"}) dotted = replace_all(dotted, std::string(".to_") + p, std::string(".to.") + p);
  std::vector<std::pair<std::string, bool>> out;  // (spelling, secondary)
  auto add = [&](const std::string& s, bool secondary) {
    out.push_back({s, secondary});
    out.push_back({replace_all(s, ".", "_"), secondary});
    out.push_back({replace_all(replace_all(s, ".", "_"), "-", "_"), secondary});
  };
  add(m, false);
  // ComfyUI's "attention.out" is a second name for to_out.0 (secondary); its final_layer / x_embedder
  // names are the only names of those modules there, so they are primary.
  if (comfy != m) add(comfy, comfy.find(".attention.out") != std::string::npos);
  if (dotted != m) add(dotted, false);
  return out;
}

using AliasTable = std::map<std::string, ModuleEntry>;

AliasTable alias_table(const std::vector<WeightSpec>& specs) {
  AliasTable t;
  std::map<std::string, Shape> linear;  // module -> [out, in]
  for (const auto& s : specs)
    if (s.shape.size() == 2 && ends_with(s.name, ".weight")) linear[s.name.substr(0, s.name.size() - 7)] = s.shape;
  for (const auto& [m, shape] : linear) {
    ModuleEntry e{m, {{m + ".weight", 0, shape[0], shape[1]}}, false};
    for (const auto& [sp, secondary] : spellings(m)) {
      ModuleEntry se = e;
      se.secondary = secondary;
      t.emplace(sp, se);
    }
    // ComfyUI's fused attention.qkv [3*dim, in]: rows of to_q, to_k, to_v.
    if (ends_with(m, ".attention.to_q")) {
      const std::string p = m.substr(0, m.size() - 4);  // "<block>.attention."
      if (!linear.count(p + "to_k") || !linear.count(p + "to_v")) continue;
      ModuleEntry f{p + "qkv", {}, true};
      int64_t off = 0;
      for (const char* n : {"to_q", "to_k", "to_v"}) {
        const Shape& sh = linear.at(p + n);
        f.parts.push_back({p + n + ".weight", off, sh[0], sh[1]});
        off += sh[0];
      }
      for (const auto& [sp, secondary] : spellings(p + "qkv")) t.emplace(sp, f);
    }
  }
  return t;
}

// Prefixes trainers put before the module name, stripped in any order until a spelling matches.
const char* const kPrefixes[] = {"base_model.model.",
                                 "model.diffusion_model.",
                                 "diffusion_model.",
                                 "transformer.",
                                 "lora_unet_",
                                 "lora_transformer_",
                                 "unet.",
                                 "model."};

const ModuleEntry* find_module(const AliasTable& t, std::string m) {
  for (int depth = 0; depth < 4; ++depth) {
    if (auto it = t.find(m); it != t.end()) return &it->second;
    // PEFT's adapter name may sit at the end of the module path ("to_q.default").
    if (ends_with(m, ".default")) {
      m = m.substr(0, m.size() - 8);
      continue;
    }
    bool stripped = false;
    for (const char* p : kPrefixes)
      if (starts_with(m, p)) {
        m = m.substr(std::string(p).size());
        stripped = true;
        break;
      }
    if (!stripped) break;
  }
  if (auto it = t.find(m); it != t.end()) return &it->second;
  return nullptr;
}

enum class Role { Down, Up, Alpha, Dora };

struct KeyParts {
  std::string module;
  Role role;
};

// "<module>.lora_down.weight" and the other suffixes LoRA files use for a module's tensors.
std::optional<KeyParts> split_key(const std::string& key) {
  static const std::pair<const char*, Role> kSuffixes[] = {
      {".lora_down.weight", Role::Down}, {".lora_up.weight", Role::Up},  {".lora.down.weight", Role::Down},
      {".lora.up.weight", Role::Up},     {".lora_A.weight", Role::Down}, {".lora_B.weight", Role::Up},
      {".alpha", Role::Alpha},           {".dora_scale", Role::Dora},
  };
  for (const auto& [suffix, role] : kSuffixes)
    if (ends_with(key, suffix)) return KeyParts{key.substr(0, key.size() - std::string(suffix).size()), role};
  // PEFT with an adapter name: "<module>.lora_A.default.weight".
  static const std::regex kNamed(R"(^(.+)\.lora_([AB])\.[A-Za-z0-9_\-]+\.weight$)");
  std::smatch m;
  if (std::regex_match(key, m, kNamed)) return KeyParts{m[1].str(), m[2].str() == "A" ? Role::Down : Role::Up};
  return std::nullopt;
}

// LyCORIS kinds whose math is not B·A: refused with their name rather than half-applied.
const char* lycoris_kind(const std::string& key) {
  if (key.find("lokr_w") != std::string::npos || key.find(".lokr_t") != std::string::npos) return "LoKr";
  if (key.find("hada_w") != std::string::npos || key.find(".hada_t") != std::string::npos) return "LoHa";
  if (key.find(".oft_") != std::string::npos || key.find("oft_diag") != std::string::npos) return "OFT";
  if (key.find(".lora_mid.") != std::string::npos) return "LoCon (Tucker)";
  if (ends_with(key, ".a1.weight") || ends_with(key, ".b2.weight")) return "GLoRA";
  return nullptr;
}

std::string list_keys(const std::vector<std::string>& keys, size_t max = 12) {
  std::string s;
  for (size_t i = 0; i < keys.size() && i < max; ++i) s += (i ? ", " : "") + keys[i];
  if (keys.size() > max) s += ", ... (" + std::to_string(keys.size() - max) + " more)";
  return s;
}

float scalar_of(const SafetensorsFile& f, const std::string& key) {
  Tensor t = f.get(key);
  ZI_CHECK(t.numel() == 1, ErrorKind::Format, f.path() + ": '" + key + "' is not a scalar");
  return t.to_f32().f32()[0];
}

// PEFT files saved by diffusers may carry {"lora_alpha": a, "r": r} in the safetensors metadata; a module
// without its own .alpha then uses a (PEFT's default alpha is r: scale 1).
std::optional<float> metadata_alpha(const SafetensorsFile& f) {
  auto it = f.metadata().find("lora_adapter_metadata");
  if (it == f.metadata().end()) return std::nullopt;
  auto j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("lora_alpha") && j["lora_alpha"].is_number()) return j["lora_alpha"].get<float>();
  return std::nullopt;
}

}  // namespace

std::string lora_module_for_key(const std::string& key, const std::vector<WeightSpec>& specs) {
  auto parts = split_key(key);
  if (!parts) return "";
  const AliasTable table = alias_table(specs);
  const ModuleEntry* e = find_module(table, parts->module);
  return e ? e->canonical : "";
}

LoraAdapter parse_lora(const SafetensorsFile& file, const std::vector<WeightSpec>& specs, const std::string& name) {
  const AliasTable table = alias_table(specs);
  LoraAdapter a;
  a.name = name;
  a.path = file.path();
  struct Group {
    const ModuleEntry* entry = nullptr;
    std::string down, up, alpha;
  };
  // By canonical module, so one module's tensors group even when spelled two ways (a dot-form file's
  // "to.q.lora.down.weight" with its "to_q.alpha"); a secondary spelling is its own group.
  std::map<std::string, Group> groups;
  for (const auto& [key, entry] : file.entries()) {
    if (const char* kind = lycoris_kind(key))
      throw Error(ErrorKind::Format, file.path() + ": '" + key + "' belongs to a " + kind +
                                         " (LyCORIS) adapter; zimage applies LoRA only (lora_down/lora_up or "
                                         "lora_A/lora_B pairs). Convert it to a LoRA or merge it into the model with "
                                         "the tool that made it");
    auto parts = split_key(key);
    const ModuleEntry* e = parts ? find_module(table, parts->module) : nullptr;
    if (!e) {
      a.unmatched.push_back(key);
      continue;
    }
    Group& g = groups[e->canonical + (e->secondary ? " (" + parts->module + ")" : "")];
    g.entry = e;
    switch (parts->role) {
      case Role::Down: g.down = key; break;
      case Role::Up: g.up = key; break;
      case Role::Alpha: g.alpha = key; break;
      case Role::Dora: a.ignored.push_back(key + " (DoRA magnitude: ignored, as diffusers does)"); break;
    }
  }
  const std::optional<float> meta_alpha = metadata_alpha(file);
  // Primary spellings first, so a secondary one (fused qkv, attention.out) naming rows already covered
  // is skipped as the duplicate it is.
  std::set<std::string> covered;
  for (int pass = 0; pass < 2; ++pass)
    for (const auto& [group, g] : groups) {
      const std::string module = split_key(g.down.empty() ? g.up.empty() ? g.alpha : g.up : g.down)->module;
      if (g.entry->secondary != (pass == 1)) continue;
      if (g.down.empty() || g.up.empty()) {
        if (g.down.empty() && g.up.empty()) {  // an alpha alone
          a.unmatched.push_back(g.alpha);
          continue;
        }
        throw Error(ErrorKind::Format,
                    file.path() + ": module '" + module + "' has " +
                        (g.down.empty() ? "an up (B) matrix but no down (A)" : "a down (A) matrix but no up (B)"));
      }
      bool dup = false;
      for (const auto& p : g.entry->parts) dup = dup || covered.count(p.target);
      if (dup) {
        a.ignored.push_back(module + " (the same weights also have their own LoRA in this file)");
        continue;
      }
      Tensor down = file.get(g.down).to_f32(), up = file.get(g.up).to_f32();
      int64_t rows = 0;
      for (const auto& p : g.entry->parts) rows += p.rows;
      const int64_t in = g.entry->parts[0].in;
      ZI_CHECK(down.ndim() == 2 && up.ndim() == 2 && up.dim(1) == down.dim(0), ErrorKind::Format,
               file.path() + ": module '" + module + "' has down " + shape_str(down.shape()) + " and up " +
                   shape_str(up.shape()) + ", which are not the factors of one matrix");
      ZI_CHECK(down.dim(1) == in && up.dim(0) == rows, ErrorKind::Format,
               file.path() + ": module '" + module + "' makes a [" + std::to_string(up.dim(0)) + ", " +
                   std::to_string(down.dim(1)) + "] update for '" + g.entry->canonical + "' of shape [" +
                   std::to_string(rows) + ", " + std::to_string(in) + "]: a LoRA for another model?");
      const int64_t r = down.dim(0);
      ZI_CHECK(r >= 1, ErrorKind::Format, file.path() + ": module '" + module + "' has rank 0");
      for (const Tensor* t : {&down, &up})
        for (int64_t i = 0; i < t->numel(); ++i)
          ZI_CHECK(std::isfinite(t->f32()[i]), ErrorKind::Format,
                   file.path() + ": module '" + module + "' holds NaN or Inf values");
      const float alpha = !g.alpha.empty() ? scalar_of(file, g.alpha) : meta_alpha ? *meta_alpha : float(r);
      ZI_CHECK(std::isfinite(alpha), ErrorKind::Format, file.path() + ": '" + g.alpha + "' is not finite");
      const float k = alpha / float(r);
      float* u = up.f32();
      for (int64_t i = 0; i < up.numel(); ++i) u[i] *= k;
      for (const auto& p : g.entry->parts) {
        a.factors.push_back({p.target, 0, down, up.narrow0(p.row_offset, p.rows).clone(), module});
        covered.insert(p.target);
      }
      a.max_rank = std::max(a.max_rank, r);
    }
  ZI_CHECK(
      !a.factors.empty(), ErrorKind::InvalidArgument,
      file.path() + ": no key matches a weight of the Z-Image DiT, so this LoRA would change nothing" +
          (a.unmatched.empty() ? std::string(" (the file has no LoRA keys)") : "; keys: " + list_keys(a.unmatched)));
  if (!a.unmatched.empty())
    log_warn("LoRA " + file.path() + ": " + std::to_string(a.unmatched.size()) +
             " keys match no weight of the DiT and are NOT applied: " + list_keys(a.unmatched));
  if (!a.ignored.empty()) log_warn("LoRA " + file.path() + ": skipped " + list_keys(a.ignored));
  return a;
}

LoraAdapter load_lora(const std::string& path, const std::vector<WeightSpec>& specs) {
  ZI_CHECK(std::filesystem::is_regular_file(path), ErrorKind::NotFound, "LoRA file '" + path + "' does not exist");
  return parse_lora(*SafetensorsFile::open(path), specs, std::filesystem::path(path).stem().string());
}

std::pair<std::string, float> parse_lora_flag(const std::string& flag) {
  const size_t colon = flag.rfind(':');
  if (colon != std::string::npos && colon + 1 < flag.size()) {
    const std::string tail = flag.substr(colon + 1);
    char* end = nullptr;
    const float s = std::strtof(tail.c_str(), &end);
    if (end == tail.c_str() + tail.size()) {
      ZI_CHECK(std::isfinite(s), ErrorKind::InvalidArgument, "--lora " + flag + ": the scale is not finite");
      return {flag.substr(0, colon), s};
    }
  }
  return {flag, 1.0f};
}

void merge_loras(ModelSource& model, const std::vector<std::string>& flags) {
  if (flags.empty()) return;
  const auto specs = ZImageDit::weight_specs(model.transformer);
  std::vector<ScaledLora> adapters;
  for (const auto& flag : flags) {
    auto [path, scale] = parse_lora_flag(flag);
    auto a = std::make_shared<const LoraAdapter>(load_lora(path, specs));
    char scale_text[32];
    std::snprintf(scale_text, sizeof scale_text, "%g", double(scale));
    log_info("LoRA " + a->name + " (scale " + scale_text + "): " + std::to_string(a->factors.size()) +
             " weights, rank up to " + std::to_string(a->max_rank) + ", merged at load");
    adapters.push_back({std::move(a), scale});
  }
  model.transformer_weights = std::make_shared<LoraMergedWeights>(model.transformer_weights, std::move(adapters));
}

void add_low_rank_(Tensor& w, const LoraFactor& f, float scale) {
  const int64_t in = w.dim(1), r = f.down.dim(0), rows = f.up.dim(0);
  ZI_ASSERT(w.dtype() == DType::F32 && f.down.dim(1) == in && f.row_offset + rows <= w.dim(0));
  float* W = w.f32() + f.row_offset * in;
  const float* A = f.down.f32();
  const float* B = f.up.f32();
  parallel_for(rows, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t k = 0; k < r; ++k) {
        const float c = scale * B[i * r + k];
        const float* a = A + k * in;
        float* wi = W + i * in;
        for (int64_t j = 0; j < in; ++j) wi[j] += c * a[j];
      }
  });
}

LoraMergedWeights::LoraMergedWeights(std::shared_ptr<WeightSource> base, std::vector<ScaledLora> adapters)
    : base_(std::move(base)), adapters_(std::move(adapters)) {}

Tensor LoraMergedWeights::get(const std::string& name, const Shape& shape) const {
  Tensor w;
  for (const auto& sa : adapters_)
    for (const auto& f : sa.adapter->factors) {
      if (f.target != name) continue;
      if (!w.defined()) w = base_->get(name, shape).to_f32();
      add_low_rank_(w, f, sa.scale);
    }
  return w.defined() ? w : base_->get(name, shape);
}

std::string LoraMergedWeights::describe() const {
  std::string s = base_->describe();
  for (const auto& sa : adapters_) {
    char scale_text[32];
    std::snprintf(scale_text, sizeof scale_text, "%g", double(sa.scale));
    s += " + LoRA " + sa.adapter->name + " x" + scale_text;
  }
  return s;
}

}  // namespace zimage
