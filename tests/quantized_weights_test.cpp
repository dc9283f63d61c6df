// Quantized diffusion model files written by `save-model --format comfyui|gguf --quantize ...` from the
// golden tiny model, read back through the layout readers; Linear keeping them quantized (dequantized
// per call, equal to dequantizing at load); and the tiny model's latents through Q8_0, Q4_K and FP8
// files against its bf16 run.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "backend/backend.h"
#include "core/error.h"
#include "io/gguf.h"
#include "model/linear.h"
#include "model/save_model.h"
#include "model/weight_loading.h"
#include "model/weights/checkpoint_layout.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::temp_path;

namespace {

const ModelSource& tiny() {
  static const ModelSource m = open_model(golden_path("tiny-zimage"));
  return m;
}

// The tiny DiT saved once per (format, quantization) for all the tests.
std::string saved(DitFileFormat format, DitQuantization q) {
  static std::map<std::pair<int, int>, std::string> files;
  auto key = std::pair{int(format), int(q)};
  if (!files.count(key)) {
    const std::string path =
        temp_path(std::string("dit_") + std::to_string(key.first) + "_" + std::to_string(key.second) +
                  (format == DitFileFormat::Gguf ? ".gguf" : ".safetensors"));
    save_diffusion_model(tiny(), path, format, q);
    files[key] = path;
  }
  return files[key];
}

std::shared_ptr<LayoutWeights> open_layout(const std::string& path) {
  auto stored = open_stored_tensors(path);
  return std::make_shared<LayoutWeights>(stored, detect_layout(*stored));
}

// ggml_dequantize(ggml_quantize(x)) for x [rows, cols], row by row.
Tensor ggml_round_trip(const Tensor& x, GgmlType type) {
  int64_t be = 0, bb = 0;
  EXPECT_TRUE(ggml_block_layout(uint32_t(type), &be, &bb));
  const int64_t n = x.numel();
  std::vector<uint8_t> q(size_t(n / be * bb));
  ggml_quantize(uint32_t(type), x.f32(), q.data(), n);
  Tensor y = Tensor::empty(x.shape(), DType::F32);
  ggml_dequantize(uint32_t(type), q.data(), y.f32(), n);
  return y;
}

struct ProcessResult {
  int code;
  std::string out;
};

ProcessResult run(const std::string& args) {
  std::string cmd = std::string(ZIMAGE_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// The latents of the tiny model's 3-step turbo run (64 x 64, seed 44) with `flags` on the CPU.
Tensor latents(const std::string& name, const std::string& flags) {
  const std::string lat = temp_path(name + "_latents.safetensors");
  ProcessResult r = run("generate --model " + golden_path("tiny-zimage") + " " + flags +
                        " --prompt 'a blue bird' --height 64 --width 64 --num-inference-steps 3 --guidance-scale 0"
                        " --max-sequence-length 64 --seed 44 --generator-device cpu --backend cpu --output-path " +
                        temp_path(name + ".png") + " --save-latents " + lat);
  EXPECT_EQ(r.code, 0) << r.out;
  return SafetensorsFile::open(lat)->get("latents").to_f32();
}

}  // namespace

TEST(SaveDiffusionModel, GgufTensorTypesFollowCity96AndQ8_0BlocksMatchTheGoldenFile) {
  auto f = GgufFile::open(saved(DitFileFormat::Gguf, DitQuantization::Q8_0));
  EXPECT_EQ(f->metadata_string("general.architecture"), "lumina2");
  EXPECT_EQ(f->metadata_string("general.file_type"), "7");
  auto golden = GgufFile::open(golden_path("wave3/formats/z_image_dit_q8_0.gguf"));
  int compared = 0;
  int64_t quants = 0, off_by_one = 0;
  for (const auto& [name, ti] : f->tensors()) {
    const bool matrix = ti.ne.size() == 2 && ti.ne[1] > 1;
    GgmlType want = GgmlType::Q8_0;
    if (!matrix || name.find("final_layer.linear.") != std::string::npos)
      want = GgmlType::F32;  // 1-D, [1, 64]: <= 1024
    else if (name.find("final_layer.") != std::string::npos || ti.ne[0] % 32 != 0)
      want = GgmlType::BF16;
    EXPECT_EQ(ggml_type_name(ti.type), std::string(ggml_type_name(uint32_t(want)))) << name;
    if (GgmlType(ti.type) != GgmlType::Q8_0) continue;
    // The golden file's Q8_0 blocks have the same scales d, and the same quants except where x / d falls on
    // a half: its generator computed x / d, ggml (and gguf-py) x * (1 / d), which can round the other way.
    ASSERT_TRUE(golden->has(name)) << name;
    ASSERT_EQ(golden->tensors().at(name).type, ti.type) << name;
    const uint8_t *a = f->bytes(name), *b = golden->bytes(name);
    for (uint64_t blk = 0; blk < ti.nbytes / 34; ++blk, a += 34, b += 34) {
      ASSERT_EQ(std::memcmp(a, b, 2), 0) << name << " block " << blk << ": d";
      for (int j = 0; j < 32; ++j) {
        const int d = std::abs(int(int8_t(a[2 + j])) - int(int8_t(b[2 + j])));
        ASSERT_LE(d, 1) << name << " block " << blk << " value " << j;
        off_by_one += d;
        ++quants;
      }
    }
    ++compared;
  }
  // 3 modulated blocks x (qkv, out, w1, w3, adaLN; w2's rows of 170 are not whole blocks), the context
  // refiner's qkv, out, w1, w3, and the x, caption and time embedders' 4 matrices.
  EXPECT_EQ(compared, 3 * 5 + 4 + 4);
  std::printf("%lld of %lld quants one apart from the golden file's\n", (long long)off_by_one, (long long)quants);
  EXPECT_LE(off_by_one * 200, quants);  // < 0.5%: only the ties (measured 0.1-0.2%)
}

TEST(SaveDiffusionModel, EveryFormatReadsBackAsItsQuantization) {
  const std::vector<std::pair<DitFileFormat, DitQuantization>> kinds = {{DitFileFormat::ComfyUi, DitQuantization::None},
                                                                        {DitFileFormat::ComfyUi, DitQuantization::Fp8},
                                                                        {DitFileFormat::Gguf, DitQuantization::None},
                                                                        {DitFileFormat::Gguf, DitQuantization::Q8_0},
                                                                        {DitFileFormat::Gguf, DitQuantization::Q4_K}};
  Checkpoint ref_ckpt = Checkpoint::open_dir(golden_path("tiny-zimage/transformer"));
  for (const auto& [format, q] : kinds) {
    const std::string path = saved(format, q);
    auto w = open_layout(path);
    EXPECT_STREQ(w->layout().name, "comfy_dit") << path;
    EXPECT_EQ(w->canonical_names(), ref_ckpt.names()) << path;
    int quantized = 0;
    for (const auto& name : ref_ckpt.names()) {
      const Tensor r = ref_ckpt.get(name).to_f32();
      const Tensor served = w->get(name, r.shape());
      const StoredWeight s = w->stored_weight(name);
      Tensor want = r;  // bf16, F32 and BF16 tensors: exact
      if (s.blocks()) {
        want = ggml_round_trip(r, GgmlType(s.ggml_type));
      } else if (s.data.dtype() == DType::F8E4M3) {
        ASSERT_EQ(s.scale.numel(), 1) << name;
        const float scale = s.scale.f32()[0];
        want = Tensor::empty(r.shape(), DType::F32);
        for (int64_t i = 0; i < r.numel(); ++i)
          want.f32()[i] = f8e4m3_to_f32(f32_to_f8e4m3(r.f32()[i] / scale)) * scale;
      }
      quantized += s.quantized();
      ASSERT_EQ(max_abs_diff(served, want), 0.0) << path << " " << name;
    }
    // Canonical weights served quantized. FP8: 3 modulated blocks x (q, k, v, out, w1, w2, w3, adaLN), the
    // context refiner's 7, the final adaLN. Q8_0: the same but w2 (rows of 170) and the final layer, plus
    // the 4 embedder matrices. Q4_K: only the time embedder's two matrices have rows of whole 256 blocks.
    const int want = q == DitQuantization::None   ? 0
                     : q == DitQuantization::Fp8  ? 3 * 8 + 7 + 1
                     : q == DitQuantization::Q8_0 ? 3 * 7 + 6 + 4
                                                  : 2;
    EXPECT_EQ(quantized, want) << path;
  }
  // The FP8 scale is ComfyUI's per tensor max |w| / 448, over the whole fused q|k|v.
  auto fp8 = SafetensorsFile::open(saved(DitFileFormat::ComfyUi, DitQuantization::Fp8));
  float amax = 0;
  for (const char* p : {"to_q", "to_k", "to_v"})
    for (float v : ref_ckpt.get(std::string("layers.1.attention.") + p + ".weight").to_vector())
      amax = std::max(amax, std::fabs(v));
  EXPECT_EQ(fp8->get("model.diffusion_model.layers.1.attention.qkv.scale_weight").to_f32().f32()[0], amax / 448.0f);
  EXPECT_TRUE(fp8->entries().count("model.diffusion_model.scaled_fp8"));
  EXPECT_EQ(fp8->entries().at("model.diffusion_model.layers.1.attention.qkv.weight").dtype, DType::F8E4M3);
  EXPECT_EQ(fp8->entries().at("model.diffusion_model.x_embedder.weight").dtype, DType::BF16);
}

TEST(SaveDiffusionModel, BadRequestsAreClearErrors) {
  expect_error(
      [] { save_diffusion_model(tiny(), temp_path("x.safetensors"), DitFileFormat::ComfyUi, DitQuantization::Q8_0); },
      ErrorKind::InvalidArgument, {"q8_0", "--format gguf"});
  expect_error([] { save_diffusion_model(tiny(), temp_path("x.gguf"), DitFileFormat::Gguf, DitQuantization::Fp8); },
               ErrorKind::InvalidArgument, {"fp8", "--format comfyui"});
  expect_error([] { save_diffusion_model(tiny(), temp_path("x.bin"), DitFileFormat::Gguf, DitQuantization::Q8_0); },
               ErrorKind::InvalidArgument, {"x.bin", ".gguf"});
  const std::string existing = saved(DitFileFormat::Gguf, DitQuantization::Q8_0);
  expect_error([&] { save_diffusion_model(tiny(), existing, DitFileFormat::Gguf, DitQuantization::Q8_0); },
               ErrorKind::InvalidArgument, {"exists", "--force"});
}

TEST(QuantizedLinear, StaysQuantizedAndEqualsDequantizingAtLoad) {
  auto be = make_cpu_backend();
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  auto input = [&](int64_t in) {
    std::vector<float> xs(size_t(5 * in));
    for (auto& v : xs) v = normal(rng);
    return be->upload(Tensor::from_f32({5, in}, xs));
  };
  for (auto [format, q] :
       {std::pair{DitFileFormat::Gguf, DitQuantization::Q8_0}, std::pair{DitFileFormat::Gguf, DitQuantization::Q4_K},
        std::pair{DitFileFormat::ComfyUi, DitQuantization::Fp8}}) {
    auto w = open_layout(saved(format, q));
    const std::string p = "layers.0.";
    const std::vector<std::string> qkv = {p + "attention.to_q.weight", p + "attention.to_k.weight",
                                          p + "attention.to_v.weight"};
    const std::vector<std::string> w13 = {p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"};
    struct Case {
      Linear l;
      Tensor ref;  // the same weight dequantized at load
    };
    std::vector<Case> cases;
    if (q == DitQuantization::Q4_K) {  // the tiny model's only matrices with rows of whole Q4_K blocks
      cases.push_back({load_linear(*be, *w, "t_embedder.mlp.2.weight", {64, 1024}),
                       load_weight(*be, *w, "t_embedder.mlp.2.weight", {64, 1024})});
      cases.push_back({load_packed_linear(*be, *w, {"t_embedder.mlp.0.weight"}, {{1024, 256}}),
                       load_weight(*be, *w, "t_embedder.mlp.0.weight", {1024, 256})});
    } else {
      cases.push_back({load_linear(*be, *w, p + "attention.to_out.0.weight", {64, 64}),
                       load_weight(*be, *w, p + "attention.to_out.0.weight", {64, 64})});
      cases.push_back({load_packed_linear(*be, *w, qkv, {{64, 64}, {64, 64}, {64, 64}}),
                       load_packed_rows(*be, *w, qkv, {{64, 64}, {64, 64}, {64, 64}})});
      cases.push_back({load_packed_linear(*be, *w, w13, {{170, 64}, {170, 64}}),
                       load_packed_rows(*be, *w, w13, {{170, 64}, {170, 64}})});
    }
    for (const Case& c : cases) {
      ASSERT_FALSE(c.l.w.defined()) << "kept quantized";
      ASSERT_TRUE(c.l.stored.quantized());
      EXPECT_EQ(c.l.out_features(), c.ref.dim(0));
      EXPECT_EQ(c.l.in_features(), c.ref.dim(1));
      // Memory: Q8_0 34 bytes per 32 values, Q4_K 144 per 256, FP8 one byte (and a float per row of scale).
      const int64_t n = c.ref.numel();
      const int64_t want = q == DitQuantization::Q8_0 ? n / 32 * 34 : q == DitQuantization::Q4_K ? n / 256 * 144 : n;
      EXPECT_EQ(int64_t(c.l.stored.data.nbytes()), want);
      const Tensor x = input(c.ref.dim(1));
      EXPECT_EQ(max_abs_diff(apply(*be, c.l, x), be->linear(x, c.ref)), 0.0);
    }
    if (q == DitQuantization::Fp8) {  // w1 and w3 carry their own scales: one per row once packed
      const Linear& l = cases[2].l;
      ASSERT_EQ(l.stored.scale.numel(), 340);
      EXPECT_NE(l.stored.scale.f32()[0], l.stored.scale.f32()[170]);
    }
  }
}

TEST(QuantizedFiles, TinyModelLatentsStayNearTheBf16Run) {
  // The same 3-step run with the DiT from each file. bf16 ComfyUI must match exactly (the same values).
  // The quantized ones follow their weights' relative error: Q8_0 rounds to 1/254 of a block's largest
  // value, FP8 e4m3 to 1/32 of each value (3-bit mantissa), Q4_K to ~1/30 of a sub-block's range. Measured
  // latents relative L2 errors: Q8_0 0.0082, FP8 0.028, Q4_K 0.056; the bounds are ~2x those.
  const Tensor bf16 = latents("bf16", "");
  struct Case {
    std::string name;
    std::string file;
    double max_rel;
  };
  const Case cases[] = {
      {"comfy_bf16", saved(DitFileFormat::ComfyUi, DitQuantization::None), 0.0},
      {"gguf_q8_0", saved(DitFileFormat::Gguf, DitQuantization::Q8_0), 0.02},
      {"comfy_fp8", saved(DitFileFormat::ComfyUi, DitQuantization::Fp8), 0.06},
      {"gguf_q4_k", saved(DitFileFormat::Gguf, DitQuantization::Q4_K), 0.12},
  };
  for (const Case& c : cases) {
    const Tensor l = latents(c.name, "--diffusion-model " + c.file);
    const double rel = zimage::testing::rel_l2_error(l, bf16);
    std::printf("%s: latents relative L2 error %.3g, max |diff| %.3g\n", c.name.c_str(), rel, max_abs_diff(l, bf16));
    EXPECT_LE(rel, c.max_rel) << c.name;
  }
}
