#include "model/vae.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/weight_loading.h"

namespace zimage {

namespace {

// Every GroupNorm of the VAE (resnets, attention, conv_norm_out) uses this epsilon (diffusers: resnet_eps).
constexpr float kNormEps = 1e-6f;
// diffusers' DiagonalGaussianDistribution clamps logvar to this range before using it.
constexpr float kLogvarMin = -30.0f, kLogvarMax = 20.0f;

// The checkpoint's conv weight [O, C, kh, kw] (PyTorch order) -> [O, kh, kw, C] (NHWC filter order), f32 host.
Tensor oihw_to_ohwi(const Tensor& w) {
  int64_t o = w.dim(0), c = w.dim(1), kh = w.dim(2), kw = w.dim(3);
  Tensor out = Tensor::empty({o, kh, kw, c}, DType::F32);
  const float* src = w.f32();
  float* dst = out.f32();
  for (int64_t oc = 0; oc < o; ++oc)
    for (int64_t ic = 0; ic < c; ++ic)
      for (int64_t y = 0; y < kh; ++y)
        for (int64_t x = 0; x < kw; ++x)
          dst[((oc * kh + y) * kw + x) * c + ic] = src[((oc * c + ic) * kh + y) * kw + x];
  return out;
}

// A list of block types must name only `supported`, one per entry of block_out_channels.
void check_block_types(const Config& cfg, const std::string& key, const char* supported, size_t blocks) {
  if (!cfg.has(key)) return;
  const auto& types = cfg.json()[key];
  ZI_CHECK(types.is_array() && types.size() == blocks, ErrorKind::Format,
           cfg.where() + ": '" + key + "' must list one block per entry of block_out_channels");
  for (const auto& t : types)
    ZI_CHECK(t.is_string() && t.get<std::string>() == supported, ErrorKind::Format,
             cfg.where() + ": '" + key + "' entry " + t.dump() + " is not supported (only " + supported + ")");
}

// Far above any VAE's width, small enough that products of sizes cannot overflow.
constexpr int64_t kMaxChannels = int64_t(1) << 20;
// 2^(blocks - 1) is the downscale factor: 8 blocks already downscale 128x.
constexpr size_t kMaxBlocks = 8;

}  // namespace

VaeConfig VaeConfig::from(const Config& cfg) {
  VaeConfig c;
  c.in_channels = cfg.integer_in("in_channels", 1, kMaxChannels);
  c.out_channels = cfg.integer_in("out_channels", 1, kMaxChannels);
  c.latent_channels = cfg.integer_in("latent_channels", 1, kMaxChannels);
  c.groups = cfg.integer_in("norm_num_groups", 1, kMaxChannels);
  c.layers_per_block = cfg.integer_in("layers_per_block", 1, 64);
  c.scaling_factor = cfg.number("scaling_factor");
  // SD-style VAEs have no shift (null or absent): 0.
  c.shift_factor = cfg.number_or("shift_factor", 0.0);
  c.block_out_channels = cfg.integers("block_out_channels");
  const auto& ch = c.block_out_channels;
  ZI_CHECK(!ch.empty() && ch.size() <= kMaxBlocks, ErrorKind::Format,
           cfg.where() + ": block_out_channels must list 1 to " + std::to_string(kMaxBlocks) + " blocks");
  for (int64_t n : ch)
    ZI_CHECK(n > 0 && n <= kMaxChannels && n % c.groups == 0, ErrorKind::Format,
             cfg.where() + ": block channels " + std::to_string(n) + " not a positive multiple of norm_num_groups " +
                 std::to_string(c.groups));
  if (cfg.has("act_fn"))
    ZI_CHECK(cfg.string("act_fn") == "silu", ErrorKind::Format, cfg.where() + ": only act_fn \"silu\" is supported");
  // float: the factors are applied in float32.
  ZI_CHECK(std::isfinite(float(c.scaling_factor)) && float(c.scaling_factor) != 0.0f, ErrorKind::Format,
           cfg.where() + ": scaling_factor must be a finite non-zero number");
  ZI_CHECK(std::isfinite(float(c.shift_factor)), ErrorKind::Format, cfg.where() + ": shift_factor must be finite");
  check_block_types(cfg, "down_block_types", "DownEncoderBlock2D", ch.size());
  check_block_types(cfg, "up_block_types", "UpDecoderBlock2D", ch.size());
  // diffusers' defaults when the keys are absent (older SD checkpoints): quant convs and attention on.
  c.mid_block_add_attention = cfg.boolean_or("mid_block_add_attention", true);
  c.use_quant_conv = cfg.boolean_or("use_quant_conv", true);
  c.use_post_quant_conv = cfg.boolean_or("use_post_quant_conv", true);
  return c;
}

Vae::Vae(Backend& be, const Config& cfg, const WeightSource& ws) : Vae(be, VaeConfig::from(cfg), ws) {}

Vae::Vae(Backend& be, const VaeConfig& cfg, const WeightSource& ws)
    : be_(be),
      in_channels_(cfg.in_channels),
      out_channels_(cfg.out_channels),
      latent_channels_(cfg.latent_channels),
      groups_(int(cfg.groups)),
      scaling_factor_(float(cfg.scaling_factor)),
      shift_factor_(float(cfg.shift_factor)) {
  const std::vector<int64_t>& ch = cfg.block_out_channels;
  const int64_t layers = cfg.layers_per_block;
  const bool add_attention = cfg.mid_block_add_attention, quant = cfg.use_quant_conv,
             post_quant = cfg.use_post_quant_conv;
  size_t nblocks = ch.size();
  downscale_ = 1 << (nblocks - 1);
  const Conv2dParams same3 = Conv2dParams::same(3), same1 = Conv2dParams::same(1);
  // Downsample2D with padding 0: F.pad(x, (0, 1, 0, 1)) (right and bottom) then a 3x3 stride-2 conv.
  const Conv2dParams down3{2, 0, 1, 0, 1};

  // Encoder: block i maps ch[i-1] -> ch[i] (block 0 starts from ch[0], the output of conv_in).
  encoder_.conv_in = load_conv(ws, "encoder.conv_in", in_channels_, ch[0], 3, same3);
  for (size_t i = 0; i < nblocks; ++i) {
    std::string name = "encoder.down_blocks." + std::to_string(i);
    Block b;
    int64_t in = i == 0 ? ch[0] : ch[i - 1];
    for (int64_t j = 0; j < layers; ++j)
      b.resnets.push_back(load_resnet(ws, name + ".resnets." + std::to_string(j), j == 0 ? in : ch[i], ch[i]));
    if (i + 1 < nblocks) b.resample = load_conv(ws, name + ".downsamplers.0.conv", ch[i], ch[i], 3, down3);
    encoder_.down.push_back(std::move(b));
  }
  encoder_.mid = load_mid(ws, "encoder.mid_block", ch.back(), add_attention);
  encoder_.norm_out = load_norm(ws, "encoder.conv_norm_out", ch.back());
  encoder_.conv_out = load_conv(ws, "encoder.conv_out", ch.back(), 2 * latent_channels_, 3, same3);
  if (quant) encoder_.quant_conv = load_conv(ws, "quant_conv", 2 * latent_channels_, 2 * latent_channels_, 1, same1);

  // Decoder: the channels reversed; up block i maps rev[i-1] -> rev[i] with layers_per_block + 1 resnets.
  std::vector<int64_t> rev(ch.rbegin(), ch.rend());
  if (post_quant)
    decoder_.post_quant_conv = load_conv(ws, "post_quant_conv", latent_channels_, latent_channels_, 1, same1);
  decoder_.conv_in = load_conv(ws, "decoder.conv_in", latent_channels_, rev[0], 3, same3);
  decoder_.mid = load_mid(ws, "decoder.mid_block", rev[0], add_attention);
  for (size_t i = 0; i < nblocks; ++i) {
    std::string name = "decoder.up_blocks." + std::to_string(i);
    Block b;
    int64_t in = i == 0 ? rev[0] : rev[i - 1];
    for (int64_t j = 0; j <= layers; ++j)
      b.resnets.push_back(load_resnet(ws, name + ".resnets." + std::to_string(j), j == 0 ? in : rev[i], rev[i]));
    if (i + 1 < nblocks) b.resample = load_conv(ws, name + ".upsamplers.0.conv", rev[i], rev[i], 3, same3);
    decoder_.up.push_back(std::move(b));
  }
  decoder_.norm_out = load_norm(ws, "decoder.conv_norm_out", ch[0]);
  decoder_.conv_out = load_conv(ws, "decoder.conv_out", ch[0], out_channels_, 3, same3);
}

std::vector<WeightSpec> Vae::weight_specs(const Config& config) {
  const VaeConfig cfg = VaeConfig::from(config);
  const std::vector<int64_t>& ch = cfg.block_out_channels;
  const std::vector<int64_t> rev(ch.rbegin(), ch.rend());
  const int64_t layers = cfg.layers_per_block, latent = cfg.latent_channels;
  const size_t nblocks = ch.size();
  std::vector<WeightSpec> s;
  auto conv = [&](const std::string& name, int64_t in, int64_t out, int64_t k) {
    s.push_back({name + ".weight", {out, in, k, k}});
    s.push_back({name + ".bias", {out}});
  };
  auto norm = [&](const std::string& name, int64_t c) {
    s.push_back({name + ".weight", {c}});
    s.push_back({name + ".bias", {c}});
  };
  auto resnet = [&](const std::string& name, int64_t in, int64_t out) {
    norm(name + ".norm1", in);
    conv(name + ".conv1", in, out, 3);
    norm(name + ".norm2", out);
    conv(name + ".conv2", out, out, 3);
    if (in != out) conv(name + ".conv_shortcut", in, out, 1);
  };
  auto mid = [&](const std::string& name, int64_t c) {
    resnet(name + ".resnets.0", c, c);
    if (cfg.mid_block_add_attention) {
      const std::string a = name + ".attentions.0";
      norm(a + ".group_norm", c);
      for (const char* p : {".to_q", ".to_k", ".to_v"}) s.push_back({a + p + ".weight", {c, c}});
      for (const char* p : {".to_q", ".to_k", ".to_v"}) s.push_back({a + p + ".bias", {c}});
      s.push_back({a + ".to_out.0.weight", {c, c}});
      s.push_back({a + ".to_out.0.bias", {c}});
    }
    resnet(name + ".resnets.1", c, c);
  };
  conv("encoder.conv_in", cfg.in_channels, ch[0], 3);
  for (size_t i = 0; i < nblocks; ++i) {
    const std::string name = "encoder.down_blocks." + std::to_string(i);
    const int64_t in = i == 0 ? ch[0] : ch[i - 1];
    for (int64_t j = 0; j < layers; ++j) resnet(name + ".resnets." + std::to_string(j), j == 0 ? in : ch[i], ch[i]);
    if (i + 1 < nblocks) conv(name + ".downsamplers.0.conv", ch[i], ch[i], 3);
  }
  mid("encoder.mid_block", ch.back());
  norm("encoder.conv_norm_out", ch.back());
  conv("encoder.conv_out", ch.back(), 2 * latent, 3);
  if (cfg.use_quant_conv) conv("quant_conv", 2 * latent, 2 * latent, 1);
  if (cfg.use_post_quant_conv) conv("post_quant_conv", latent, latent, 1);
  conv("decoder.conv_in", latent, rev[0], 3);
  mid("decoder.mid_block", rev[0]);
  for (size_t i = 0; i < nblocks; ++i) {
    const std::string name = "decoder.up_blocks." + std::to_string(i);
    const int64_t in = i == 0 ? rev[0] : rev[i - 1];
    for (int64_t j = 0; j <= layers; ++j) resnet(name + ".resnets." + std::to_string(j), j == 0 ? in : rev[i], rev[i]);
    if (i + 1 < nblocks) conv(name + ".upsamplers.0.conv", rev[i], rev[i], 3);
  }
  norm("decoder.conv_norm_out", ch[0]);
  conv("decoder.conv_out", ch[0], cfg.out_channels, 3);
  return s;
}

// ---- loading ----

Vae::Conv Vae::load_conv(const WeightSource& ws, const std::string& name, int64_t in, int64_t out, int k,
                         const Conv2dParams& p) {
  Tensor w = host_f32(ws, name + ".weight", {out, in, k, k});
  return {be_.upload(oihw_to_ohwi(w)), load_weight(be_, ws, name + ".bias", {out}), p};
}

Vae::Norm Vae::load_norm(const WeightSource& ws, const std::string& name, int64_t c) {
  return {load_weight(be_, ws, name + ".weight", {c}), load_weight(be_, ws, name + ".bias", {c})};
}

Vae::Resnet Vae::load_resnet(const WeightSource& ws, const std::string& name, int64_t in, int64_t out) {
  Resnet r;
  r.norm1 = load_norm(ws, name + ".norm1", in);
  r.conv1 = load_conv(ws, name + ".conv1", in, out, 3, Conv2dParams::same(3));
  r.norm2 = load_norm(ws, name + ".norm2", out);
  r.conv2 = load_conv(ws, name + ".conv2", out, out, 3, Conv2dParams::same(3));
  if (in != out) r.shortcut = load_conv(ws, name + ".conv_shortcut", in, out, 1, Conv2dParams::same(1));
  return r;
}

Vae::Attention Vae::load_attention(const WeightSource& ws, const std::string& name, int64_t c) {
  Attention a;
  a.norm = load_norm(ws, name + ".group_norm", c);
  a.qkv_w = load_packed_rows(be_, ws, {name + ".to_q.weight", name + ".to_k.weight", name + ".to_v.weight"},
                             {{c, c}, {c, c}, {c, c}});
  Tensor bias = Tensor::empty({3 * c}, DType::F32);  // b_q | b_k | b_v
  for (int i = 0; i < 3; ++i) {
    Tensor part = host_f32(ws, name + (i == 0 ? ".to_q" : i == 1 ? ".to_k" : ".to_v") + ".bias", {c});
    std::copy_n(part.f32(), c, bias.f32() + i * c);
  }
  a.qkv_b = be_.upload(bias);
  a.out_w = load_weight(be_, ws, name + ".to_out.0.weight", {c, c});
  a.out_b = load_weight(be_, ws, name + ".to_out.0.bias", {c});
  return a;
}

Vae::MidBlock Vae::load_mid(const WeightSource& ws, const std::string& name, int64_t c, bool add_attention) {
  MidBlock m;
  m.first = load_resnet(ws, name + ".resnets.0", c, c);
  if (add_attention) m.attention = load_attention(ws, name + ".attentions.0", c);
  m.second = load_resnet(ws, name + ".resnets.1", c, c);
  return m;
}

// ---- layers (x is NHWC [N, H, W, C] throughout) ----

Tensor Vae::conv(const Conv& c, const Tensor& x) { return be_.conv2d(x, c.w, &c.b, c.p); }

Tensor Vae::norm(const Norm& n, const Tensor& x, bool silu) {
  return be_.group_norm(x, n.w, n.b, groups_, kNormEps, silu);
}

Tensor Vae::resnet(const Resnet& r, const Tensor& x) {
  Tensor h = conv(r.conv1, norm(r.norm1, x, true));
  h = conv(r.conv2, norm(r.norm2, h, true));           // dropout is the identity at inference
  be_.add_(h, r.shortcut ? conv(*r.shortcut, x) : x);  // output_scale_factor is 1 in the VAE
  return h;
}

Tensor Vae::attention(const Attention& a, const Tensor& x) {
  int64_t n = x.dim(0), hw = x.dim(1) * x.dim(2), c = x.dim(3);
  Tensor h = norm(a.norm, x, false).reshape({n, hw, c});
  Tensor qkv = be_.linear(h, a.qkv_w, &a.qkv_b);  // [N, HW, 3C]
  // One head of width C over all HW pixels of each image (no padding: every key is valid).
  Tensor o = be_.attention(qkv, 1, 1, int(c), float(1.0 / std::sqrt(double(c))), false,
                           std::vector<int>(size_t(n), int(hw)));  // [N, HW, C]
  Tensor y = be_.linear(o, a.out_w, &a.out_b).reshape(x.shape());
  be_.add_(y, x);  // residual_connection; rescale_output_factor is 1
  return y;
}

Tensor Vae::mid(const MidBlock& m, const Tensor& x) {
  Tensor h = resnet(m.first, x);
  if (m.attention) h = attention(*m.attention, h);
  return resnet(m.second, h);
}

Tensor Vae::to_activation(const Tensor& x) {
  return x.dtype() == be_.activation_dtype() ? x : be_.cast(x, be_.activation_dtype());
}

// ---- decode / encode ----

Tensor Vae::decode(const Tensor& latents) {
  // As the pipeline does it: cast to the VAE's dtype first, then latents / scaling_factor + shift_factor.
  return decode_raw(be_.scale_shift(to_activation(latents), 1.0f / scaling_factor_, shift_factor_));
}

Tensor Vae::decode_raw(const Tensor& z) {
  ZI_CHECK(
      z.ndim() == 4 && z.dim(1) == latent_channels_, ErrorKind::InvalidArgument,
      "vae decode: latents must be [B, " + std::to_string(latent_channels_) + ", h, w], got " + shape_str(z.shape()));
  Tensor x = be_.nchw_to_nhwc(to_activation(z));  // [B, h, w, C_lat]
  if (decoder_.post_quant_conv) x = conv(*decoder_.post_quant_conv, x);
  x = conv(decoder_.conv_in, x);
  x = mid(decoder_.mid, x);
  for (const Block& b : decoder_.up) {
    for (const Resnet& r : b.resnets) x = resnet(r, x);
    if (b.resample) x = conv(*b.resample, be_.upsample_nearest2x(x));
  }
  return conv(decoder_.conv_out, norm(decoder_.norm_out, x, true));  // [B, 8h, 8w, out_channels]
}

Vae::Moments Vae::encode(const Tensor& image) {
  ZI_CHECK(image.ndim() == 4 && image.dim(3) == in_channels_, ErrorKind::InvalidArgument,
           "vae encode: image must be NHWC [B, H, W, " + std::to_string(in_channels_) + "], got " +
               shape_str(image.shape()));
  ZI_CHECK(image.dim(1) % downscale_ == 0 && image.dim(2) % downscale_ == 0, ErrorKind::InvalidArgument,
           "vae encode: image size " + std::to_string(image.dim(2)) + "x" + std::to_string(image.dim(1)) +
               " is not a multiple of " + std::to_string(downscale_));
  Tensor x = conv(encoder_.conv_in, to_activation(image));
  for (const Block& b : encoder_.down) {
    for (const Resnet& r : b.resnets) x = resnet(r, x);
    if (b.resample) x = conv(*b.resample, x);
  }
  x = mid(encoder_.mid, x);
  x = conv(encoder_.conv_out, norm(encoder_.norm_out, x, true));  // [B, h, w, 2 * C_lat]
  if (encoder_.quant_conv) x = conv(*encoder_.quant_conv, x);

  Moments m;
  m.mean = be_.nhwc_to_nchw(be_.slice_cols(x, 0, latent_channels_));
  m.logvar = be_.clamp(be_.nhwc_to_nchw(be_.slice_cols(x, latent_channels_, latent_channels_)), kLogvarMin, kLogvarMax);
  return m;
}

}  // namespace zimage
