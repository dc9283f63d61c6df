// Checkpoint layouts (../shared/docs/DESIGN.md §1): each layout is a table from the names a file stores
// to the canonical (diffusers / transformers) names the models ask for; one detector picks the table
// from the keys (never from the file name), and one WeightSource decorator serves canonical names.
//   diffusers DiT / VAE, transformers Qwen3: the canonical names themselves (Qwen3 with or without "model.").
//   llama_cpp_qwen3: a GGUF text encoder with llama.cpp's names (token_embd, blk.N.attn_q, ffn_gate, ...;
//     Qwen3's rotary embedding is NeoX-style, so llama.cpp stores q/k unpermuted and only names change).
//   comfy_dit: ComfyUI / original Z-Image names (optionally under "model.diffusion_model."): fused
//     attention.qkv served as row slices to_q | to_k | to_v, attention.out, q_norm / k_norm,
//     x_embedder, final_layer; norm_final.weight is not used by the model and ignored.
//   bfl_vae: the original BFL / LDM autoencoder (ae.safetensors): encoder.down.N.block.M, nin_shortcut,
//     mid.block_1/2, mid.attn_1.{norm,q,k,v,proj_out} (1x1 convolutions served as matrices),
//     decoder.up.N numbered from the lowest resolution up (diffusers' up_blocks run the other way), norm_out.
// Stored FP8 weights (float8_e4m3fn / e5m2) and GGUF blocks are served dequantized by get() (FP8: value x
// scale in float32, the scale found as <module>.weight_scale or <module>.scale_weight) and as stored by
// quantized(); a file that carries scales (a <module>.comfy_quant entry, a `_quantization_metadata` header
// entry, ComfyUI's `scaled_fp8` marker) must carry one for every FP8 weight.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/config.h"
#include "model/weights.h"
#include "model/weights/stored_tensors.h"

namespace zimage {

enum class ModelPart { DiT, TextEncoder, Vae };
const char* model_part_name(ModelPart p);  // "diffusion model", "text encoder", "VAE"

enum class LayoutKind { DiffusersDit, ComfyDit, DiffusersVae, BflVae, Qwen3, LlamaCppQwen3 };

struct DetectedLayout {
  ModelPart part;
  LayoutKind kind;
  std::string prefix;  // put before every stored name ("model.diffusion_model.", "model.", "")
  const char* name;    // "comfy_dit", ...
};

// The layout of `file` from its tensor names; Format error naming the file when no table fits.
DetectedLayout detect_layout(const StoredTensors& file);

// A weight as the file stores it (backend.h's StoredWeight: FP8 with the scale that travels with it, f32
// [1] or [rows]; GGUF blocks with their ggml type) is what stored_weight() hands out and a backend that
// keeps quantized weights in memory uploads. dequantize(): a plain weight as stored, a quantized one as
// dequantize_on_host's float32 values (FP8 value x scale, exact: it rounds once; ggml's block dequantization).
Tensor dequantize(const StoredWeight& w);

// Serves canonical names from a file of any layout: get() is dequantize(stored_weight()).
class LayoutWeights final : public WeightSource {
 public:
  LayoutWeights(std::shared_ptr<StoredTensors> file, DetectedLayout layout);
  Tensor get(const std::string& name, const Shape& shape) const override;
  std::optional<StoredWeight> quantized(const std::string& name, const Shape& shape) const override;
  bool has(const std::string& name) const override { return map_.count(name) != 0; }
  std::string describe() const override;
  void prefetch() override { file_->prefetch(); }

  const DetectedLayout& layout() const { return layout_; }
  std::vector<std::string> canonical_names() const;
  Shape shape(const std::string& canonical) const;  // as served
  // The weight behind `canonical` as stored, row slice and reshape applied, its scale validated (GGUF
  // blocks as blocks, any other tensor in its stored dtype).
  StoredWeight stored_weight(const std::string& canonical) const;
  // The stored tensor behind `canonical` (for tests and messages).
  std::string stored_name(const std::string& canonical) const;

 private:
  struct Source {
    std::string stored;
    int64_t row_begin = 0, rows = -1;  // a row slice of a fused tensor; -1: all rows
    bool squeeze = false;              // [O, C, 1, 1] served as [O, C]
  };
  StoredWeight read_stored(const std::string& stored) const;
  std::shared_ptr<StoredTensors> file_;
  DetectedLayout layout_;
  std::map<std::string, Source> map_;
  bool scaled_ = false;          // the file carries FP8 scales: every FP8 weight needs one
  nlohmann::json quantization_;  // the `_quantization_metadata` header entry's "layers" (module -> format)
};

// comfy_dit's table read backwards, for writing ComfyUI files: the ComfyUI name (no prefix) of canonical
// DiT tensor `canonical`, and in *qkv_part which third of the fused attention.qkv it is (-1: not fused).
std::string comfy_dit_name(const std::string& canonical, int* qkv_part);

// The component config a single file implies, from its tensors' shapes (what is not in the shapes is
// Z-Image's: patch 2, RoPE axes head_dim x [1/4, 3/8, 3/8], Flux VAE scaling / shift, Qwen3 eps and theta).
Config infer_component_config(const LayoutWeights& w, const std::string& where);

}  // namespace zimage
