// Input: an image file as a user uploads it (PNG, JPEG or WebP, sniffed from its first bytes), decoded
// by decode_image with a pixel limit, and its PNG text chunks read as read_png_text does. A decoded
// image must hold exactly width * height RGB pixels within the limit.
#include <cstdint>
#include <cstring>

#include "fuzz_common.h"
#include "io/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  DecodeLimits limits;
  limits.max_pixels = int64_t(1) << 22;  // 2048x2048: enough for every path, small enough to fuzz fast
  fuzz::expect_clean_errors([&] {
    const ImageU8 image = decode_image(data, size, limits);
    FUZZ_CHECK(image.width > 0 && image.height > 0 && int64_t(image.width) * image.height <= limits.max_pixels);
    FUZZ_CHECK(image.rgb.size() == size_t(image.width) * size_t(image.height) * 3);
  });
  fuzz::expect_clean_errors([&] { read_png_text(data, size); });
  return 0;
}
