// --quantization fp8: the DiT's linears (its blocks, refiners and a ControlNet's blocks) as W8A8 FP8 e4m3
// GEMMs (Backend::linear_fp8), the weights quantized once at load with one scale per output channel, or
// taken from an FP8 checkpoint with its scales. Which linears stay bf16 is data (Fp8Policy), matched
// against the canonical (diffusers) weight names; the models never learn which linears are FP8.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "model/model_source.h"
#include "model/weights.h"

namespace zimage {

struct Fp8Policy {
  // Patterns over canonical weight names ('*' matches any run of characters, nothing else is special):
  // a linear with a weight that matches one stays bf16 (a packed linear: any of its parts).
  std::vector<std::string> keep_bf16 = default_keep_bf16();

  // The embedders (time, caption, patches, a ControlNet's patches), every adaLN modulation and the final
  // layer: small GEMMs (a few rows, or a patch of 64 features) where FP8 saves no time, and the inputs and
  // outputs of the network, where its error is not averaged away by the blocks.
  static std::vector<std::string> default_keep_bf16();
  // "--fp8-keep-bf16": comma-separated patterns; "default" names the defaults, "none" keeps no linear bf16.
  static Fp8Policy parse(const std::string& flag);
  bool keeps_bf16(const std::string& weight_name) const;
  // The linear runs in FP8: not kept bf16, and a weight [N, K] with N and K multiples of 16 (cuBLASLt's FP8
  // GEMM needs 16-aligned operands; the real model's are, the tiny test model's FFN is not).
  bool fp8(const std::string& weight_name, const Shape& shape) const;
};

// '*' glob: the whole of `name` matches `pattern`.
bool glob_match(const std::string& pattern, const std::string& name);

// A WeightSource that serves the FP8 linears' weights as e4m3 with a float32 scale per row: the base's
// e4m3 codes and scales when it stores them so (ComfyUI's scaled FP8), else the base's values quantized per
// row (quantize_fp8_row). Everything else is the base's.
class Fp8LinearWeights final : public WeightSource {
 public:
  Fp8LinearWeights(std::shared_ptr<WeightSource> base, Fp8Policy policy);
  Tensor get(const std::string& name, const Shape& shape) const override { return base_->get(name, shape); }
  bool has(const std::string& name) const override { return base_->has(name); }
  std::optional<StoredWeight> quantized(const std::string& name, const Shape& shape) const override;
  bool fp8_linear(const std::string& name, const Shape& shape) const override { return policy_.fp8(name, shape); }
  std::string describe() const override;
  void prefetch() override { base_->prefetch(); }

 private:
  std::shared_ptr<WeightSource> base_;
  Fp8Policy policy_;
};

// The model's DiT and ControlNet served through Fp8LinearWeights.
void use_fp8_linears(ModelSource& model, const Fp8Policy& policy);

}  // namespace zimage
