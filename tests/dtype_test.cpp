#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/dtype.h"
#include "core/tensor.h"

using namespace zimage;

static uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DType, Bf16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = bf16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_bf16(f), h) << h;
  }
}

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to the even mantissa (1.0).
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808000u)), 0x3f80u);
  // 1.0078125 + half step: halfway between 0x3f81 and 0x3f82 -> even 0x3f82.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f818000u)), 0x3f82u);
  // Just above halfway rounds up.
  EXPECT_EQ(f32_to_bf16(from_bits(0x3f808001u)), 0x3f81u);
  EXPECT_EQ(f32_to_bf16(-1.5f), 0xbfc0u);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80u);
  // The largest float rounds to infinity in bf16, as in PyTorch.
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80u);
}

TEST(DType, F16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), h) << h;
  }
}

TEST(DType, F16KnownValues) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00u);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bffu);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00u);  // halfway to the next binade: rounds to inf
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bffu);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001u);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000u);  // halfway to it: ties to even (0)
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002u);  // 1.5 ulp: ties to even (2)
  // 1 + 2^-11 is halfway between 1.0 and the next f16: even -> 1.0.
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00u);
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02u);
  EXPECT_FLOAT_EQ(f16_to_f32(0xc000u), -2.0f);
}

TEST(DType, F8E4M3RoundTripsAndSaturates) {
  for (uint32_t v = 0; v < 256; ++v) {
    float f = f8e4m3_to_f32(uint8_t(v));
    if (std::isnan(f)) continue;
    if (f == 0 && v == 0x80) continue;  // -0 keeps its sign bit
    ASSERT_EQ(f32_to_f8e4m3(f), v) << v << " " << f;
  }
  EXPECT_FLOAT_EQ(f8e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(f32_to_f8e4m3(1000.0f), 0x7e);
  EXPECT_EQ(f32_to_f8e4m3(-1000.0f), 0xfe);
  EXPECT_FLOAT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(f32_to_f8e4m3(1.0625f), 0x38);  // halfway between 1.0 and 1.125: even (1.0)
  EXPECT_EQ(f32_to_f8e4m3(1.1875f), 0x3a);  // halfway between 1.125 and 1.25: even (1.25)
}

TEST(Tensor, ReshapeNarrowAndConvert) {
  Tensor t = Tensor::from_f32({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor r = t.reshape({3, -1});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  Tensor n = r.narrow0(1, 2);
  EXPECT_EQ(n.to_vector(), (std::vector<float>{3, 4, 5, 6}));
  Tensor b = t.to_dtype(DType::BF16);
  EXPECT_EQ(b.dtype(), DType::BF16);
  EXPECT_EQ(b.to_vector(), t.to_vector());
  EXPECT_EQ(bits(b.to_f32().f32()[5]), bits(6.0f));
}
