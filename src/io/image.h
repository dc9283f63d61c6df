// Image files: PNG (with text chunks), JPEG and WebP, encoded and decoded through libpng, libjpeg-turbo
// and libwebp. Pixels are always 8-bit interleaved RGB; decoding converts whatever the file holds
// (gray, palette, alpha, 16-bit) to that. Decoding treats its input as untrusted: any malformed file is
// an Error(Format), and the pixel count is checked against a limit before any pixel memory is allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace zimage {

enum class ImageFormat { Png, Jpeg, Webp };

// From a file name's extension: .png, .jpg/.jpeg, .webp (case-insensitive); anything else is an
// Error(InvalidArgument) naming the extension and the supported ones.
ImageFormat image_format_from_path(const std::string& path);
const char* image_format_name(ImageFormat format);  // "png", "jpeg", "webp"
// "png", "jpeg"/"jpg", "webp" (case-insensitive), as the HTTP API's output_format; nullopt otherwise.
std::optional<ImageFormat> image_format_from_name(std::string_view name);

// Interleaved RGB, row-major: rgb.size() == height * width * 3.
struct ImageU8 {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

struct EncodeOptions {
  // 1..100, for JPEG and WebP. WebP at 100 is lossless (exact pixels back); PNG is always lossless.
  int quality = 95;
  // PNG text chunks (key, value), e.g. prompt, seed, steps: ASCII values become tEXt, others iTXt
  // (UTF-8). Keys are 1-79 printable ASCII characters. Ignored for JPEG and WebP.
  std::vector<std::pair<std::string, std::string>> text;
};

std::vector<uint8_t> encode_image(const ImageU8& image, ImageFormat format, const EncodeOptions& options = {});
// Format from the extension. Writes a temporary file next to `path` and renames it, so readers never
// see a partial image and a failure leaves nothing behind. OS failures are Error(Io).
void write_image(const std::string& path, const ImageU8& image, const EncodeOptions& options = {});

struct DecodeLimits {
  int64_t max_pixels = 64ll << 20;  // width * height; over it is Error(InvalidArgument)
};

// The format is sniffed from the leading bytes, whatever the file is called. Alpha is dropped (not
// composited); 16-bit samples are rounded to 8 bits; color profiles and gamma are not applied.
ImageU8 decode_image(const uint8_t* data, size_t size, const DecodeLimits& limits = {});
ImageU8 read_image(const std::string& path, const DecodeLimits& limits = {});

// Every tEXt, zTXt and iTXt chunk of a PNG, before or after the pixel data, as UTF-8 (tEXt and zTXt
// hold Latin-1 and are converted). A key repeated keeps its first value. Pixels are not decoded.
std::map<std::string, std::string> read_png_text(const uint8_t* data, size_t size);

// uint8 [H, W, 3] host tensors.
Tensor image_to_tensor(const ImageU8& image);
ImageU8 tensor_to_image(const Tensor& tensor);  // Error(InvalidArgument) on another dtype, shape or device

}  // namespace zimage
