#include "model/fp8_linears.h"

#include "core/error.h"
#include "model/zimage_controlnet.h"

namespace zimage {

std::vector<std::string> Fp8Policy::default_keep_bf16() {
  return {"t_embedder.*", "cap_embedder.*", "*x_embedder.*", "*adaLN_modulation.*", "all_final_layer.*"};
}

Fp8Policy Fp8Policy::parse(const std::string& flag) {
  Fp8Policy p;
  p.keep_bf16.clear();
  size_t start = 0;
  while (start <= flag.size()) {
    const size_t comma = std::min(flag.find(',', start), flag.size());
    const std::string item = flag.substr(start, comma - start);
    start = comma + 1;
    if (item == "default") {
      for (auto& d : default_keep_bf16()) p.keep_bf16.push_back(d);
    } else if (item == "none") {
      ZI_CHECK(flag == "none", ErrorKind::InvalidArgument, "--fp8-keep-bf16 " + flag + ": 'none' goes alone");
    } else {
      ZI_CHECK(!item.empty(), ErrorKind::InvalidArgument,
               "--fp8-keep-bf16 '" + flag + "': an empty pattern (patterns are separated by single commas)");
      p.keep_bf16.push_back(item);
    }
  }
  return p;
}

bool glob_match(const std::string& pattern, const std::string& name) {
  // Greedy with backtracking to the last '*': linear in practice for these short names.
  size_t p = 0, n = 0, star = std::string::npos, resume = 0;
  while (n < name.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = n;
    } else if (p < pattern.size() && pattern[p] == name[n]) {
      ++p;
      ++n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

bool Fp8Policy::keeps_bf16(const std::string& weight_name) const {
  for (const auto& pattern : keep_bf16)
    if (glob_match(pattern, weight_name)) return true;
  return false;
}

bool Fp8Policy::fp8(const std::string& weight_name, const Shape& shape) const {
  return shape.size() == 2 && shape[0] % 16 == 0 && shape[1] % 16 == 0 && !keeps_bf16(weight_name);
}

Fp8LinearWeights::Fp8LinearWeights(std::shared_ptr<WeightSource> base, Fp8Policy policy)
    : base_(std::move(base)), policy_(std::move(policy)) {}

std::string Fp8LinearWeights::describe() const { return base_->describe() + " (FP8 linears)"; }

std::optional<StoredWeight> Fp8LinearWeights::quantized(const std::string& name, const Shape& shape) const {
  std::optional<StoredWeight> stored = base_->quantized(name, shape);
  if (!policy_.fp8(name, shape)) return stored;
  if (stored && stored->data.dtype() == DType::F8E4M3) {  // the checkpoint's codes, its scale given to every row
    const int64_t rows = shape[0];
    StoredWeight w;
    w.shape = shape;
    w.data = stored->data;
    w.scale = Tensor::empty({rows}, DType::F32);
    const Tensor s = stored->scale.defined() ? stored->scale.to_f32() : Tensor();
    ZI_CHECK(!s.defined() || s.numel() == 1 || s.numel() == rows, ErrorKind::Format,
             name + ": an FP8 scale of " + std::to_string(s.numel()) + " values for " + std::to_string(rows) + " rows");
    for (int64_t r = 0; r < rows; ++r) w.scale.f32()[r] = !s.defined() ? 1.0f : s.f32()[s.numel() == 1 ? 0 : r];
    return w;
  }
  return quantize_fp8_weight(stored ? dequantize_on_host(*stored) : base_->get(name, shape).to_f32());
}

void use_fp8_linears(ModelSource& model, const Fp8Policy& policy) {
  model.transformer_weights = std::make_shared<Fp8LinearWeights>(model.transformer_weights, policy);
  if (model.controlnet) {
    auto cn = std::make_shared<ControlNetSource>(*model.controlnet);
    cn->weights = std::make_shared<Fp8LinearWeights>(cn->weights, policy);
    model.controlnet = std::move(cn);
  }
}

}  // namespace zimage
