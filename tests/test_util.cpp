#include "test_util.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>

#include "core/error.h"

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

}  // namespace zimage::testing
