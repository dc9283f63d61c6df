#include "pipeline/image_processor.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"
#include "core/parallel.h"

namespace zimage {

namespace {

// Pillow's Resample.c: Lanczos-3 (a sinc windowed by a 3x wider sinc), coefficients per output pixel.
double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= std::numbers::pi;
  return std::sin(x) / x;
}
double lanczos(double x) { return -3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3.0) : 0.0; }

constexpr int kPrecisionBits = 32 - 8 - 2;

// For each output pixel: the first input pixel it reads, how many, and their fixed-point weights.
struct Coefficients {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> k;  // [out, ksize]
};

Coefficients precompute_coefficients(int in_size, int out_size) {
  const double scale = double(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 3.0 * filterscale;
  Coefficients c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.first.resize(size_t(out_size));
  c.count.resize(size_t(out_size));
  c.k.assign(size_t(out_size) * size_t(c.ksize), 0);
  std::vector<double> w(size_t(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5), xmax = int(center + support + 0.5);
    xmin = std::max(xmin, 0);
    xmax = std::min(xmax, in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[size_t(x)] = lanczos((x + xmin - center + 0.5) * ss);
      ww += w[size_t(x)];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[size_t(x)] / ww : w[size_t(x)];
      c.k[size_t(xx) * size_t(c.ksize) + size_t(x)] =
          int32_t(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    c.first[size_t(xx)] = xmin;
    c.count[size_t(xx)] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) { return uint8_t(std::clamp(v >> kPrecisionBits, 0, 255)); }

// One pass along x (horizontal) or y (vertical) of an interleaved RGB image.
ImageU8 resample_pass(const ImageU8& in, int out_size, bool horizontal) {
  const int in_size = horizontal ? in.width : in.height;
  const Coefficients c = precompute_coefficients(in_size, out_size);
  ImageU8 out;
  out.width = horizontal ? out_size : in.width;
  out.height = horizontal ? in.height : out_size;
  out.rgb.resize(size_t(out.width) * size_t(out.height) * 3);
  // Rows in parallel (a photo of 12 Mpixels to 1024^2 is ~0.5 G multiply-adds).
  parallel_for(out.height, 8, [&](int64_t y0, int64_t y1) {
    for (int y = int(y0); y < int(y1); ++y)
      for (int x = 0; x < out.width; ++x) {
        const int o = horizontal ? x : y;
        const int32_t* k = &c.k[size_t(o) * size_t(c.ksize)];
        for (int ch = 0; ch < 3; ++ch) {
          int32_t ss = 1 << (kPrecisionBits - 1);
          for (int j = 0; j < c.count[size_t(o)]; ++j) {
            const int sx = horizontal ? c.first[size_t(o)] + j : x, sy = horizontal ? y : c.first[size_t(o)] + j;
            ss += int32_t(in.rgb[(size_t(sy) * size_t(in.width) + size_t(sx)) * 3 + size_t(ch)]) * k[j];
          }
          out.rgb[(size_t(y) * size_t(out.width) + size_t(x)) * 3 + size_t(ch)] = clip8(ss);
        }
      }
  });
  return out;
}

void check_image(const ImageU8& image, const char* what) {
  ZI_CHECK(image.width > 0 && image.height > 0 && image.rgb.size() == size_t(image.width) * size_t(image.height) * 3,
           ErrorKind::InvalidArgument, std::string(what) + " is empty or malformed");
}

}  // namespace

ImageU8 resize_lanczos(const ImageU8& image, int width, int height) {
  check_image(image, "the image to resize");
  ZI_CHECK(width > 0 && height > 0, ErrorKind::InvalidArgument, "resize: the target size must be positive");
  ImageU8 out = image;
  if (width != image.width) out = resample_pass(out, width, true);
  if (height != image.height) out = resample_pass(out, height, false);
  return out;
}

Tensor resize_images(const std::vector<ImageU8>& images, int height, int width) {
  Tensor out = Tensor::empty({int64_t(images.size()), height, width, 3}, DType::U8);
  auto* p = out.data_as<uint8_t>();
  for (const ImageU8& image : images) {
    check_image(image, "an init image");
    const ImageU8 sized = image.width == width && image.height == height ? image : resize_lanczos(image, width, height);
    p = std::copy(sized.rgb.begin(), sized.rgb.end(), p);
  }
  return out;
}

Tensor preprocess_masks(const std::vector<ImageU8>& masks, int height, int width) {
  Tensor out = Tensor::empty({int64_t(masks.size()), 1, height, width}, DType::F32);
  float* p = out.f32();
  for (const ImageU8& mask : masks) {
    check_image(mask, "a mask");
    const ImageU8 resized = resize_lanczos(mask, width, height);
    for (size_t i = 0; i < resized.rgb.size(); i += 3) {
      // PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 (exact for gray: the weights sum to 2^16).
      const uint32_t l = (uint32_t(resized.rgb[i]) * 19595u + uint32_t(resized.rgb[i + 1]) * 38470u +
                          uint32_t(resized.rgb[i + 2]) * 7471u + 0x8000u) >>
                         16;
      *p++ = float(l) / 255.0f < 0.5f ? 0.0f : 1.0f;
    }
  }
  return out;
}

Tensor downsample_mask_nearest(const Tensor& mask, int h, int w) {
  ZI_ASSERT(mask.ndim() == 4 && mask.dim(1) == 1 && mask.dtype() == DType::F32);
  const int64_t n = mask.dim(0), in_h = mask.dim(2), in_w = mask.dim(3);
  // torch's nearest: index = min(floor(out_index * scale), in - 1) with scale = in / out in float32.
  auto source = [](int64_t i, int64_t in, int64_t out) {
    const float scale = float(in) / float(out);
    return std::min(int64_t(std::floor(float(i) * scale)), in - 1);
  };
  Tensor out = Tensor::empty({n, 1, h, w}, DType::F32);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        out.f32()[(b * h + y) * w + x] = mask.f32()[(b * in_h + source(y, in_h, h)) * in_w + source(x, in_w, w)];
  return out;
}

Tensor mask_out_images(const Tensor& images, const Tensor& masks) {
  ZI_ASSERT(images.ndim() == 4 && masks.ndim() == 4 && images.dim(1) == masks.dim(2) && images.dim(2) == masks.dim(3));
  const int64_t ni = images.dim(0), nm = masks.dim(0), n = std::max(ni, nm), hw = images.dim(1) * images.dim(2);
  ZI_CHECK(n % ni == 0 && n % nm == 0, ErrorKind::InvalidArgument,
           std::to_string(nm) + " masks do not broadcast over " + std::to_string(ni) + " images");
  Tensor out = Tensor::empty({n, images.dim(1), images.dim(2), 3}, DType::F32);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t p = 0; p < hw; ++p) {
      const float keep = masks.f32()[(b % nm) * hw + p] < 0.5f ? 1.0f : 0.0f;
      for (int64_t c = 0; c < 3; ++c)
        out.f32()[(b * hw + p) * 3 + c] = images.f32()[((b % ni) * hw + p) * 3 + c] * keep;
    }
  return out;
}

}  // namespace zimage
