// Qwen3 decoder as Z-Image's text encoder (transformers' Qwen3Model): token embeddings, N layers of
// [RMSNorm -> attention with per-head q/k RMSNorm, half-split RoPE, GQA, causal + key padding mask ->
// residual; RMSNorm -> SwiGLU MLP -> residual], final RMSNorm. Z-Image takes hidden_states[-2], the
// output of the second-to-last layer, so the last layer never runs in `encode`.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "io/config.h"
#include "model/weight_spec.h"
#include "model/weights.h"

namespace zimage {

struct Qwen3Config {
  int64_t hidden = 0, intermediate = 0, layers = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  double rms_eps = 1e-6, rope_theta = 1e6;
  static Qwen3Config from(const Config& c);
};

// A Qwen3ForCausalLM checkpoint (the real Z-Image-Turbo's text_encoder) stores the weights below under
// this prefix ("model.layers.0..."); a Qwen3Model one (as diffusers saves the golden model) without it.
inline constexpr char kQwen3CausalLmPrefix[] = "model.";

class Qwen3TextEncoder {
 public:
  // stream_layers: keep only the embeddings and the final norm on the backend and upload each layer's
  // weights while encoding (the low-memory mode: 7.5 GB less device memory at full size, for ~8 GB of
  // host-to-device copies per encode: 0.33 s on an H200 host from the page cache). `ws` must then outlive the encoder.
  Qwen3TextEncoder(Backend& be, const Config& cfg, const WeightSource& ws, bool stream_layers = false);
  const Qwen3Config& config() const { return cfg_; }
  // Every tensor the constructor loads, named as in a Qwen3Model checkpoint (`layers.3.mlp.up_proj.weight`).
  static std::vector<WeightSpec> weight_specs(const Config& cfg);

  // input_ids [B, L] int64 (host); lengths[b] real tokens of row b (the rest is padding, masked).
  // Returns the hidden states after `num_layers` layers, [B, L, hidden] on the backend; when
  // num_layers == all layers, the final norm is applied (as transformers' last hidden state).
  Tensor forward(const Tensor& input_ids, const std::vector<int64_t>& lengths, int64_t num_layers);

  // Z-Image's prompt embeddings: hidden_states[-2] with padding removed, one [len_b, hidden] per prompt.
  std::vector<Tensor> encode(const Tensor& input_ids, const std::vector<int64_t>& lengths);

  // Replay the layers of a prompt shape (batch, tokens, lengths) seen before as a recorded graph
  // (Backend::make_graph; not with streamed layers, whose uploads cannot be recorded).
  void set_graphs(bool on) { graphs_on_ = on && !stream_layers_; }

 private:
  struct Layer {
    Tensor input_norm, qkv, q_norm, k_norm, o_proj, post_norm, gate_up, down;
  };
  Layer load_layer(int64_t i) const;
  // The device work of forward(): token ids [B*L] int32 and RoPE tables on the backend.
  Tensor run_layers(const Tensor& ids, const Tensor& cos, const Tensor& sin, int64_t b, int64_t l,
                    const std::vector<int>& key_len, int64_t num_layers);

  Backend& be_;
  Qwen3Config cfg_;
  const WeightSource& ws_;
  bool stream_layers_;
  Tensor embed_, final_norm_;
  std::vector<Layer> layers_;  // empty when streamed
  // Recorded forwards by (batch, tokens, layers, lengths); each holds a few MB.
  bool graphs_on_ = false;
  GraphCache graphs_{8};
};

}  // namespace zimage
