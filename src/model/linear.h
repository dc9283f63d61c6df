// The one linear function every projection of the DiT calls (DESIGN.md §2): y = x W^T (+ bias), plus,
// per batch item, the low-rank adapters of that item's request: y_i += B (A x_i). The base weights never
// change, so requests with different adapters (or none) share one model and one batch.
//
// A Linear may hold several canonical weights packed along rows (to_q|to_k|to_v, w1|w3, every
// modulated block's adaLN): an adapter set takes A stacked over all its factors [R, in] and B [out, R]
// with each factor's up matrix (times its scale and alpha/r) in its weight's rows and its own columns,
// block-diagonal for packed weights, so B A = sum_k s_k B_k A_k and one GEMM pair serves every part.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/lora.h"
#include "model/weights.h"

namespace zimage {

struct Linear {
  Tensor w;             // [out, in] on the device in the activation dtype, or undefined when `stored` holds it
  StoredWeight stored;  // a quantized weight (FP8 and its scale, GGUF blocks) on the device, as the file stores
                        // it: apply() dequantizes it into a buffer that lives for its GEMM only
  Tensor bias;          // [out] on the device, or undefined
  // A W8A8 FP8 linear (WeightSource::fp8_linear): `stored` holds e4m3 codes with a float32 scale per row, and
  // apply() quantizes x per row and runs Backend::linear_fp8.
  bool fp8 = false;
  // The canonical weights packed into w in row order, and their rows: where a LoRA factor lands.
  std::vector<std::string> parts;
  std::vector<int64_t> part_rows;
  const Tensor* bias_or_null() const { return bias.defined() ? &bias : nullptr; }
  int64_t out_features() const { return w.defined() ? w.dim(0) : stored.shape[0]; }
  int64_t in_features() const { return w.defined() ? w.dim(1) : stored.shape[1]; }
};

// One weight (optionally with its bias) or several stacked along rows, as load_weight / load_packed_rows.
// Weights the source keeps quantized (WeightSource::quantized) stay so on the device; packed ones when
// every part has the same form (one GGUF block type, or FP8 of one kind: their scales become one per row),
// else the packed weight is dequantized at load.
Linear load_linear(Backend& be, const WeightSource& ws, const std::string& name, const Shape& shape,
                   const std::string& bias_name = "");
Linear load_packed_linear(Backend& be, const WeightSource& ws, const std::vector<std::string>& names,
                          const std::vector<Shape>& shapes);

// The adapters and scales of one request, prepared on the device for a set of Linears.
class LoraSet {
 public:
  struct LowRank {
    Tensor a;  // [R, in]
    Tensor b;  // [out, R]
  };
  LoraSet(Backend& be, const std::vector<ScaledLora>& adapters, const std::vector<const Linear*>& linears);
  const LowRank* find(const Linear& l) const;
  const std::vector<ScaledLora>& adapters() const { return adapters_; }
  int64_t bytes() const { return bytes_; }  // device memory held

 private:
  std::vector<ScaledLora> adapters_;
  std::map<const Linear*, LowRank> low_rank_;
  int64_t bytes_ = 0;
};

// The adapters of images [first, first + count) of a batch (as NoiseGroup): one request's "lora" field.
struct LoraGroup {
  int64_t count = 1;
  std::vector<ScaledLora> adapters;  // empty: none
};

// Per batch item, the adapter set of its request (null: none).
struct LoraBatch {
  std::vector<std::shared_ptr<const LoraSet>> items;
  bool any() const;
};

// The input of a linear as its producer wrote it: activations x, or, for an FP8 linear, e4m3 rows with their
// scales written by the producer itself (Backend's *_fp8 ops: a norm or SwiGLU that quantizes its output in
// the same pass, so the activations are never written in the activation dtype).
struct LinearInput {
  Tensor x;
  Backend::Fp8Rows q;
};
// Whether l takes e4m3 rows from its producer: an FP8 linear with no adapter in the batch (adapters multiply
// the activations themselves).
bool takes_fp8_rows(const Linear& l, const LoraBatch* lora);
// The producer's output for l: fp8() when l takes e4m3 rows, else plain().
template <class Plain, class Fp8>
LinearInput input_for(const Linear& l, const LoraBatch* lora, Plain plain, Fp8 fp8) {
  if (takes_fp8_rows(l, lora)) return {Tensor(), fp8()};
  return {plain(), {}};
}

// y = x W^T + bias (W dequantized right before the GEMM when it is stored quantized; an FP8 linear quantizes
// x per row instead and multiplies in e4m3), and for each item i
// with an adapter set, y_i += B (A x_i). x [rows, in] or [n, L, in] with the items' rows contiguous in item
// order: item_rows[i] rows each when given, else L rows each for [n, L, in] and one row each for
// [rows, in]. Consecutive items with the same set run as one GEMM pair. A batch whose size is half the
// call's items applies to both halves (a CFG call: [positives | negatives]).
Tensor apply(Backend& be, const Linear& l, const Tensor& x, const LoraBatch* lora = nullptr,
             const std::vector<int64_t>* item_rows = nullptr);
// The same from a producer's output (input_for).
Tensor apply(Backend& be, const Linear& l, const LinearInput& in, const LoraBatch* lora = nullptr,
             const std::vector<int64_t>* item_rows = nullptr);

}  // namespace zimage
