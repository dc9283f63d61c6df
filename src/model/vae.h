// The AutoencoderKL that turns Z-Image latents into pixels and back (the Flux VAE: 16 latent channels,
// 8x downscale; diffusers' AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D blocks), written once
// against the Backend ops. Every size comes from vae/config.json, so other AutoencoderKL checkpoints (with
// quant convs, 4 latent channels) load too.
//
// Activations are NHWC on every backend; the checkpoint's conv weights [O, C, kh, kw] are permuted to the
// backend's filter order [O, kh, kw, C] at load time, and each mid-block attention's to_q | to_k | to_v is
// packed into one [3C, C] projection so that one GEMM produces the packed qkv that be.attention takes.
//
//   decoder: z -> (post_quant_conv) -> conv_in -> mid (resnet, attention, resnet)
//              -> up blocks (layers_per_block+1 resnets, then nearest 2x + conv3x3 on all but the last)
//              -> GroupNorm + SiLU -> conv_out
//   encoder: image -> conv_in -> down blocks (layers_per_block resnets, then pad (0,1,0,1) + conv3x3
//              stride 2 on all but the last) -> mid -> GroupNorm + SiLU -> conv_out -> (quant_conv)
//              -> [mean | logvar]
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/config.h"
#include "model/weight_spec.h"
#include "model/weights.h"

namespace zimage {

// vae/config.json, checked: every size positive and bounded, so that nothing computed from it overflows.
struct VaeConfig {
  int64_t in_channels = 3, out_channels = 3, latent_channels = 16, groups = 32, layers_per_block = 2;
  std::vector<int64_t> block_out_channels;
  double scaling_factor = 1.0, shift_factor = 0.0;
  bool mid_block_add_attention = true, use_quant_conv = true, use_post_quant_conv = true;
  static VaeConfig from(const Config& c);
};

class Vae {
 public:
  Vae(Backend& be, const Config& cfg, const WeightSource& ws);
  // Every tensor the constructor loads, as diffusers stores it (conv weights [O, C, kh, kw]).
  static std::vector<WeightSpec> weight_specs(const Config& cfg);

  // latents [B, C_lat, h, w] (activation dtype or f32) in the DiT's latent space:
  // z = latents / scaling_factor + shift_factor, then decode_raw(z).
  Tensor decode(const Tensor& latents);
  // z [B, C_lat, h, w] in the VAE's own latent space (the input of diffusers' `vae.decode`) ->
  // image NHWC [B, h*downscale, w*downscale, out_channels] in [-1, 1] (before postprocessing).
  Tensor decode_raw(const Tensor& z);

  // image NHWC [B, H, W, in_channels] in [-1, 1] (activation dtype or f32), H and W multiples of downscale()
  // -> mean and logvar, each [B, C_lat, H/downscale, W/downscale] (NCHW, unscaled). logvar is clamped to
  // [-30, 20] as in diffusers' DiagonalGaussianDistribution. DiT latents are (mean - shift) * scaling.
  struct Moments {
    Tensor mean, logvar;
  };
  Moments encode(const Tensor& image);

  float scaling_factor() const { return scaling_factor_; }
  float shift_factor() const { return shift_factor_; }
  int downscale() const { return downscale_; }  // 2^(number of blocks - 1): 8 for 4 blocks
  int latent_channels() const { return int(latent_channels_); }

 private:
  struct Conv {
    Tensor w, b;  // w [O, kh, kw, C], b [O]
    Conv2dParams p;
  };
  struct Norm {
    Tensor w, b;  // GroupNorm affine [C]
  };
  // GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus x (through a 1x1 conv when channels change).
  struct Resnet {
    Norm norm1, norm2;
    Conv conv1, conv2;
    std::optional<Conv> shortcut;
  };
  // Single-head self-attention over all pixels of one image, GroupNorm first, residual added.
  struct Attention {
    Norm norm;
    Tensor qkv_w, qkv_b;  // [3C, C], [3C]: to_q | to_k | to_v
    Tensor out_w, out_b;  // [C, C], [C]: to_out.0
  };
  struct MidBlock {
    Resnet first, second;
    std::optional<Attention> attention;  // config mid_block_add_attention
  };
  // One down (encoder) or up (decoder) block: its resnets, then the resampling conv (absent on the last).
  struct Block {
    std::vector<Resnet> resnets;
    std::optional<Conv> resample;
  };
  struct Encoder {
    Conv conv_in;
    std::vector<Block> down;
    MidBlock mid;
    Norm norm_out;
    Conv conv_out;  // -> 2 * C_lat channels: mean | logvar
    std::optional<Conv> quant_conv;
  };
  struct Decoder {
    std::optional<Conv> post_quant_conv;
    Conv conv_in;
    MidBlock mid;
    std::vector<Block> up;
    Norm norm_out;
    Conv conv_out;
  };

  Vae(Backend& be, const VaeConfig& cfg, const WeightSource& ws);
  Conv load_conv(const WeightSource& ws, const std::string& name, int64_t in, int64_t out, int k,
                 const Conv2dParams& p);
  Norm load_norm(const WeightSource& ws, const std::string& name, int64_t c);
  Resnet load_resnet(const WeightSource& ws, const std::string& name, int64_t in, int64_t out);
  Attention load_attention(const WeightSource& ws, const std::string& name, int64_t c);
  MidBlock load_mid(const WeightSource& ws, const std::string& name, int64_t c, bool add_attention);

  Tensor conv(const Conv& c, const Tensor& x);
  Tensor norm(const Norm& n, const Tensor& x, bool silu);
  Tensor resnet(const Resnet& r, const Tensor& x);
  Tensor attention(const Attention& a, const Tensor& x);
  Tensor mid(const MidBlock& m, const Tensor& x);
  Tensor to_activation(const Tensor& x);

  Backend& be_;
  int64_t in_channels_, out_channels_, latent_channels_;
  int groups_;
  int downscale_;
  float scaling_factor_, shift_factor_;
  Encoder encoder_;
  Decoder decoder_;
};

}  // namespace zimage
