// The latents a denoising run starts from, made as diffusers makes them:
//   text to image:  torch.randn of [B, C, h, w] (one draw per noise group).
//   image to image: the VAE posterior's sample of each init image (one draw of the moments' shape),
//                   taken to the DiT's latent space ((z - shift) * scale) and repeated to the batch; then
//                   noise [B, C, h, w] from the same generator; start = scale_noise(init, sigma_begin, noise).
//   inpainting:     the same, plus the mask at latent size and the (init, noise) that the loop blends back
//                   after every step (denoise.h).
// Every rank of a multi-GPU run calls this with the same request, so all start from the same latents.
#pragma once

#include <optional>
#include <vector>

#include "backend/backend.h"
#include "model/vae.h"
#include "pipeline/torch_rng.h"

namespace zimage {

// Images [first, first + count) of a batch start from one torch.randn draw of [count, C, h, w] with
// `seed`: how a batch made of several independent requests keeps each request's images identical to
// the request made alone.
struct NoiseGroup {
  int64_t count = 1;
  uint64_t seed = 0;
};

// What inpainting keeps of the init image: after each step i, latents = (1 - mask) * scale_noise(init,
// sigma_{i+1}, noise) + mask * latents (Backend::flow_match_blend_). All float32 on the backend.
struct InpaintBlend {
  Tensor init;   // [B, C, h, w] the init images' latents, repeated to the batch
  Tensor noise;  // [B, C, h, w] the noise of the start latents
  Tensor mask;   // [B, 1, h, w] 1 = repaint, 0 = keep
};

struct StartLatents {
  Tensor latents;                     // [B, C, h, w] float32 on the backend
  Tensor image_latents;               // image starts: [n_images, C, h, w] the VAE draws in DiT latent space
  std::optional<InpaintBlend> blend;  // inpainting only
};

// Text to image. groups' counts sum to shape[0].
StartLatents noise_start_latents(Backend& be, const Shape& shape, const std::vector<NoiseGroup>& groups,
                                 GeneratorDevice generator);

// Image to image (masks null) or inpainting. pixels: uint8 NHWC [n_images, H, W, 3] (resize_images),
// normalized to [-1, 1] on the backend; masks: float32 [n_masks, 1, H, W] of 0/1 (preprocess_masks). n_images and n_masks
// divide `batch`; item b uses image b % n_images and mask b % n_masks (diffusers repeats the list).
// sigma: the schedule's sigma at the strength cut's begin index. Draws from `gen` in diffusers' order:
// the posterior's sample, then the noise.
StartLatents image_start_latents(Backend& be, Vae& vae, const Tensor& pixels, const Tensor* masks, int64_t batch,
                                 float sigma, TorchGenerator& gen);

// The VAE draw of each image in DiT latent space: (mean + std * eps - shift) * scale, eps drawn from
// `gen` with the moments' shape. images: NHWC [n, H, W, 3] in [-1, 1] on the backend. [n, C, H/8, W/8]
// float32 on the backend.
Tensor sample_image_latents(Backend& be, Vae& vae, const Tensor& images, TorchGenerator& gen);

// diffusers' retrieve_latents(sample_mode="argmax"): the posterior's mode (its mean) of each image, in
// DiT latent space: (mean - shift) * scale. images NHWC in [-1, 1] on the backend; [n, C, H/8, W/8] f32.
Tensor image_latents_argmax(Backend& be, Vae& vae, const Tensor& images);

// diffusers' masked-image latents: the images with the repainted pixels zeroed, encoded: a draw from
// `gen` (its inpainting pipeline makes one after the start latents, a third draw, but its loop never
// reads it, so the inpainting here skips it), or with gen null the mode (ControlNet inpainting).
Tensor masked_image_latents(Backend& be, Vae& vae, const Tensor& pixels, const Tensor& masks, TorchGenerator* gen);

// The ControlNet's input [1, in_channels, h, w] f32 on the backend, as diffusers' ControlNet pipelines
// make it: the control image's mode latents; for a 2C+1-channel (v2) ControlNet then the mask at latent
// size (1 - mask, nearest: 1 = keep) and the masked image's mode latents (inpainting: pixels and masks
// given, one each), or zeros in their place (text to image). control, pixels: uint8 NHWC [1, H, W, 3]
// (resize_images); masks: f32 [1, 1, H, W] (preprocess_masks).
Tensor control_latents(Backend& be, Vae& vae, const Tensor& control, int64_t in_channels, const Tensor* pixels,
                       const Tensor* masks);

}  // namespace zimage
