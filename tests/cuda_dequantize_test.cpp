// Backend::dequantize on CUDA against its reference, dequantize_on_host: every GGUF block format and FP8
// (e4m3, e5m2; no scale, one per tensor, one per row) on random blocks. The reference's float32 values are
// products (and sums) of exactly representable numbers computed in the same order, and the kernel rounds
// each to bf16 once, ties to even, as f32_to_bf16 does: the results are equal bit for bit (NaN codes of
// FP8 as NaN). Skips where there is no GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "backend/backend.h"
#include "core/dtype.h"
#include "io/gguf.h"
#include "test_util.h"

using namespace zimage;

namespace {

// Random blocks of `type` whose fp16 scales (and mins) are finite: every other byte random.
StoredWeight random_blocks(GgmlType type, int64_t rows, int64_t cols, std::mt19937& rng) {
  int64_t be = 0, bb = 0;
  EXPECT_TRUE(ggml_block_layout(uint32_t(type), &be, &bb));
  StoredWeight w;
  w.shape = {rows, cols};
  w.ggml_type = uint32_t(type);
  w.data = Tensor::empty({rows, cols / be * bb}, DType::U8);
  uint8_t* p = w.data.data_as<uint8_t>();
  for (size_t i = 0; i < w.data.nbytes(); ++i) p[i] = uint8_t(rng());
  const auto [d_at, m_at] = zimage::testing::ggml_scale_fields(int(type));
  for (int64_t b = 0; b < rows * cols / be; ++b) {
    const uint16_t d = f32_to_f16(std::ldexp(float(rng() % 2000) - 1000, -14));
    const uint16_t m = f32_to_f16(std::ldexp(float(rng() % 2000) - 1000, -16));
    std::memcpy(p + b * bb + d_at, &d, 2);
    if (m_at >= 0) std::memcpy(p + b * bb + m_at, &m, 2);
  }
  return w;
}

class CudaDequantize : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0)
      GTEST_SKIP() << "no CUDA GPU on this machine: the dequantize kernels run on the device";
    gpu_ = make_cuda_backend(0);
  }
  // CUDA's bf16 values against the reference's float32 values rounded to bf16; returns the count compared.
  void expect_exact(const StoredWeight& host, const std::string& what) {
    StoredWeight dev = host;
    dev.data = gpu_->upload(host.data, host.data.dtype());
    if (host.scale.defined()) dev.scale = gpu_->upload(host.scale, DType::F32);
    const Tensor got = gpu_->to_host_f32(gpu_->dequantize(dev));
    const Tensor ref = dequantize_on_host(host);
    ASSERT_EQ(got.shape(), ref.shape()) << what;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      const float want = bf16_to_f32(f32_to_bf16(ref.f32()[i])), have = got.f32()[i];
      if (std::isnan(want))
        ASSERT_TRUE(std::isnan(have)) << what << " value " << i;
      else
        ASSERT_EQ(std::memcmp(&want, &have, 4), 0) << what << " value " << i << ": " << have << " vs " << want;
    }
  }
  std::unique_ptr<Backend> gpu_;
};

}  // namespace

TEST_F(CudaDequantize, EveryGgufBlockFormatIsTheReferenceBitForBit) {
  std::mt19937 rng(19);
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K,
                     GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K})
    expect_exact(random_blocks(t, 37, 1024, rng), ggml_type_name(uint32_t(t)));
}

TEST_F(CudaDequantize, Fp8TimesScaleIsTheReferenceBitForBit) {
  std::mt19937 rng(8);
  for (DType dt : {DType::F8E4M3, DType::F8E5M2})
    for (int scales : {0, 1, 2}) {          // none, per tensor, per row
      const int64_t rows = 29, cols = 170;  // 4930 values: not a multiple of 8, the kernel's tail too
      StoredWeight w;
      w.shape = {rows, cols};
      w.data = Tensor::empty(w.shape, dt);
      for (int64_t i = 0; i < rows * cols; ++i) w.data.data_as<uint8_t>()[i] = uint8_t(i % 256 == 0 ? rng() : i % 256);
      if (scales) {
        const int64_t n = scales == 1 ? 1 : rows;
        w.scale = Tensor::empty({n}, DType::F32);
        for (int64_t r = 0; r < n; ++r) w.scale.f32()[r] = std::ldexp(float(rng() % 1000 + 1), -int(rng() % 20));
      }
      expect_exact(w,
                   std::string(dtype_name(dt)) + " with " + std::to_string(scales ? w.scale.numel() : 0) + " scales");
    }
}
