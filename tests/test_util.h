// Shared helpers for the tests: golden data paths and numeric comparisons.
#pragma once

#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "io/safetensors.h"
#include "model/weights.h"

namespace zimage::testing {

std::string golden_path(const std::string& rel);  // tests/golden/<rel>
std::string assets_path(const std::string& rel);  // assets/<rel>
std::string temp_path(const std::string& name);   // a fresh path under the test temp folder

double max_abs_diff(const Tensor& a, const Tensor& b);  // any float dtypes, same numel
double rel_l2_error(const Tensor& out, const Tensor& ref);  // ‖out − ref‖ / ‖ref‖
// uint8 images as the golden tolerance allows: at most 1 level off on at most 0.5% of values (prints them).
void expect_images_match(const Tensor& out, const Tensor& ref, const std::string& what);
bool all_finite(const Tensor& t);

// Expects fn() to throw an Error of `kind` whose message contains every fragment (a GoogleTest failure otherwise).
void expect_error(const std::function<void()>& fn, ErrorKind kind, std::initializer_list<std::string> fragments);

// The weights of `inner` with every value of tensor `name` NaN: a damaged checkpoint.
std::shared_ptr<WeightSource> with_nan_tensor(std::shared_ptr<WeightSource> inner, const std::string& name);

// The golden pipeline cases (folder names under tests/golden/cases), sorted.
std::vector<std::string> golden_case_names();
// The recorded per-item DiT tensors <prefix><j> [16, 1, h, w] stacked into [n, 16, h, w] float32.
Tensor stack_golden_items(const SafetensorsFile& f, const std::string& prefix, int64_t n);

// Hand-assembled PNG files, for layouts the engine's encoder never writes (gray, alpha, palette,
// 16-bit, interlaced): zlib "stored" blocks, so no compressor is needed.
struct PngChunk {
  std::string type;
  std::vector<uint8_t> data;
};
// A zlib stream of "stored" (uncompressed) deflate blocks.
std::vector<uint8_t> zlib_stored(const std::vector<uint8_t>& raw);
// `scanlines`: each row prefixed by its filter byte (scanlines() below).
std::vector<uint8_t> make_png(uint32_t width, uint32_t height, uint8_t bit_depth, uint8_t color_type,
                              const std::vector<uint8_t>& scanlines, const std::vector<PngChunk>& before_idat = {},
                              const std::vector<PngChunk>& after_idat = {}, bool interlaced = false);
// Rows of `bpp`-byte pixels, each prefixed by filter byte 0.
std::vector<uint8_t> scanlines(const std::vector<uint8_t>& pixels, int width, int height, int bpp);

// Where a ggml block of `type` keeps its fp16 scale d and min m (byte offsets; m -1: none): what tests that
// make random blocks must set to finite values.
struct GgmlScaleFields {
  int d = 0, m = -1;
};
GgmlScaleFields ggml_scale_fields(int type);

// A multipart/form-data body as a client writes it (POST /v1/images/edits).
inline const std::string kFormBoundary = "----zimageBoundary7MA4YWxkTrZu0gW";
inline const std::string kFormType = "multipart/form-data; boundary=" + kFormBoundary;
struct FormField {
  FormField(std::string n, std::string v, std::string file = "", std::string type = "")
      : name(std::move(n)), value(std::move(v)), filename(std::move(file)), content_type(std::move(type)) {}
  std::string name, value, filename, content_type;
};
std::string form_body(const std::vector<FormField>& fields, const std::string& boundary = kFormBoundary);

}  // namespace zimage::testing
