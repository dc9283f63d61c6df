#include "test_util.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>

#include "core/error.h"
#include "io/gguf.h"

namespace zimage::testing {

// The compiled-in source-tree paths, unless the environment names others (a build carried to
// another machine runs its tests against that machine's checkout).
static std::string env_or(const char* name, const char* fallback) {
  const char* e = std::getenv(name);
  return e && *e ? e : fallback;
}
std::string golden_path(const std::string& rel) { return env_or("ZIMAGE_GOLDEN_DIR", ZIMAGE_GOLDEN_DIR) + "/" + rel; }
std::string assets_path(const std::string& rel) { return env_or("ZIMAGE_ASSETS", ZIMAGE_ASSETS_DIR) + "/" + rel; }

std::string temp_path(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("zimage_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  ZI_ASSERT(a.numel() == b.numel());
  auto va = a.to_vector(), vb = b.to_vector();
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    double d = std::fabs(double(va[i]) - double(vb[i]));
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

double rel_l2_error(const Tensor& out, const Tensor& ref) {
  ZI_ASSERT(out.numel() == ref.numel());
  auto vo = out.to_vector(), vr = ref.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < vo.size(); ++i) {
    double d = double(vo[i]) - double(vr[i]);
    num += d * d;
    den += double(vr[i]) * double(vr[i]);
  }
  if (std::isnan(num)) return INFINITY;
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

namespace {

class NanWeights final : public WeightSource {
 public:
  NanWeights(std::shared_ptr<WeightSource> inner, std::string name)
      : inner_(std::move(inner)), name_(std::move(name)) {}
  Tensor get(const std::string& name, const Shape& shape) const override {
    Tensor t = inner_->get(name, shape);
    if (name != name_) return t;
    Tensor nan = Tensor::empty(t.shape(), DType::F32);
    std::fill(nan.f32(), nan.f32() + nan.numel(), std::numeric_limits<float>::quiet_NaN());
    return nan.to_dtype(t.dtype());
  }
  bool has(const std::string& name) const override { return inner_->has(name); }
  std::string describe() const override { return inner_->describe() + " (" + name_ + " set to NaN)"; }

 private:
  std::shared_ptr<WeightSource> inner_;
  std::string name_;
};

}  // namespace

std::shared_ptr<WeightSource> with_nan_tensor(std::shared_ptr<WeightSource> inner, const std::string& name) {
  return std::make_shared<NanWeights>(std::move(inner), name);
}

void expect_images_match(const Tensor& out, const Tensor& ref, const std::string& what) {
  ASSERT_EQ(out.shape(), ref.shape()) << what;
  const auto* a = out.data_as<uint8_t>();
  const auto* b = ref.data_as<uint8_t>();
  int64_t off = 0, worst = 0;
  for (int64_t i = 0; i < out.numel(); ++i) {
    const int64_t d = std::abs(int(a[i]) - int(b[i]));
    off += d > 0;
    worst = std::max(worst, d);
  }
  EXPECT_LE(worst, 1) << what;
  EXPECT_LE(double(off) / double(out.numel()), 0.005) << what;
  std::printf("%-18s uint8: %lld of %lld values differ, max %lld\n", what.c_str(), (long long)off,
              (long long)out.numel(), (long long)worst);
}

bool all_finite(const Tensor& t) {
  for (float v : t.to_vector())
    if (!std::isfinite(v)) return false;
  return true;
}

std::vector<std::string> golden_case_names() {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(golden_path("cases"))) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

Tensor stack_golden_items(const SafetensorsFile& f, const std::string& prefix, int64_t n) {
  Tensor first = f.get(prefix + "0");
  int64_t per = first.numel();
  Tensor out = Tensor::empty({n, first.dim(0), first.dim(2), first.dim(3)}, DType::F32);
  for (int64_t j = 0; j < n; ++j) {
    Tensor item = f.get(prefix + std::to_string(j)).to_f32();
    std::copy(item.f32(), item.f32() + per, out.f32() + j * per);
  }
  return out;
}

void expect_error(const std::function<void()>& fn, ErrorKind kind, std::initializer_list<std::string> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected an error of kind " << error_kind_name(kind);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}

namespace {

uint32_t crc32(const uint8_t* p, size_t n) {
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void put_u32(std::vector<uint8_t>& v, uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) v.push_back(uint8_t(x >> s));
}

}  // namespace

// A zlib stream of "stored" (uncompressed) deflate blocks: valid without needing a compressor.
std::vector<uint8_t> zlib_stored(const std::vector<uint8_t>& raw) {
  std::vector<uint8_t> out = {0x78, 0x01};
  size_t pos = 0;
  do {
    const size_t n = std::min<size_t>(raw.size() - pos, 65535);
    out.push_back(pos + n == raw.size() ? 1 : 0);
    out.push_back(uint8_t(n)), out.push_back(uint8_t(n >> 8));
    out.push_back(uint8_t(~n)), out.push_back(uint8_t(~n >> 8));
    out.insert(out.end(), raw.begin() + long(pos), raw.begin() + long(pos + n));
    pos += n;
  } while (pos < raw.size());
  uint32_t a = 1, b = 0;
  for (uint8_t c : raw) a = (a + c) % 65521, b = (b + a) % 65521;
  put_u32(out, (b << 16) | a);
  return out;
}

// `scanlines`: each row prefixed by its filter byte (0, none).
std::vector<uint8_t> make_png(uint32_t width, uint32_t height, uint8_t bit_depth, uint8_t color_type,
                              const std::vector<uint8_t>& scanlines, const std::vector<PngChunk>& before_idat,
                              const std::vector<PngChunk>& after_idat, bool interlaced) {
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  auto add = [&](const PngChunk& c) {
    put_u32(png, uint32_t(c.data.size()));
    const size_t start = png.size();
    png.insert(png.end(), c.type.begin(), c.type.end());
    png.insert(png.end(), c.data.begin(), c.data.end());
    put_u32(png, crc32(&png[start], png.size() - start));
  };
  std::vector<uint8_t> ihdr;
  put_u32(ihdr, width);
  put_u32(ihdr, height);
  ihdr.insert(ihdr.end(), {bit_depth, color_type, 0, 0, uint8_t(interlaced ? 1 : 0)});
  add({"IHDR", ihdr});
  for (const auto& c : before_idat) add(c);
  add({"IDAT", zlib_stored(scanlines)});
  for (const auto& c : after_idat) add(c);
  add({"IEND", {}});
  return png;
}

// Rows of `bpp`-byte pixels, each prefixed by filter byte 0.
std::vector<uint8_t> scanlines(const std::vector<uint8_t>& pixels, int width, int height, int bpp) {
  std::vector<uint8_t> out;
  const size_t stride = size_t(width) * bpp;
  for (size_t y = 0; y < size_t(height); ++y) {
    out.push_back(0);
    for (size_t i = 0; i < stride; ++i) out.push_back(pixels[y * stride + i]);
  }
  return out;
}

std::string form_body(const std::vector<FormField>& fields, const std::string& boundary) {
  std::string body;
  for (const FormField& f : fields) {
    body += "--" + boundary + "\r\nContent-Disposition: form-data; name=\"" + f.name + "\"";
    if (!f.filename.empty()) body += "; filename=\"" + f.filename + "\"";
    body += "\r\n";
    if (!f.content_type.empty()) body += "Content-Type: " + f.content_type + "\r\n";
    body += "\r\n" + f.value + "\r\n";
  }
  return body + "--" + boundary + "--\r\n";
}

GgmlScaleFields ggml_scale_fields(int type) {
  switch (GgmlType(type)) {
    case GgmlType::Q4_1:
    case GgmlType::Q5_1:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K: return {0, 2};
    case GgmlType::Q2_K: return {80, 82};
    case GgmlType::Q3_K: return {108, -1};
    case GgmlType::Q6_K: return {208, -1};
    default: return {0, -1};
  }
}

}  // namespace zimage::testing
