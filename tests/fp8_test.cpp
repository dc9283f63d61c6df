// --quantization fp8 on the CPU reference: the per-row e4m3 quantization, the W8A8 GEMM against float64 at
// every GEMM shape of the DiT, the precision policy (which linears stay bf16) and its WeightSource, and the
// FP8 pipeline on the golden tiny model: near the float32 run (text to image, CFG, ControlNet, runtime LoRA),
// batch invariant, and the same on simulated Ulysses ranks as on one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "backend/backend.h"
#include "core/dtype.h"
#include "model/fp8_linears.h"
#include "model/lora.h"
#include "model/weights/checkpoint_layout.h"
#include "model/weights/stored_tensors.h"
#include "model/zimage_controlnet.h"
#include "model/zimage_dit.h"
#include "golden_requests.h"
#include "simulated_ranks.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::rel_l2_error;

namespace {

// Normal values with every 7th row scaled by 1e3 (the DiT's outlier tokens reach |x| ~ 6.6e4).
Tensor random_rows(int64_t rows, int64_t cols, float scale, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Tensor t = Tensor::empty({rows, cols}, DType::F32);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t.f32()[r * cols + c] = nd(gen) * scale * (r % 7 == 3 ? 1e3f : 1.0f);
  return t;
}

// Two FP8 weights hold the same codes and scales.
void expect_same_fp8(const StoredWeight& a, const StoredWeight& b) {
  ASSERT_EQ(a.data.dtype(), DType::F8E4M3);
  ASSERT_EQ(a.shape, b.shape);
  ASSERT_EQ(a.scale.numel(), b.scale.numel());
  EXPECT_EQ(std::memcmp(a.data.data(), b.data.data(), a.data.nbytes()), 0);
  EXPECT_EQ(std::memcmp(a.scale.data(), b.scale.data(), a.scale.nbytes()), 0);
}

// The float32 values of e4m3 codes times a scale per row.
Tensor decode(const Tensor& q, const Tensor& scale) {
  Tensor v = q.to_f32();
  const int64_t cols = v.dim(-1);
  for (int64_t i = 0; i < v.numel(); ++i) v.f32()[i] *= scale.f32()[i / cols];
  return v;
}

// x [m, k] · w [n, k]^T in float64.
std::vector<double> gemm64(const Tensor& x, const Tensor& w) {
  const int64_t m = x.dim(0), k = x.dim(1), n = w.dim(0);
  std::vector<double> y(size_t(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t c = 0; c < k; ++c) acc += double(x.f32()[i * k + c]) * double(w.f32()[j * k + c]);
      y[size_t(i * n + j)] = acc;
    }
  return y;
}

double rel_to(const Tensor& y, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (double(y.f32()[i]) - ref[i]) * (double(y.f32()[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST(Fp8Quantize, OneScalePerRowAndRoundedCodes) {
  Tensor x = random_rows(9, 3840, 1.0f, 1);
  for (int64_t c = 0; c < 3840; ++c) x.f32()[5 * 3840 + c] = 0.0f;  // a row of zeros
  for (int64_t c = 0; c < 3840; ++c) x.f32()[6 * 3840 + c] *= 1e-6f;  // e4m3's subnormal range after scaling
  auto be = make_cpu_backend();
  const Backend::Fp8Rows q = be->quantize_fp8_rows(x);
  ASSERT_EQ(q.q.dtype(), DType::F8E4M3);
  ASSERT_EQ(q.q.shape(), x.shape());
  ASSERT_EQ(q.scale.shape(), Shape{9});
  for (int64_t r = 0; r < 9; ++r) {
    const float* row = x.f32() + r * 3840;
    const uint8_t* codes = q.q.data_as<uint8_t>() + r * 3840;
    float amax = 0;
    for (int64_t c = 0; c < 3840; ++c) amax = std::max(amax, std::fabs(row[c]));
    const float s = q.scale.f32()[r];
    if (amax == 0) {
      EXPECT_EQ(s, 1.0f);
      for (int64_t c = 0; c < 3840; ++c) EXPECT_EQ(codes[c], 0);
      continue;
    }
    EXPECT_EQ(s, amax / 448.0f) << "row " << r;
    float code_max = 0;
    for (int64_t c = 0; c < 3840; ++c) {
      const float v = f8e4m3_to_f32(codes[c]);
      code_max = std::max(code_max, std::fabs(v));
      // Nearest e4m3 value of x / s: within half a step (3 mantissa bits; steps of 2^-9 below 2^-6).
      const float t = row[c] / s;
      const float step = std::fabs(t) < 0.015625f ? 0.001953125f : std::exp2(std::floor(std::log2(std::fabs(t))) - 3);
      ASSERT_LE(std::fabs(v - t), 0.5f * step + 1e-7f) << "row " << r << " col " << c;
      ASSERT_EQ(codes[c], f32_to_f8e4m3(t));
    }
    EXPECT_EQ(code_max, 448.0f) << "the largest |x| of a row lands on e4m3's largest value";
  }
}

// Every GEMM shape of the full-size DiT (rows subsampled: the products do not depend on M), and a bias.
TEST(Fp8Linear, MatchesFloat64AtEveryDitShape) {
  struct Shape3 {
    const char* what;
    int64_t k, n;
    bool bias;
  } shapes[] = {{"to_q|to_k|to_v", 3840, 11520, false},
                {"to_out", 3840, 3840, false},
                {"w1|w3", 3840, 20480, false},
                {"w2", 10240, 3840, false},
                {"ControlNet after_proj (bias)", 3840, 3840, true}};
  auto be = make_cpu_backend();
  for (const auto& s : shapes) {
    const int64_t m = 8;
    const Tensor x = random_rows(m, s.k, 1.0f, 2), w = random_rows(s.n, s.k, 1.0f / std::sqrt(float(s.k)), 3);
    Tensor bias = random_rows(1, s.n, 0.1f, 4).reshape({s.n});
    const StoredWeight sw = quantize_fp8_weight(w);
    const Backend::Fp8Rows xq = be->quantize_fp8_rows(x);
    const Tensor y = be->linear_fp8(xq, sw, s.bias ? &bias : nullptr);
    ASSERT_EQ(y.shape(), (Shape{m, s.n}));
    // Against float64 of exactly the quantized values: only float32 summation separates them.
    std::vector<double> exact = gemm64(decode(xq.q, xq.scale), decode(sw.data, sw.scale));
    std::vector<double> full = gemm64(x, w);
    if (s.bias)
      for (int64_t i = 0; i < m * s.n; ++i) {
        exact[size_t(i)] += bias.f32()[i % s.n];
        full[size_t(i)] += bias.f32()[i % s.n];
      }
    const double arithmetic = rel_to(y, exact), quantization = rel_to(y, full);
    std::printf("  FP8 GEMM %-30s K=%5lld N=%5lld: vs float64 of the quantized values %.2e, of the unquantized %.2e\n",
                s.what, (long long)s.k, (long long)s.n, arithmetic, quantization);
    EXPECT_LE(arithmetic, 1e-6) << s.what;
    // e4m3 keeps 3 mantissa bits: ~2.5% per product, not averaged away by the sum.
    EXPECT_LE(quantization, 0.05) << s.what;
    EXPECT_GE(quantization, 0.005) << s.what << ": the values were not quantized";
  }
}

TEST(Fp8Policy, PatternsAndDefaults) {
  EXPECT_TRUE(glob_match("layers.*.attention.*", "layers.12.attention.to_q.weight"));
  EXPECT_TRUE(glob_match("*adaLN_modulation.*", "layers.3.adaLN_modulation.0.weight"));
  EXPECT_TRUE(glob_match("*", ""));
  EXPECT_TRUE(glob_match("a*b*c", "aXbYbZc"));
  EXPECT_FALSE(glob_match("a*b*c", "aXbYbZ"));
  EXPECT_TRUE(glob_match("layers.1*", "layers.10.feed_forward.w2.weight"));
  EXPECT_FALSE(glob_match("layers.1.*", "layers.10.feed_forward.w2.weight"));
  EXPECT_FALSE(glob_match("to_q", "attention.to_q.weight"));

  const Fp8Policy p;
  for (const char* kept : {"t_embedder.mlp.0.weight", "cap_embedder.1.weight", "all_x_embedder.2-1.weight",
                           "control_all_x_embedder.2-1.weight", "layers.0.adaLN_modulation.0.weight",
                           "all_final_layer.2-1.linear.weight", "all_final_layer.2-1.adaLN_modulation.1.weight"})
    EXPECT_TRUE(p.keeps_bf16(kept)) << kept;
  for (const char* fp8 : {"layers.0.attention.to_q.weight", "noise_refiner.1.feed_forward.w2.weight",
                          "context_refiner.0.attention.to_out.0.weight", "control_layers.3.after_proj.weight",
                          "control_noise_refiner.0.before_proj.weight"})
    EXPECT_TRUE(p.fp8(fp8, {3840, 3840})) << fp8;
  EXPECT_FALSE(p.fp8("layers.0.feed_forward.w2.weight", {64, 170})) << "K not a multiple of 16";
  EXPECT_FALSE(p.fp8("layers.0.feed_forward.w1.weight", {170, 64})) << "N not a multiple of 16";
  EXPECT_FALSE(p.fp8("layers.0.adaLN_modulation.0.weight", {256, 256}));

  EXPECT_TRUE(Fp8Policy::parse("none").keep_bf16.empty());
  const Fp8Policy custom = Fp8Policy::parse("default,layers.0.*");
  EXPECT_EQ(custom.keep_bf16.size(), Fp8Policy::default_keep_bf16().size() + 1);
  EXPECT_TRUE(custom.keeps_bf16("layers.0.feed_forward.w2.weight"));
  EXPECT_FALSE(custom.keeps_bf16("layers.1.feed_forward.w2.weight"));
  EXPECT_FALSE(Fp8Policy::parse("layers.0.*").keeps_bf16("t_embedder.mlp.0.weight")) << "a list replaces the defaults";
  expect_error([] { Fp8Policy::parse("a,,b"); }, ErrorKind::InvalidArgument, {"empty pattern"});
  expect_error([] { Fp8Policy::parse("none,a"); }, ErrorKind::InvalidArgument, {"'none' goes alone"});
}

TEST(Fp8Weights, QuantizePerOutputChannelAtLoad) {
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  const Fp8LinearWeights w(m.transformer_weights, Fp8Policy{});
  const std::string q = "layers.0.attention.to_q.weight";
  ASSERT_TRUE(w.fp8_linear(q, {64, 64}));
  const std::optional<StoredWeight> s = w.quantized(q, {64, 64});
  ASSERT_TRUE(s.has_value());
  expect_same_fp8(*s, quantize_fp8_weight(m.transformer_weights->get(q, {64, 64}).to_f32()));
  // Kept linears, unaligned ones and non-linear weights are the base's.
  EXPECT_FALSE(w.quantized("layers.0.adaLN_modulation.0.weight", {256, 64}).has_value());
  EXPECT_FALSE(w.fp8_linear("layers.0.feed_forward.w2.weight", {64, 170}));
  EXPECT_FALSE(w.quantized("layers.0.feed_forward.w2.weight", {64, 170}).has_value());
  EXPECT_EQ(max_abs_diff(w.get("layers.0.attention_norm1.weight", {64}),
                         m.transformer_weights->get("layers.0.attention_norm1.weight", {64})),
            0.0);
}

TEST(Fp8Weights, KeepTheCodesAndScalesOfAnFp8Checkpoint) {
  auto stored = open_stored_tensors(golden_path("wave3/formats/z_image_dit_fp8_scaled.safetensors"));
  auto file = std::make_shared<LayoutWeights>(stored, detect_layout(*stored));
  const Fp8LinearWeights w(file, Fp8Policy{});
  const std::string name = "layers.1.attention.to_out.0.weight";
  const std::optional<StoredWeight> base = file->quantized(name, {64, 64});
  ASSERT_TRUE(base.has_value() && base->data.dtype() == DType::F8E4M3 && base->scale.numel() == 1);
  const std::optional<StoredWeight> s = w.quantized(name, {64, 64});
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->data.data(), base->data.data()) << "the file's codes, not requantized";
  ASSERT_EQ(s->scale.numel(), 64);
  for (int64_t r = 0; r < 64; ++r) EXPECT_EQ(s->scale.f32()[r], base->scale.to_f32().f32()[0]);
}

// GGUF blocks (and any other stored form) are dequantized, then quantized per row like bf16 weights.
TEST(Fp8Weights, RequantizeGgufBlocksPerRow) {
  auto stored = open_stored_tensors(golden_path("wave3/formats/z_image_dit_q8_0.gguf"));
  auto file = std::make_shared<LayoutWeights>(stored, detect_layout(*stored));
  const Fp8LinearWeights w(file, Fp8Policy{});
  const std::string name = "layers.0.attention.to_out.0.weight";
  const std::optional<StoredWeight> base = file->quantized(name, {64, 64});
  ASSERT_TRUE(base.has_value() && base->blocks());
  const std::optional<StoredWeight> s = w.quantized(name, {64, 64});
  ASSERT_TRUE(s.has_value());
  expect_same_fp8(*s, quantize_fp8_weight(dequantize_on_host(*base)));
}

// ---- The FP8 pipeline on the golden tiny model (its attention projections run in FP8; the FFN's 170
// columns are not 16-aligned and stay bf16, as they would on the GPU) ----

namespace {

ModelSource fp8_model(ModelSource m) {
  use_fp8_linears(m, Fp8Policy{});
  return m;
}

GenerateRequest case_request(const std::string& rel) {
  return zimage::testing::golden_case_request(golden_path(rel));
}

}  // namespace

TEST(Fp8Pipeline, GoldenCasesNearTheFloat32Run) {
  auto be = make_cpu_backend();
  const ModelSource plain = open_model(golden_path("tiny-zimage"));
  ModelSource controlled = plain;
  attach_controlnet(controlled, golden_path("wave3/controlnet_union_v2.safetensors"),
                    golden_path("wave3/controlnet_union_v2.json"));
  struct Case {
    std::string dir;
    const ModelSource* model;
  } cases[] = {{"wave2/cases/lora_none", &plain},
               {"wave2/cases/img2img_cfg", &plain},
               {"wave2/cases/inpaint_partial", &plain},
               {"wave3/cases/cn_v2_cfg", &controlled}};
  for (const auto& c : cases) {
    const GenerateRequest r = case_request(c.dir);
    TextToImagePipeline f32(*be, *c.model);
    TextToImagePipeline fp8(*be, fp8_model(*c.model));
    const GenerateResult a = f32.generate(r), b = fp8.generate(r);
    const double rel = rel_l2_error(b.latents, a.latents);
    std::printf("%-24s FP8 vs float32: final latents relative L2 %.4f, images max |diff| %.0f levels\n",
                c.dir.c_str(), rel, max_abs_diff(b.images.to_f32(), a.images.to_f32()));
    EXPECT_LE(rel, 0.08) << c.dir;
    EXPECT_GE(rel, 1e-4) << c.dir << ": no linear ran in FP8";
  }
}

TEST(Fp8Pipeline, BatchItemsEqualThemselvesAlone) {
  auto be = make_cpu_backend();
  TextToImagePipeline p(*be, fp8_model(open_model(golden_path("tiny-zimage"))));
  GenerateRequest one = case_request("wave2/cases/lora_none");
  one.guidance = 4.0f;  // with CFG: the batch is [positives | negatives]
  GenerateRequest two = one;
  two.prompts = {one.prompts[0], one.prompts[0]};
  two.noise_groups = {{1, one.seed}, {1, one.seed}};
  const GenerateResult a = p.generate(one), b = p.generate(two);
  const int64_t per = a.latents.numel();
  for (int i = 0; i < 2; ++i)
    EXPECT_EQ(max_abs_diff(b.latents.narrow0(i, 1), a.latents), 0.0) << "item " << i << " of " << per << " values";
}

TEST(Fp8Pipeline, UlyssesRanksEqualOneRank) {
  const ModelSource m = fp8_model(open_model(golden_path("tiny-zimage")));
  auto be = make_cpu_backend();
  TextToImagePipeline one(*be, m);
  zimage::testing::SimulatedRanks two(zimage::testing::parallel(2, false), m);
  const GenerateRequest r = case_request("wave2/cases/img2img_cfg");
  const double d = max_abs_diff(two.pipeline->generate(r).latents, one.generate(r).latents);
  std::printf("FP8 Ulysses-2 vs one rank: max |diff| %.3g\n", d);
  EXPECT_LE(d, 1e-5);
}

TEST(Fp8Pipeline, RuntimeLoraAddsToFp8Linears) {
  auto be = make_cpu_backend();
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  auto adapter = std::make_shared<const LoraAdapter>(
      load_lora(golden_path("wave2/lora_kohya.safetensors"), ZImageDit::weight_specs(m.transformer)));
  TextToImagePipeline f32(*be, m), fp8(*be, fp8_model(m));
  GenerateRequest r = case_request("wave2/cases/lora_none");
  const Tensor base32 = f32.generate(r).latents, base8 = fp8.generate(r).latents;
  r.lora_groups = {{1, {{adapter, 1.0f}}}};
  const Tensor lora32 = f32.generate(r).latents, lora8 = fp8.generate(r).latents;
  const double rel = rel_l2_error(lora8, lora32);
  std::printf("runtime LoRA on FP8 linears vs float32: latents relative L2 %.4f (LoRA's own change %.4f)\n", rel,
              rel_l2_error(lora32, base32));
  EXPECT_LE(rel, 0.08);
  EXPECT_GE(rel_l2_error(lora8, base8), 0.5 * rel_l2_error(lora32, base32)) << "the adapter did not apply";
}
