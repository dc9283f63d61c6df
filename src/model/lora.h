// LoRA adapters for the Z-Image DiT: the files trainers write (kohya/musubi, PEFT/diffusers, ai-toolkit,
// ComfyUI-style fused names, dot forms), read into low-rank factors on the DiT's canonical (diffusers)
// weight names, and applied either merged into the weights at load (LoraMergedWeights, a WeightSource
// decorator: packed weights such as QKV, w1|w3 and the stacked adaLN get it for free) or at run time
// per request (model/linear.h).
//
// One LoRA module on a Linear W [out, in]: down A [r, in], up B [out, r], alpha (default r). With the
// adapter's scale s (diffusers' set_adapters), y = W x + s * alpha/r * B (A x), i.e. the merged weight
// W' = W + s * alpha/r * B A. A LoRA on ComfyUI's fused `attention.qkv` [3*dim, in] lands as three
// factors whose B are the row slices 0..dim, dim..2dim, 2dim..3dim (A shared).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"
#include "model/model_source.h"
#include "model/weight_spec.h"
#include "model/weights.h"

namespace zimage {

// One low-rank update of rows [row_offset, row_offset + up.dim(0)) of a canonical weight.
struct LoraFactor {
  std::string target;      // canonical weight name: "layers.0.attention.to_q.weight"
  int64_t row_offset = 0;  // first row of the target that `up` writes (every format today covers whole weights)
  Tensor down;             // A [r, in] float32 (host)
  Tensor up;               // B [rows, r] float32 (host), already multiplied by alpha / r
  std::string module;      // the module's name as the file spells it (for messages)
};

struct LoraAdapter {
  std::string name;  // the file's stem: what a request names
  std::string path;
  std::vector<LoraFactor> factors;
  std::vector<std::string> unmatched;  // keys that map to no weight of the model (reported, never silent)
  std::vector<std::string> ignored;    // keys skipped on purpose, with the reason (duplicates, dora_scale)
  int64_t max_rank = 0;
};

// The weights a LoRA may target: every 2-D "<module>.weight" of `specs` (e.g. ZImageDit::weight_specs).
// Throws Error(Format) for LoKr/LoHa and other LyCORIS kinds, for a module with a down but no up
// matrix (or the reverse), for shapes that do not fit the target (a LoRA for another model size), and
// Error(InvalidArgument) when no key matches anything. Keys that match nothing otherwise are listed in
// `unmatched` and logged as one warning.
LoraAdapter parse_lora(const SafetensorsFile& file, const std::vector<WeightSpec>& specs, const std::string& name);
LoraAdapter load_lora(const std::string& path, const std::vector<WeightSpec>& specs);

// The canonical module a LoRA key names, or "" if none: exposed for the key-mapping tests.
// e.g. "lora_unet_layers_0_attention_to_q.lora_down.weight" -> "layers.0.attention.to_q"
// ("layers.0.attention.qkv" stays fused: it is one module over three weights).
std::string lora_module_for_key(const std::string& key, const std::vector<WeightSpec>& specs);

struct ScaledLora {
  std::shared_ptr<const LoraAdapter> adapter;
  float scale = 1.0f;
};

// `zimage generate --lora FILE[:SCALE]`: "a.safetensors" -> (a.safetensors, 1), "a.safetensors:0.8" -> 0.8.
// A suffix after the last ':' that is not a number stays part of the path.
std::pair<std::string, float> parse_lora_flag(const std::string& flag);

// W' = W + sum_k scale_k * B_k A_k computed in float32 for every weight an adapter touches; the result is
// returned as float32 so the backend rounds it once, to its weight dtype, at upload. Other names pass
// through unchanged.
class LoraMergedWeights final : public WeightSource {
 public:
  LoraMergedWeights(std::shared_ptr<WeightSource> base, std::vector<ScaledLora> adapters);
  Tensor get(const std::string& name, const Shape& shape) const override;
  bool has(const std::string& name) const override { return base_->has(name); }
  std::string describe() const override;
  void prefetch() override { base_->prefetch(); }

 private:
  std::shared_ptr<WeightSource> base_;
  std::vector<ScaledLora> adapters_;
};

// `zimage generate --lora FILE[:SCALE]` (repeatable): the model's DiT weights become
// LoraMergedWeights over the files' adapters (scales add, as diffusers' set_adapters). Nothing to do
// for no flags.
void merge_loras(ModelSource& model, const std::vector<std::string>& flags);

// W [rows, in] (float32, host) += scale * up [rows', r] * down [r, in] on rows [row_offset, row_offset + rows').
void add_low_rank_(Tensor& w, const LoraFactor& f, float scale);

}  // namespace zimage
