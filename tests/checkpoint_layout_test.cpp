// Checkpoint layouts, FP8 and GGUF files of the golden tiny model (tests/golden/wave3/formats) served
// under canonical names, and the CLI's component-file flags reproducing the wave3 cases.
#include "model/weights/checkpoint_layout.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/gguf.h"
#include "io/image.h"
#include "model/component_files.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::temp_path;
namespace fs = std::filesystem;

namespace {

std::string formats(const std::string& f) { return golden_path("wave3/formats/" + f); }

std::shared_ptr<LayoutWeights> open_layout(const std::string& path) {
  auto stored = open_stored_tensors(path);
  return std::make_shared<LayoutWeights>(stored, detect_layout(*stored));
}

// Largest |served - reference| over every tensor of the diffusers checkpoint `ref_dir`, and that the
// file serves exactly the reference's names.
double max_error_against(const LayoutWeights& w, const std::string& ref_dir) {
  Checkpoint ref = Checkpoint::open_dir(golden_path(ref_dir));
  EXPECT_EQ(w.canonical_names(), ref.names()) << w.describe();
  double worst = 0;
  for (const auto& name : ref.names()) {
    Tensor r = ref.get(name);
    worst = std::max(worst, max_abs_diff(w.get(name, r.shape()), r));
  }
  return worst;
}

struct ProcessResult {
  int code;
  std::string out;
};

ProcessResult run(const std::string& args) {
  const char* bin = std::getenv("ZIMAGE_BINARY");
  std::string cmd = std::string(bin && *bin ? bin : ZIMAGE_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// Runs generate on the wave3 case `name` with `flags` and compares latents (1e-3) and pixels (one level).
void expect_case(const std::string& name, const std::string& flags) {
  std::string png = temp_path(name + ".png"), lat = temp_path(name + "_latents.safetensors");
  ProcessResult r = run("generate " + flags +
                        " --prompt 'a blue bird' --height 64 --width 64 --num-inference-steps 3 --guidance-scale 0"
                        " --max-sequence-length 64 --seed 44 --generator-device cpu --backend cpu --output-path " +
                        png + " --save-latents " + lat);
  ASSERT_EQ(r.code, 0) << r.out;
  auto golden = SafetensorsFile::open(golden_path("wave3/cases/" + name + "/tensors.safetensors"));
  const double lat_err = max_abs_diff(SafetensorsFile::open(lat)->get("latents"), golden->get("output.latents"));
  EXPECT_LE(lat_err, 1e-3);
  ImageU8 img = read_image(png);
  Tensor ref = golden->get("output.image_u8");
  int worst = 0;
  for (size_t i = 0; i < img.rgb.size(); ++i)
    worst = std::max(worst, std::abs(int(img.rgb[i]) - int(ref.data_as<uint8_t>()[i])));
  EXPECT_LE(worst, 1);
  std::printf("%s: latents max |diff| %.3g, pixels max |diff| %d\n", name.c_str(), lat_err, worst);
}

}  // namespace

TEST(CheckpointLayout, ComfyDitMapsBackToTheTinyModelExactly) {
  for (const char* f : {"z_image_dit_comfy.safetensors", "z_image_dit_comfy_noprefix.safetensors"}) {
    auto w = open_layout(formats(f));
    EXPECT_STREQ(w->layout().name, "comfy_dit");
    EXPECT_EQ(max_error_against(*w, "tiny-zimage/transformer"), 0.0) << f;
  }
  EXPECT_EQ(open_layout(formats("z_image_dit_comfy.safetensors"))->layout().prefix, "model.diffusion_model.");
}

TEST(CheckpointLayout, BflVaeMapsBackToTheTinyModelExactly) {
  auto w = open_layout(formats("ae.safetensors"));
  EXPECT_STREQ(w->layout().name, "bfl_vae");
  EXPECT_EQ(max_error_against(*w, "tiny-zimage/vae"), 0.0);
  EXPECT_EQ(w->stored_name("decoder.up_blocks.0.resnets.0.conv1.weight"), "decoder.up.3.block.0.conv1.weight");
}

TEST(CheckpointLayout, DiffusersFilesServeThemselves) {
  auto w = open_layout(golden_path("tiny-zimage/transformer/diffusion_pytorch_model.safetensors"));
  EXPECT_STREQ(w->layout().name, "diffusers_dit");
  EXPECT_EQ(max_error_against(*w, "tiny-zimage/transformer"), 0.0);
}

TEST(CheckpointLayout, ConfigsInferredFromShapesAreTheTinyModels) {
  for (auto [file, dir] :
       {std::pair{formats("z_image_dit_comfy.safetensors"), "tiny-zimage/transformer"},
        std::pair{formats("ae.safetensors"), "tiny-zimage/vae"},
        std::pair{golden_path("tiny-zimage/text_encoder/model.safetensors"), "tiny-zimage/text_encoder"}}) {
    auto w = open_layout(file);
    Config inferred = infer_component_config(*w, file);
    Config ref = Config::load(golden_path(std::string(dir) + "/config.json"));
    for (const auto& [key, value] : inferred.json().items()) {
      if (!ref.json().contains(key)) continue;  // rope_theta: transformers 5 keeps it under rope_parameters
      EXPECT_EQ(value, ref.json()[key]) << file << ": " << key;
    }
  }
}

TEST(CheckpointLayout, Qwen3SingleFileWithOrWithoutModelPrefix) {
  Checkpoint ref = Checkpoint::open_dir(golden_path("tiny-zimage/text_encoder"));
  std::vector<std::pair<std::string, Tensor>> prefixed;
  for (const auto& n : ref.names()) prefixed.emplace_back("model." + n, ref.get(n));
  prefixed.emplace_back("lm_head.weight", ref.get("embed_tokens.weight"));
  const std::string path = temp_path("qwen3_causal_lm.safetensors");
  write_safetensors(path, prefixed);
  auto w = open_layout(path);
  EXPECT_EQ(w->layout().prefix, "model.");
  EXPECT_EQ(max_error_against(*w, "tiny-zimage/text_encoder"), 0.0);
}

TEST(CheckpointLayout, Qwen3GgufWithLlamaCppNames) {
  // The tiny text encoder as llama.cpp names it (convert_hf_to_gguf.py, architecture qwen3), in F32.
  Checkpoint ref = Checkpoint::open_dir(golden_path("tiny-zimage/text_encoder"));
  const std::pair<const char*, const char*> renames[] = {
      {"input_layernorm", "attn_norm"},    {"self_attn.q_proj", "attn_q"},
      {"self_attn.k_proj", "attn_k"},      {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"}, {"self_attn.q_norm", "attn_q_norm"},
      {"self_attn.k_norm", "attn_k_norm"}, {"post_attention_layernorm", "ffn_norm"},
      {"mlp.gate_proj", "ffn_gate"},       {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& n : ref.names()) {
    std::string g = n == "embed_tokens.weight" ? "token_embd.weight" : n == "norm.weight" ? "output_norm.weight" : n;
    if (g.rfind("layers.", 0) == 0) {
      g = "blk." + g.substr(7);
      for (auto [from, to] : renames)
        if (size_t at = g.find(from); at != std::string::npos) g.replace(at, std::string(from).size(), to);
    }
    tensors.emplace_back(g, ref.get(n).to_f32());
  }
  const std::string path = temp_path("qwen3.gguf");
  write_gguf(path, {{"general.architecture", "qwen3"}}, tensors);
  auto w = open_layout(path);
  EXPECT_STREQ(w->layout().name, "llama_cpp_qwen3");
  EXPECT_EQ(max_error_against(*w, "tiny-zimage/text_encoder"), 0.0);
  Config c = infer_component_config(*w, path);
  EXPECT_EQ(c.integer("num_key_value_heads"), 2);
  EXPECT_EQ(c.integer("num_hidden_layers"), 3);
}

TEST(CheckpointLayout, Fp8E5M2AndScaleMarkers) {
  // A plain e5m2 weight is its stored value.
  std::vector<float> v = {1.0f, -0.375f, 57344.0f, 0.0f};
  Tensor e5 = Tensor::empty({2, 2}, DType::F8E5M2);
  convert_from_f32(DType::F8E5M2, v.data(), e5.data(), 4);
  Tensor x = Tensor::zeros({64, 64}, DType::BF16);
  const std::string plain = temp_path("e5m2.safetensors");
  write_safetensors(plain, {{"x_embedder.weight", x}, {"layers.0.feed_forward.w1.weight", e5}});
  EXPECT_EQ(open_layout(plain)->get("layers.0.feed_forward.w1.weight", {2, 2}).to_vector(), v);
  // ComfyUI's scaled_fp8 marker or a _quantization_metadata entry: the weight needs its scale.
  const std::string marked = temp_path("marked.safetensors");
  write_safetensors(marked, {{"x_embedder.weight", x},
                             {"layers.0.feed_forward.w1.weight", e5},
                             {"scaled_fp8", Tensor::zeros({0}, DType::F8E4M3)}});
  expect_error(
      [&] {
        open_layout(marked)->get("layers.0.feed_forward.w1.weight", {2, 2});
      },
      ErrorKind::Format, {"marked.safetensors", "'layers.0.feed_forward.w1.weight'", "no scale"});
  const std::string meta = temp_path("quant_meta.safetensors");
  write_safetensors(
      meta,
      {{"x_embedder.weight", x},
       {"layers.0.feed_forward.w1.weight", e5},
       {"layers.0.feed_forward.w1.weight_scale", Tensor::from_f32({}, {2.0f})}},
      {{"_quantization_metadata",
        R"({"format_version": "1.0", "layers": {"layers.0.feed_forward.w1": {"format": "float8_e4m3fn"}}})"}});
  expect_error(
      [&] {
        open_layout(meta)->get("layers.0.feed_forward.w1.weight", {2, 2});
      },
      ErrorKind::Format, {"quant_meta.safetensors", "_quantization_metadata", "float8_e5m2"});
  // An integer weight is a quantization this engine does not know: an error, not garbage.
  const std::string int8 = temp_path("int8.safetensors");
  write_safetensors(int8,
                    {{"x_embedder.weight", x}, {"layers.0.feed_forward.w1.weight", Tensor::zeros({2, 2}, DType::U8)}});
  expect_error(
      [&] {
        open_layout(int8)->get("layers.0.feed_forward.w1.weight", {2, 2});
      },
      ErrorKind::Format, {"int8.safetensors", "'layers.0.feed_forward.w1.weight'", "u8"});
  EXPECT_EQ(f8e5m2_to_f32(0x3c), 1.0f);
  for (int b = 0; b < 256; ++b)
    if ((b & 0x7c) != 0x7c) {
      EXPECT_EQ(f32_to_f8e5m2(f8e5m2_to_f32(uint8_t(b))), b) << b;
    }
}

TEST(CheckpointLayout, Fp8ScaledIsValueTimesScaleExactly) {
  auto w = open_layout(formats("z_image_dit_fp8_scaled.safetensors"));
  auto raw = SafetensorsFile::open(formats("z_image_dit_fp8_scaled.safetensors"));
  int fp8 = 0;
  for (const auto& name : w->canonical_names()) {
    const std::string stored = w->stored_name(name);
    if (raw->entries().at(stored).dtype != DType::F8E4M3) continue;
    ++fp8;
    const std::string module = stored.substr(0, stored.size() - 7);
    const float scale = raw->get(module + ".weight_scale").to_f32().f32()[0];
    Tensor q = raw->get(stored);
    Tensor served = w->get(name, w->shape(name));
    const int64_t row0 = name.find(".to_k.") != std::string::npos   ? served.dim(0)
                         : name.find(".to_v.") != std::string::npos ? 2 * served.dim(0)
                                                                    : 0;
    const int64_t cols = served.dim(1);
    for (int64_t i = 0; i < served.numel(); ++i)
      ASSERT_EQ(served.f32()[i], f8e4m3_to_f32(q.data_as<uint8_t>()[row0 * cols + i]) * scale) << name;
  }
  // The stored form keeps the FP8 bytes and the scale apart; dequantizing it gives what get() serves.
  StoredWeight k = w->stored_weight("layers.1.attention.to_k.weight");
  EXPECT_EQ(k.data.dtype(), DType::F8E4M3);
  EXPECT_EQ(k.data.shape(), (Shape{64, 64}));
  ASSERT_EQ(k.scale.numel(), 1);
  EXPECT_EQ(k.scale.f32()[0], raw->get("model.diffusion_model.layers.1.attention.qkv.weight_scale").to_f32().f32()[0]);
  EXPECT_EQ(max_abs_diff(dequantize(k), w->get("layers.1.attention.to_k.weight", {64, 64})), 0.0);
  EXPECT_FALSE(w->stored_weight("layers.1.attention_norm1.weight").scale.defined());
  EXPECT_EQ(fp8, 3 * 8 + 7 + 1);  // 3 modulated blocks x (q, k, v, out, w1..3, adaLN), the context refiner, final adaLN
  // FP8 is within its rounding of the bf16 model.
  Checkpoint ref = Checkpoint::open_dir(golden_path("tiny-zimage/transformer"));
  for (const auto& name : ref.names()) {
    Tensor r = ref.get(name).to_f32();
    double peak = 0;
    for (float v : r.to_vector()) peak = std::max(peak, double(std::fabs(v)));
    EXPECT_LE(max_abs_diff(w->get(name, r.shape()), r), peak / 8 + 1e-6) << name;
  }
}

TEST(CheckpointLayout, Fp8PlainIsTheStoredValue) {
  auto w = open_layout(formats("z_image_dit_fp8_plain.safetensors"));
  auto raw = SafetensorsFile::open(formats("z_image_dit_fp8_plain.safetensors"));
  const std::string name = "layers.0.feed_forward.w2.weight";
  Tensor served = w->get(name, {64, 170});
  EXPECT_EQ(max_abs_diff(served, raw->get(w->stored_name(name)).to_f32()), 0.0);
}

TEST(CheckpointLayout, GgufDitMapsBackWithinItsQuantization) {
  for (auto [file, tol] :
       {std::pair{"z_image_dit_q8_0.gguf", 1.0 / 100}, std::pair{"z_image_dit_q4_0.gguf", 1.0 / 6}}) {
    auto w = open_layout(formats(file));
    EXPECT_STREQ(w->layout().name, "comfy_dit") << file;
    Checkpoint ref = Checkpoint::open_dir(golden_path("tiny-zimage/transformer"));
    EXPECT_EQ(w->canonical_names(), ref.names());
    for (const auto& name : ref.names()) {
      Tensor r = ref.get(name).to_f32();
      double peak = 0;
      for (float v : r.to_vector()) peak = std::max(peak, double(std::fabs(v)));
      EXPECT_LE(max_abs_diff(w->get(name, r.shape()), r), peak * tol + 1e-6) << file << " " << name;
    }
  }
}

TEST(CheckpointLayout, BadFilesGiveClearErrors) {
  // Not a layout this engine knows.
  const std::string odd = temp_path("odd.safetensors");
  write_safetensors(odd, {{"foo.weight", Tensor::zeros({2, 2}, DType::F32)}});
  expect_error([&] { detect_layout(*open_stored_tensors(odd)); }, ErrorKind::Format,
               {"odd.safetensors", "unknown checkpoint layout", "'foo.weight'"});
  // A VAE given as the diffusion model.
  ComponentFiles files{formats("ae.safetensors"), golden_path("tiny-zimage/text_encoder"), formats("ae.safetensors"),
                       ""};
  expect_error([&] { open_model("", files); }, ErrorKind::InvalidArgument,
               {"ae.safetensors", "holds a VAE", "not a diffusion model"});
  // Scaled FP8 with one scale missing.
  auto raw = SafetensorsFile::open(formats("z_image_dit_fp8_scaled.safetensors"));
  std::vector<std::pair<std::string, Tensor>> kept;
  const std::string dropped = "model.diffusion_model.layers.1.attention.out.weight_scale";
  for (const auto& [n, _] : raw->entries())
    if (n != dropped) kept.emplace_back(n, raw->get(n));
  const std::string noscale = temp_path("fp8_missing_scale.safetensors");
  write_safetensors(noscale, kept);
  auto w = open_layout(noscale);
  expect_error(
      [&] {
        w->get("layers.1.attention.to_out.0.weight", {64, 64});
      },
      ErrorKind::Format,
      {"fp8_missing_scale.safetensors", "'model.diffusion_model.layers.1.attention.out.weight'", "no scale"});
  // Truncated GGUF.
  std::vector<uint8_t> bytes(300000);
  FILE* f = std::fopen(formats("z_image_dit_q8_0.gguf").c_str(), "rb");
  ASSERT_TRUE(f);
  bytes.resize(std::fread(bytes.data(), 1, bytes.size(), f));
  std::fclose(f);
  expect_error([&] { GgufFile::from_bytes(bytes, "cut.gguf"); }, ErrorKind::Format, {"cut.gguf", "truncated GGUF"});
}

TEST(CheckpointFilesCli, Fp8ScaledTurboCaseThroughDiffusionModelFlag) {
  expect_case("fp8_scaled_turbo", "--model " + golden_path("tiny-zimage") + " --diffusion-model " +
                                      formats("z_image_dit_fp8_scaled.safetensors"));
}

TEST(CheckpointFilesCli, GgufQ8TurboCaseThroughDiffusionModelFlag) {
  expect_case("gguf_q8_0_turbo",
              "--model " + golden_path("tiny-zimage") + " --diffusion-model " + formats("z_image_dit_q8_0.gguf"));
}

TEST(CheckpointFilesCli, ThreeComponentFilesWithoutModelReproduceTheGoldenCase) {
  // No --model: ComfyUI DiT + Qwen3 file + BFL VAE, then the no-prefix DiT + the component folders;
  // both are the turbo_square golden case.
  const std::string sets[] = {
      "--diffusion-model " + formats("z_image_dit_comfy.safetensors") + " --text-encoder " +
          golden_path("tiny-zimage/text_encoder/model.safetensors") + " --vae " + formats("ae.safetensors"),
      "--diffusion-model " + formats("z_image_dit_comfy_noprefix.safetensors") + " --text-encoder " +
          golden_path("tiny-zimage/text_encoder") + " --vae " + golden_path("tiny-zimage/vae")};
  auto golden = SafetensorsFile::open(golden_path("cases/turbo_square/tensors.safetensors"));
  for (const auto& files : sets) {
    std::string png = temp_path("files.png"), lat = temp_path("files_latents.safetensors");
    ProcessResult r =
        run("generate " + files +
            " --prompt 'a cat holding a sign that says hello' --height 64 --width 64"
            " --num-inference-steps 4 --guidance-scale 0 --max-sequence-length 64 --seed 1 --generator-device cpu"
            " --backend cpu --output-path " +
            png + " --save-latents " + lat);
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_LE(max_abs_diff(SafetensorsFile::open(lat)->get("latents"), golden->get("output.latents")), 1e-3) << files;
    ImageU8 img = read_image(png);
    Tensor ref = golden->get("output.image_u8");
    int worst = 0;
    for (size_t i = 0; i < img.rgb.size(); ++i)
      worst = std::max(worst, std::abs(int(img.rgb[i]) - int(ref.data_as<uint8_t>()[i])));
    EXPECT_LE(worst, 1) << files;
  }
  // The recipe: --recipe, else the base model's for a file name without "turbo".
  for (auto [recipe, steps] : {std::pair{" --recipe turbo", 8}, std::pair{" --recipe base", 50}, std::pair{"", 50}}) {
    const std::string perf = temp_path("files_perf.json");
    ProcessResult r = run("generate " + sets[0] + recipe +
                          " --prompt x --height 32 --width 32 --guidance-scale 0 --max-sequence-length 16 --backend cpu"
                          " --output-path " +
                          temp_path("recipe.png") + " --perf-dump-path " + perf);
    ASSERT_EQ(r.code, 0) << r.out;
    std::ifstream in(perf);
    EXPECT_EQ(nlohmann::json::parse(in)["steps"], steps) << recipe;
  }
}

TEST(CheckpointFilesCli, BadComponentFlagsExitWithCode2) {
  ProcessResult r = run("generate --prompt x --vae " + formats("ae.safetensors") + " --backend cpu");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--diffusion-model"), std::string::npos) << r.out;
  r = run("generate --prompt x --model " + golden_path("tiny-zimage") + " --diffusion-model " +
          formats("ae.safetensors") + " --backend cpu");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("holds a VAE"), std::string::npos) << r.out;
  for (const char* cmd : {"serve", "bench"}) {
    r = run(std::string(cmd) + " --help");
    for (const char* flag : {"--diffusion-model", "--text-encoder", "--vae", "--recipe"})
      EXPECT_NE(r.out.find(flag), std::string::npos) << cmd << " " << flag;
  }
}
