// diffusers' VaeImageProcessor as Z-Image's image-to-image and inpainting pipelines use it, on decoded
// 8-bit RGB images (io/image.h converts gray, palette and alpha to RGB as PIL's convert("RGB") does:
// gray replicated, alpha dropped):
//   image: resize to the requested size (PIL's Image.resize with LANCZOS; skipped at the same size),
//          /255, then 2x - 1: float32 in [-1, 1] (that last step on the device: Backend::u8_to_image).
//   mask:  resize the same way, convert to luminance as PIL's convert("L") does, /255, then binarize
//          (< 0.5 -> 0, else 1): 1 = repaint. Then nearest-neighbour down to the latent size, as
//          torch.nn.functional.interpolate(mode="nearest").
#pragma once

#include <vector>

#include "core/tensor.h"
#include "io/image.h"

namespace zimage {

// PIL's Image.resize((width, height), Image.LANCZOS) of an 8-bit RGB image: separable, horizontal pass
// first, fixed-point coefficients (22 fraction bits), each pass rounded and clipped to uint8.
ImageU8 resize_lanczos(const ImageU8& image, int width, int height);

// Images -> uint8 NHWC [n, height, width, 3] at the requested size.
Tensor resize_images(const std::vector<ImageU8>& images, int height, int width);
// Masks -> float32 [n, 1, height, width] of 0 and 1 (1 = repaint).
Tensor preprocess_masks(const std::vector<ImageU8>& masks, int height, int width);
// [n, 1, H, W] -> [n, 1, h, w]: nearest neighbour, source index floor(i * (H / h)) in float32 (torch).
Tensor downsample_mask_nearest(const Tensor& mask, int h, int w);
// diffusers' `init_image * (mask < 0.5)`: images NHWC [n_img, H, W, 3], masks [n_mask, 1, H, W], one of
// n_img and n_mask dividing the other -> [max(n_img, n_mask), H, W, 3] (repainted pixels set to 0).
Tensor mask_out_images(const Tensor& images, const Tensor& masks);

}  // namespace zimage
