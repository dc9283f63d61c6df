#include "pipeline/torch_rng.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>

#include "io/safetensors.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_path;

namespace {

// The golden draws: F32 heads and tails, F64 sums.
class GoldenRng {
 public:
  std::vector<float> f32(const std::string& name) const { return file_->get(name).to_vector(); }
  double f64(const std::string& name) const {
    Tensor t = file_->get(name);
    EXPECT_EQ(t.dtype(), DType::F64) << name;
    return t.data_as<double>()[0];
  }

 private:
  std::shared_ptr<SafetensorsFile> file_ = SafetensorsFile::open(golden_path("torch_rng.safetensors"));
};

struct Diff {
  double max_abs = 0;
  int bit_exact = 0;
};

Diff compare(const float* ours, const std::vector<float>& ref) {
  Diff d;
  for (size_t i = 0; i < ref.size(); ++i) {
    d.max_abs = std::max(d.max_abs, double(std::fabs(ours[i] - ref[i])));
    d.bit_exact += std::memcmp(&ours[i], &ref[i], 4) == 0;
  }
  return d;
}

// torch_rng.safetensors holds, per generator device and seed, two draws made one after the other from one
// generator: [1,16,8,8] straight after manual_seed, then [1,16,128,128].
const Shape kGoldenShapes[] = {{1, 16, 8, 8}, {1, 16, 128, 128}};

std::string golden_prefix(const char* device, uint64_t seed, const Shape& shape) {
  std::string prefix = std::string(device) + ".seed" + std::to_string(seed);
  for (size_t i = 0; i < shape.size(); ++i) {
    prefix += i ? 'x' : '.';
    prefix += std::to_string(shape[i]);
  }
  return prefix;
}

// Compares one draw with the golden head, tail, sum and sum of squares; returns the head and tail result.
Diff check_golden_draw(const GoldenRng& golden, const std::string& prefix, const std::vector<float>& v) {
  const int64_t n = int64_t(v.size());
  Diff head = compare(v.data(), golden.f32(prefix + ".head"));
  Diff tail = compare(v.data() + n - 256, golden.f32(prefix + ".tail"));
  double sum = 0, sumsq = 0;
  for (float x : v) {
    sum += x;
    sumsq += double(x) * x;
  }
  const double dsum = sum - golden.f64(prefix + ".sum"), dsumsq = sumsq - golden.f64(prefix + ".sumsq");
  // Float values summed in double: the sums only move by the differences of the values themselves.
  EXPECT_LT(std::fabs(dsum), 1e-6 * double(n)) << prefix;
  EXPECT_LT(std::fabs(dsumsq), 1e-5 * double(n)) << prefix;
  std::printf("  %-26s head %3d/256 bit-exact, tail %3d/256, max |diff| %.3g, sum diff %.3g, sumsq diff %.3g\n",
              prefix.c_str(), head.bit_exact, tail.bit_exact, std::max(head.max_abs, tail.max_abs), dsum, dsumsq);
  return {std::max(head.max_abs, tail.max_abs), head.bit_exact + tail.bit_exact};
}

}  // namespace

// Known-answer vectors of Philox4x32-10 (Random123's kat_vectors, the generator curand implements).
TEST(TorchRng, PhiloxKnownAnswers) {
  using B = std::array<uint32_t, 4>;
  EXPECT_EQ(philox4x32_10(B{0, 0, 0, 0}, 0), (B{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}));
  EXPECT_EQ(philox4x32_10(B{~0u, ~0u, ~0u, ~0u}, ~uint64_t(0)),
            (B{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}));
  EXPECT_EQ(philox4x32_10(B{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, 0x299f31d0a4093822ull),
            (B{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}));
}

// curand_init's offset skips whole 4-value blocks of the counter's low half; the subsequence selects its
// high half.
TEST(TorchRng, CurandOffsetAndSubsequence) {
  CurandPhilox a(7, 3, 0);
  a.next4();
  a.next4();
  EXPECT_EQ(a.next4(), CurandPhilox(7, 3, 8).next4());
  EXPECT_EQ(CurandPhilox(7, 5, 0).next4(), philox4x32_10({0, 0, 5, 0}, 7));
  EXPECT_EQ(CurandPhilox(7, uint64_t(1) << 32, 0).next4(), philox4x32_10({0, 0, 0, 1}, 7));
  EXPECT_EQ(CurandPhilox(7, 0, uint64_t(4) << 32).next4(), philox4x32_10({0, 1, 0, 0}, 7));
}

TEST(TorchRng, CpuMatchesGolden) {
  GoldenRng golden;
  for (uint64_t seed : {0, 42, 1234}) {
    TorchCpuGenerator gen(seed);
    for (const Shape& shape : kGoldenShapes) {
      std::vector<float> v(size_t(shape_numel(shape)));
      gen.randn(v.data(), int64_t(v.size()));
      const std::string prefix = golden_prefix("cpu", seed, shape);
      EXPECT_EQ(check_golden_draw(golden, prefix, v).bit_exact, 512) << prefix;
    }
  }
}

TEST(TorchRng, CudaMatchesGolden) {
  GoldenRng golden;
  for (uint64_t seed : {0, 42, 1234}) {
    TorchCudaGenerator gen(seed);
    for (const Shape& shape : kGoldenShapes) {
      std::vector<float> v(size_t(shape_numel(shape)));
      gen.randn(v.data(), int64_t(v.size()));
      const std::string prefix = golden_prefix("cuda", seed, shape);
      EXPECT_LT(check_golden_draw(golden, prefix, v).max_abs, 1e-6) << prefix;
    }
  }
}

// torch_randn is a draw from a freshly seeded generator: the first golden draw of each seed.
TEST(TorchRng, TorchRandnIsAFreshGenerator) {
  GoldenRng golden;
  for (GeneratorDevice device : {GeneratorDevice::Cpu, GeneratorDevice::Cuda}) {
    Tensor t = torch_randn({1, 16, 8, 8}, 42, device);
    ASSERT_EQ(t.shape(), (Shape{1, 16, 8, 8}));
    Diff d = compare(t.f32(), golden.f32(device == GeneratorDevice::Cpu ? "cpu.seed42.1x16x8x8.head"
                                                                         : "cuda.seed42.1x16x8x8.head"));
    EXPECT_LT(d.max_abs, 1e-6);
  }
}

// Each CUDA draw advances the Philox offset by 4 per curand_normal4 call of a thread.
TEST(TorchRng, CudaOffsetAdvancesPerDraw) {
  TorchCudaGenerator gen(0);
  const int64_t max_threads = 132 * 2048;
  std::vector<float> v(4 * max_threads + 1);
  gen.randn(v.data(), 1024);  // 4 blocks: one call per thread
  EXPECT_EQ(gen.philox_offset(), 4u);
  gen.randn(v.data(), 4 * max_threads);  // capped grid, 4 values per thread: still one call
  EXPECT_EQ(gen.philox_offset(), 8u);
  gen.randn(v.data(), 4 * max_threads + 1);  // one more value needs a second call per thread
  EXPECT_EQ(gen.philox_offset(), 16u);
}

// The input latents of the pipeline cases come from one CPU-generator draw of [B, 16, H/8, W/8].
TEST(TorchRng, CaseLatentsMatchGolden) {
  struct Case {
    const char* name;
    uint64_t seed;
  };
  for (const Case& c : {Case{"turbo_square", 1}, Case{"cfg_portrait", 2}, Case{"cfg_norm_trunc", 3}, Case{"batch2", 4}}) {
    auto file = SafetensorsFile::open(golden_path(std::string("cases/") + c.name + "/tensors.safetensors"));
    Tensor ref = file->get("input.latents");
    Tensor ours = torch_randn(ref.shape(), c.seed, GeneratorDevice::Cpu);
    Diff d = compare(ours.f32(), ref.to_vector());
    EXPECT_EQ(d.bit_exact, ref.numel()) << c.name << ": max |diff| " << d.max_abs;
  }
}

// normal_fill redraws 16 fresh uniforms for a ragged tail and overwrites the last 16 values with them; the
// values before the tail are those of the whole blocks.
TEST(TorchRng, CpuRaggedTailRedrawsLastSixteen) {
  Tensor whole = torch_randn({32}, 9, GeneratorDevice::Cpu);
  Tensor ragged = torch_randn({33}, 9, GeneratorDevice::Cpu);
  for (int i = 0; i < 17; ++i) EXPECT_EQ(ragged.f32()[i], whole.f32()[i]) << i;
  TorchCpuGenerator gen(9);
  for (int i = 0; i < 33; ++i) gen.uniform_float();
  float tail[16];
  gen.randn(tail, 16);  // the next 16 uniforms through one normal_fill_16
  for (int i = 0; i < 16; ++i) EXPECT_EQ(ragged.f32()[17 + i], tail[i]) << i;
}

// Fewer than 16 values take at::normal_distribution<double>: one Box-Muller pair (cosine, then the cached
// sine) per two values, each pair from two 53-bit uniforms.
TEST(TorchRng, CpuSmallTensorsUseCachedBoxMuller) {
  Tensor t = torch_randn({5}, 3, GeneratorDevice::Cpu);
  TorchCpuGenerator gen(3);
  for (int pair = 0; pair < 3; ++pair) {
    const double u1 = gen.uniform_double(), u2 = gen.uniform_double();
    const double r = std::sqrt(-2.0 * std::log1p(-u2)), theta = 2.0 * std::numbers::pi * u1;
    EXPECT_EQ(t.f32()[2 * pair], float(r * std::cos(theta)));
    if (2 * pair + 1 < 5) {
      EXPECT_EQ(t.f32()[2 * pair + 1], float(r * std::sin(theta)));
    }
  }
}

// Up to sm_count * 2048 values the CUDA launch has one thread per value and the multiprocessor count does
// not matter; beyond it each thread covers several values and the layout follows the GPU.
TEST(TorchRng, CudaLayoutDependsOnGpuOnlyForLargeTensors) {
  const Shape small{1, 16, 8, 8};
  EXPECT_EQ(torch_randn(small, 5, GeneratorDevice::Cuda, 132).to_vector(),
            torch_randn(small, 5, GeneratorDevice::Cuda, 1).to_vector());
  const Shape large{1, 16, 160, 160};  // 409600 values > 132 * 2048
  Tensor a = torch_randn(large, 5, GeneratorDevice::Cuda, 132);
  Tensor b = torch_randn(large, 5, GeneratorDevice::Cuda, 200);
  EXPECT_EQ(a.f32()[0], b.f32()[0]);  // thread 0, first call, lane 0 on both
  EXPECT_NE(a.to_vector(), b.to_vector());
  EXPECT_TRUE(zimage::testing::all_finite(a));
}

TEST(TorchRng, LargeDrawIsFast) {
  for (GeneratorDevice device : {GeneratorDevice::Cpu, GeneratorDevice::Cuda}) {
    auto start = std::chrono::steady_clock::now();
    Tensor t = torch_randn({1, 16, 128, 128}, 0, device);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("  [1,16,128,128] on the %s generator: %.2f ms\n", device == GeneratorDevice::Cpu ? "CPU" : "CUDA",
                ms);
    EXPECT_LT(ms, 500.0);  // a generous bound: this catches accidental quadratic work, not noise
  }
}
