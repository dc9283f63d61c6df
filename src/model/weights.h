// Where a model's weights come from: a safetensors checkpoint (one file or sharded), or the built-in
// synthetic generator that makes deterministic random weights of any requested shape (so the whole
// pipeline runs and benchmarks at full size without downloading a checkpoint).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "backend/backend.h"
#include "core/tensor.h"
#include "io/safetensors.h"

namespace zimage {

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // The host tensor `name`; an Error naming the tensor if it is missing or its shape is not `shape`.
  virtual Tensor get(const std::string& name, const Shape& shape) const = 0;
  virtual bool has(const std::string& name) const = 0;
  // The weight `name` as stored when the file keeps it quantized (FP8 with its scale, GGUF blocks), checked
  // against `shape`: what a backend keeps in memory and dequantizes per layer (model/linear.h). nullopt
  // for any other weight, which get() serves.
  virtual std::optional<StoredWeight> quantized(const std::string&, const Shape&) const { return std::nullopt; }
  // The linear whose weight is `name` runs as a W8A8 FP8 GEMM (--quantization fp8, model/fp8_linears.h):
  // quantized() then serves that weight as e4m3 with one float32 scale per row.
  virtual bool fp8_linear(const std::string&, const Shape&) const { return false; }
  virtual std::string describe() const = 0;
  // Starts bringing every weight into memory in the background and returns at once, so that the gets
  // of a model load that follows find them ready (see Checkpoint::prefetch). Nothing to do by default.
  virtual void prefetch() {}
};

class CheckpointWeights final : public WeightSource {
 public:
  // `prefix` is put before every name asked for: a Qwen3ForCausalLM checkpoint keeps the text
  // encoder's tensors under "model.".
  explicit CheckpointWeights(Checkpoint ckpt, std::string prefix = "")
      : ckpt_(std::move(ckpt)), prefix_(std::move(prefix)) {}
  Tensor get(const std::string& name, const Shape& shape) const override;
  bool has(const std::string& name) const override { return ckpt_.has(prefix_ + name); }
  std::string describe() const override { return ckpt_.description(); }
  void prefetch() override { ckpt_.prefetch(); }

 private:
  Checkpoint ckpt_;
  std::string prefix_;
};

// Deterministic bf16 weights: the value stream depends only on (seed, tensor name), so every run and
// every backend sees the same model. Scales keep activations in range through deep stacks:
// matrices ~ N(0, 1/fan_in), norm weights 1, biases ~ N(0, 0.02^2), embeddings and pad tokens ~ N(0, 1).
class SyntheticWeights final : public WeightSource {
 public:
  SyntheticWeights(uint64_t seed, std::string label) : seed_(seed), label_(std::move(label)) {}
  Tensor get(const std::string& name, const Shape& shape) const override;
  bool has(const std::string&) const override { return true; }
  std::string describe() const override { return label_; }

 private:
  uint64_t seed_;
  std::string label_;
};

}  // namespace zimage
