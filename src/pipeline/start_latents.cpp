#include "pipeline/start_latents.h"

#include <algorithm>

#include "core/error.h"
#include "pipeline/image_processor.h"

namespace zimage {

namespace {

// Rows b of the batch take item b % n of x [n, ...] (diffusers' torch.cat([x] * (batch // n))).
Tensor repeat_to_batch(Backend& be, const Tensor& x, int64_t batch) {
  const int64_t n = x.dim(0);
  if (n == batch) return x;
  std::vector<int32_t> idx(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) idx[size_t(b)] = int32_t(b % n);
  Shape s = x.shape();
  s[0] = batch;
  return be.gather_rows(x.reshape({n, x.numel() / n}), idx).reshape(s);
}

// Bytes [n, H, W, 3] (resize_images) -> the VAE's input in [-1, 1] on the backend.
Tensor device_images(Backend& be, const Tensor& pixels) {
  ZI_ASSERT(pixels.ndim() == 4 && pixels.dtype() == DType::U8);
  return be.u8_to_image(be.upload(pixels, DType::U8));
}

}  // namespace

StartLatents noise_start_latents(Backend& be, const Shape& shape, const std::vector<NoiseGroup>& groups,
                                 GeneratorDevice generator) {
  Tensor noise = Tensor::empty(shape, DType::F32);
  int64_t filled = 0;
  for (const auto& g : groups) {
    Shape part_shape = shape;
    part_shape[0] = g.count;
    Tensor part = torch_randn(part_shape, g.seed, generator);
    ZI_ASSERT(filled + part.numel() <= noise.numel());
    std::copy(part.f32(), part.f32() + part.numel(), noise.f32() + filled);
    filled += part.numel();
  }
  ZI_ASSERT(filled == noise.numel());
  StartLatents s;
  s.latents = be.upload(noise, DType::F32);
  return s;
}

Tensor sample_image_latents(Backend& be, Vae& vae, const Tensor& images, TorchGenerator& gen) {
  Vae::Moments m = vae.encode(images);
  Tensor eps = be.upload(gen.randn(m.mean.shape()), DType::F32);
  return be.gaussian_sample(m.mean, m.logvar, eps, vae.shift_factor(), vae.scaling_factor());
}

StartLatents image_start_latents(Backend& be, Vae& vae, const Tensor& pixels, const Tensor* masks, int64_t batch,
                                 float sigma, TorchGenerator& gen) {
  ZI_ASSERT(pixels.ndim() == 4 && batch % pixels.dim(0) == 0);
  StartLatents s;
  s.image_latents = sample_image_latents(be, vae, device_images(be, pixels), gen);
  Tensor init = repeat_to_batch(be, s.image_latents, batch);
  Shape shape = init.shape();
  Tensor noise = be.upload(gen.randn(shape), DType::F32);
  s.latents = be.empty(shape, DType::F32);
  be.flow_match_blend_(s.latents, init, noise, nullptr, sigma);  // scale_noise(init, sigma, noise)
  if (masks) {
    ZI_ASSERT(masks->ndim() == 4 && batch % masks->dim(0) == 0);
    Tensor small = downsample_mask_nearest(*masks, int(shape[2]), int(shape[3]));
    s.blend = InpaintBlend{init, noise, repeat_to_batch(be, be.upload(small, DType::F32), batch)};
  }
  return s;
}

Tensor image_latents_argmax(Backend& be, Vae& vae, const Tensor& images) {
  Vae::Moments m = vae.encode(images);
  // eps = 0: mean + std * 0 is the mean exactly (the encoder clamps logvar, so std is finite).
  const Tensor zero = be.upload(Tensor::zeros(m.mean.shape(), DType::F32), DType::F32);
  return be.gaussian_sample(m.mean, m.logvar, zero, vae.shift_factor(), vae.scaling_factor());
}

Tensor masked_image_latents(Backend& be, Vae& vae, const Tensor& pixels, const Tensor& masks, TorchGenerator* gen) {
  // Zeroed in [-1, 1] space (0 is no byte value), on the host: once per request, not per step.
  const Tensor images = be.to_host_f32(device_images(be, pixels));
  const Tensor masked = be.upload(mask_out_images(images, masks));
  return gen ? sample_image_latents(be, vae, masked, *gen) : image_latents_argmax(be, vae, masked);
}

Tensor control_latents(Backend& be, Vae& vae, const Tensor& control, int64_t in_channels, const Tensor* pixels,
                       const Tensor* masks) {
  ZI_ASSERT(control.ndim() == 4 && control.dim(0) == 1 && (pixels == nullptr) == (masks == nullptr));
  Tensor latents = image_latents_argmax(be, vae, device_images(be, control));
  const int64_t c = latents.dim(1), h = latents.dim(2), w = latents.dim(3);
  if (in_channels == c) return latents;
  ZI_ASSERT(in_channels == 2 * c + 1);
  // Channels are the outer dimension of one item: [c, h*w] row blocks stack along rows.
  Tensor rest;
  if (pixels) {
    ZI_ASSERT(pixels->dim(0) == 1 && masks->dim(0) == 1);
    const Tensor small = downsample_mask_nearest(*masks, int(h), int(w));
    Tensor keep = Tensor::empty({1, h * w}, DType::F32);
    for (int64_t i = 0; i < h * w; ++i) keep.f32()[i] = 1.0f - small.f32()[i];  // 1 = keep
    const Tensor masked = masked_image_latents(be, vae, *pixels, *masks, nullptr);
    rest = be.concat_rows(be.upload(keep, DType::F32), masked.reshape({c, h * w}));
  } else {
    rest = be.upload(Tensor::zeros({c + 1, h * w}, DType::F32), DType::F32);
  }
  return be.concat_rows(latents.reshape({c, h * w}), rest).reshape({1, in_channels, h, w});
}

}  // namespace zimage
