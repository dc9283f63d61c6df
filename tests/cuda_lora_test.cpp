// LoRA on the CUDA backend (bf16): merged at load and per request against diffusers' float32 output
// (tests/golden/wave2), relative error <= 2e-2 on the final latents and PSNR >= 35 dB on the image, and a
// batch whose items carry different adapters against the same requests alone. Skipped, with a message,
// where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/lora.h"
#include "model/zimage_dit.h"
#include "pipeline/text_to_image.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_path;
using zimage::testing::rel_l2_error;

namespace {

double psnr_u8(const Tensor& a, const Tensor& b) {
  double mse = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    double d = double(a.data_as<uint8_t>()[i]) - double(b.data_as<uint8_t>()[i]);
    mse += d * d;
  }
  mse /= double(a.numel());
  return mse == 0 ? INFINITY : 10.0 * std::log10(255.0 * 255.0 / mse);
}

struct Case {
  nlohmann::json args;
  std::shared_ptr<SafetensorsFile> tensors;
};

Case load_case(const std::string& name) {
  const auto dir = std::filesystem::path(golden_path("wave2/cases")) / name;
  std::ifstream in(dir / "case.json");
  return {nlohmann::json::parse(in), SafetensorsFile::open((dir / "tensors.safetensors").string())};
}

GenerateRequest request_for(const Case& c) {
  GenerateRequest r;
  r.prompts = {c.args["prompt"].get<std::string>()};
  r.height = c.args["height"];
  r.width = c.args["width"];
  r.steps = c.args["steps"].get<int>();
  r.guidance = c.args["guidance_scale"].get<float>();
  r.max_sequence_length = c.args["max_sequence_length"];
  r.seed = c.args["seed"].get<uint64_t>();
  r.generator = GeneratorDevice::Cpu;
  return r;
}

std::vector<ScaledLora> adapters_for(const Case& c, const ModelSource& m) {
  if (!c.args.contains("lora")) return {};
  return {
      {std::make_shared<const LoraAdapter>(load_lora(golden_path("wave2/" + c.args["lora"]["file"].get<std::string>()),
                                                     ZImageDit::weight_specs(m.transformer))),
       c.args["lora"]["scale"].get<float>()}};
}

class CudaLora : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU on this machine: the CUDA LoRA tests run on the device";
    be_ = make_cuda_backend(0);
  }
  std::unique_ptr<Backend> be_;
};

const char* const kCases[] = {"lora_kohya", "lora_peft_scaled", "lora_none"};

}  // namespace

TEST_F(CudaLora, MergedAndRuntimeMatchDiffusers) {
  const ModelSource base = open_model(golden_path("tiny-zimage"));
  TextToImagePipeline runtime(*be_, base);
  for (const char* name : kCases) {
    const Case c = load_case(name);
    ModelSource merged_model = base;
    auto adapters = adapters_for(c, base);
    if (!adapters.empty())
      merged_model.transformer_weights = std::make_shared<LoraMergedWeights>(base.transformer_weights, adapters);
    TextToImagePipeline merged(*be_, merged_model);
    GenerateRequest r = request_for(c);
    const GenerateResult a = merged.generate(r);
    r.lora_groups = {{1, adapters}};
    const GenerateResult b = runtime.generate(r);
    const Tensor ref = c.tensors->get("output.latents"), ref_u8 = c.tensors->get("output.image_u8");
    const double ea = rel_l2_error(a.latents, ref), eb = rel_l2_error(b.latents, ref),
                 eab = rel_l2_error(b.latents, a.latents);
    std::printf("%-18s merged rel %.3g PSNR %.1f dB | runtime rel %.3g PSNR %.1f dB | runtime vs merged rel %.3g\n",
                name, ea, psnr_u8(a.images, ref_u8), eb, psnr_u8(b.images, ref_u8), eab);
    EXPECT_LE(ea, 2e-2) << name;
    EXPECT_LE(eb, 2e-2) << name;
    EXPECT_GE(psnr_u8(a.images, ref_u8), 35.0) << name;
    EXPECT_GE(psnr_u8(b.images, ref_u8), 35.0) << name;
  }
}

TEST_F(CudaLora, ItemsWithDifferentAdaptersShareABatch) {
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  TextToImagePipeline p(*be_, m);
  const Case kohya = load_case("lora_kohya"), none = load_case("lora_none"), peft = load_case("lora_peft_scaled");
  GenerateRequest r = request_for(none);
  r.prompts = {r.prompts[0], r.prompts[0], r.prompts[0]};
  r.noise_groups = {{1, r.seed}, {1, r.seed}, {1, r.seed}};
  r.lora_groups = {{1, adapters_for(kohya, m)}, {1, {}}, {1, adapters_for(peft, m)}};
  const GenerateResult batch = p.generate(r);
  const Case* refs[] = {&kohya, &none, &peft};
  for (int64_t i = 0; i < 3; ++i) {
    GenerateRequest alone = request_for(*refs[i]);
    alone.lora_groups = {{1, adapters_for(*refs[i], m)}};
    const double e_alone = rel_l2_error(batch.latents.narrow0(i, 1), p.generate(alone).latents);
    const double e_ref = rel_l2_error(batch.latents.narrow0(i, 1), refs[i]->tensors->get("output.latents"));
    std::printf("batch item %lld: rel error vs alone %.3g, vs diffusers %.3g\n", (long long)i, e_alone, e_ref);
    EXPECT_LE(e_alone, 1e-2);
    EXPECT_LE(e_ref, 2e-2);
  }
}
