// The golden cases through the CUDA backend (bf16): every recorded tensor within a relative error of
// 2e-2 and the decoded image at PSNR >= 35 dB against diffusers' float32 image; recorded CUDA graphs
// against eager steps. Skipped, with a message, where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/image.h"
#include "io/safetensors.h"
#include "model/fp8_linears.h"
#include "model/vae.h"
#include "model/zimage_controlnet.h"
#include "model/zimage_dit.h"
#include "pipeline/text_to_image.h"
#include "golden_requests.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_case_names;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::rel_l2_error;
using zimage::testing::stack_golden_items;

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

const std::map<std::string, uint64_t> kSeeds = {{"turbo_square", 1}, {"cfg_portrait", 2}, {"cfg_norm_trunc", 3}, {"batch2", 4}};

// The request of golden case `name` (case.json), with our seed and torch's CPU noise.
GenerateRequest golden_request(const std::string& name, uint64_t seed) {
  std::ifstream in(golden_path("cases/" + name + "/case.json"));
  auto a = nlohmann::json::parse(in);
  GenerateRequest r;
  r.prompts = a["prompt"].is_array() ? a["prompt"].get<std::vector<std::string>>()
                                     : std::vector<std::string>{a["prompt"].get<std::string>()};
  if (a.contains("negative_prompt") && !a["negative_prompt"].is_null()) r.negative_prompts = {a["negative_prompt"]};
  r.height = a["height"];
  r.width = a["width"];
  r.steps = a["steps"].get<int>();
  r.guidance = a["guidance_scale"].get<float>();
  if (a.contains("cfg_normalization") && !a["cfg_normalization"].is_boolean()) r.cfg_normalization = a["cfg_normalization"];
  if (a.contains("cfg_truncation")) r.cfg_truncation = a["cfg_truncation"];
  r.max_sequence_length = a["max_sequence_length"];
  r.seed = seed;
  r.generator = GeneratorDevice::Cpu;
  return r;
}

// Image-to-image and inpainting cases (tests/golden/wave2): case.json, input.png and mask.png.
GenerateRequest wave2_request(const std::string& name) {
  return zimage::testing::golden_case_request(golden_path("wave2/cases/" + name));
}

const char* const kWave2Cases[] = {"img2img_turbo", "img2img_cfg", "inpaint_full", "inpaint_partial"};

class CudaGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU on this machine: the CUDA golden tests run on the device";
    be_ = make_cuda_backend(0);
  }
  std::unique_ptr<Backend> be_;
};

}  // namespace

TEST_F(CudaGolden, DitCallsMatch) {
  ModelSource m = open_model(golden_path("tiny-zimage"));
  ZImageDit dit(*be_, m.transformer, *m.transformer_weights);
  for (const auto& [name, seed] : kSeeds) {
    auto f = SafetensorsFile::open(golden_path("cases/" + name + "/tensors.safetensors"));
    for (const std::string call : {"dit0.", "dit1."}) {
      Tensor t = f->get(call + "t");
      int64_t n = t.numel();
      std::vector<Tensor> caps;
      for (int64_t j = 0; j < n; ++j) caps.push_back(be_->upload(f->get(call + "cap." + std::to_string(j))));
      Tensor out = be_->to_host_f32(dit.forward(be_->upload(stack_golden_items(*f, call + "x.", n), DType::F32), t.to_vector(), caps));
      double err = rel_l2_error(out, stack_golden_items(*f, call + "out.", n));
      EXPECT_LE(err, 2e-2) << name << " " << call;
      std::printf("  %-16s %s rel err %.2e\n", name.c_str(), call.c_str(), err);
    }
  }
}

TEST_F(CudaGolden, VaeDecodeMatches) {
  ModelSource m = open_model(golden_path("tiny-zimage"));
  Vae vae(*be_, m.vae, *m.vae_weights);
  auto f = SafetensorsFile::open(golden_path("vae/tensors.safetensors"));
  Tensor out = be_->to_host_f32(be_->nhwc_to_nchw(vae.decode_raw(be_->upload(f->get("decode.in"), DType::F32))));
  double err = rel_l2_error(out, f->get("decode.out"));
  EXPECT_LE(err, 2e-2);
  std::printf("  vae decode rel err %.2e\n", err);
  Vae::Moments mo = vae.encode(be_->nchw_to_nhwc(be_->upload(f->get("encode.in"))));
  double em = rel_l2_error(be_->to_host_f32(mo.mean), f->get("encode.mean"));
  EXPECT_LE(em, 2e-2);
  std::printf("  vae encode mean rel err %.2e\n", em);
}

TEST_F(CudaGolden, EndToEndFromSeed) {
  TextToImagePipeline p(*be_, open_model(golden_path("tiny-zimage")));
  for (const auto& [name, seed] : kSeeds) {
    auto f = SafetensorsFile::open(golden_path("cases/" + name + "/tensors.safetensors"));
    const GenerateRequest r = golden_request(name, seed);
    auto embeds = p.encode_prompts(r.prompts, r.max_sequence_length);
    for (size_t i = 0; i < embeds.size(); ++i) {
      double e = rel_l2_error(be_->to_host_f32(embeds[i]), f->get("prompt_embeds." + std::to_string(i)));
      EXPECT_LE(e, 2e-2) << name;
      std::printf("  %-16s prompt_embeds.%zu rel err %.2e\n", name.c_str(), i, e);
    }
    GenerateResult res = p.generate(r);
    double le = rel_l2_error(res.latents, f->get("output.latents"));
    double ps = psnr_u8(res.images, f->get("output.image_u8"));
    EXPECT_LE(le, 2e-2) << name;
    EXPECT_GE(ps, 35.0) << name;
    std::printf("  %-16s final latents rel err %.2e, image PSNR %.1f dB\n", name.c_str(), le, ps);
  }
}

// Recorded CUDA graphs change nothing: every golden case (CFG truncation switching from the batch of
// two to one mid-loop included), generated three times in a row with graphs (DiT steps replay from the
// first generation on, the text encoder from the third), gives the latents of the eager pipeline bit
// for bit.
// The FP8 model too (its activation quantization and scaled GEMMs recorded with the rest).
TEST_F(CudaGolden, GraphedStepsEqualEagerSteps) {
  ModelSource plain = open_model(golden_path("tiny-zimage")), fp8 = plain;
  use_fp8_linears(fp8, Fp8Policy{});
  PipelineLimits with_graphs;
  with_graphs.cuda_graphs = true;
  for (const ModelSource* m : {&plain, &fp8}) {
    const char* kind = m == &fp8 ? "FP8" : "bf16";
    TextToImagePipeline graphed(*be_, *m, with_graphs), eager(*be_, *m);
    for (const auto& [name, seed] : kSeeds) {
      GenerateRequest r = golden_request(name, seed);
      r.steps = 5;  // more steps than recorded: steps 3-5 replay
      const Tensor want = eager.generate(r).latents;
      for (int round = 0; round < 3; ++round) {
        const double d = max_abs_diff(graphed.generate(r).latents, want);
        std::printf("  %-4s %-16s round %d: graphed vs eager latents max diff %.3g\n", kind, name.c_str(), round, d);
        EXPECT_EQ(d, 0.0) << kind << " " << name << " round " << round;
      }
    }
  }
}

// Image to image and inpainting on the device: the noised start latents, the final latents within 2e-2
// relative error and the image at >= 35 dB, as text to image; with --cuda-graphs the same bits as eager.
TEST_F(CudaGolden, ImageToImageCasesFromSeed) {
  ModelSource m = open_model(golden_path("tiny-zimage"));
  PipelineLimits with_graphs;
  with_graphs.cuda_graphs = true;
  TextToImagePipeline p(*be_, m), graphed(*be_, m, with_graphs);
  for (const char* name : kWave2Cases) {
    auto f = SafetensorsFile::open(golden_path(std::string("wave2/cases/") + name + "/tensors.safetensors"));
    const GenerateRequest r = p.resolve(wave2_request(name));
    const FlowMatchSchedule sched = flow_match_schedule(m.scheduler, *r.steps, (r.height / 16) * (r.width / 16));
    const int begin = strength_begin_index(*r.steps, *r.strength);
    const StartLatents start = p.make_start_latents(r, 1, sched.sigmas[size_t(begin)]);
    const double se = rel_l2_error(be_->to_host_f32(start.latents), f->get("rec.start_latents"));
    EXPECT_LE(se, 2e-2) << name;
    GenerateResult res = p.generate(r);
    const double le = rel_l2_error(res.latents, f->get("output.latents"));
    const double ps = psnr_u8(res.images, f->get("output.image_u8"));
    EXPECT_LE(le, 2e-2) << name;
    EXPECT_GE(ps, 35.0) << name;
    std::printf("  %-16s start latents rel err %.2e, final latents rel err %.2e, image PSNR %.1f dB\n", name, se, le,
                ps);
    for (int round = 0; round < 3; ++round)
      EXPECT_EQ(max_abs_diff(graphed.generate(r).latents, res.latents), 0.0) << name << " graphed round " << round;
  }
}

// The ControlNet cases (tests/golden/wave3) on CUDA in bf16: v2 ControlNet with CFG, and ControlNet
// inpainting (the v1 case's refiner weights are not in its file: controlnet_test.cpp says why).
TEST_F(CudaGolden, ControlNetCasesFromSeed) {
  for (const char* name : {"cn_v2_cfg", "cn_v2_inpaint"}) {
    const std::string dir = golden_path(std::string("wave3/cases/") + name);
    std::ifstream in(dir + "/case.json");
    const nlohmann::json a = nlohmann::json::parse(in);
    ModelSource m = open_model(golden_path("tiny-zimage"));
    const std::string cn = golden_path("wave3/controlnet_" + a["controlnet"].get<std::string>());
    attach_controlnet(m, cn + ".safetensors", cn + ".json");
    TextToImagePipeline p(*be_, m);
    const GenerateRequest r = zimage::testing::golden_case_request(dir);
    auto f = SafetensorsFile::open(dir + "/tensors.safetensors");
    const GenerateResult res = p.generate(r);
    const double le = rel_l2_error(res.latents, f->get("output.latents"));
    const double ps = psnr_u8(res.images, f->get("output.image_u8"));
    EXPECT_LE(le, 2e-2) << name;
    EXPECT_GE(ps, 35.0) << name;
    std::printf("  %-16s final latents rel err %.2e, image PSNR %.1f dB\n", name, le, ps);
  }
}

// --quantization fp8 on the GPU: the tiny model's FP8 linears (its attention projections and a ControlNet's
// blocks; its FFN's 170 columns stay bf16) through cuBLASLt's e4m3 GEMM, against the CPU's FP8 reference and
// the float32 model. The bound is the CPU FP8 path's own (fp8_test): e4m3 rounding, not the GPU, sets it.
TEST_F(CudaGolden, Fp8CasesNearTheCpuReference) {
  auto cpu = make_cpu_backend();
  for (const char* name : {"wave2/cases/lora_none", "wave2/cases/img2img_cfg", "wave3/cases/cn_v2_cfg"}) {
    ModelSource m = open_model(golden_path("tiny-zimage"));
    if (std::string(name).find("cn_") != std::string::npos)
      attach_controlnet(m, golden_path("wave3/controlnet_union_v2.safetensors"),
                        golden_path("wave3/controlnet_union_v2.json"));
    ModelSource fp8 = m;
    use_fp8_linears(fp8, Fp8Policy{});
    const GenerateRequest r = zimage::testing::golden_case_request(golden_path(name));
    TextToImagePipeline gpu_fp8(*be_, fp8), cpu_fp8(*cpu, fp8), cpu_f32(*cpu, m);
    const GenerateResult g = gpu_fp8.generate(r), c8 = cpu_fp8.generate(r), c32 = cpu_f32.generate(r);
    const double vs_fp8 = rel_l2_error(g.latents, c8.latents), vs_f32 = rel_l2_error(g.latents, c32.latents);
    std::printf("  %-24s CUDA FP8: final latents vs CPU FP8 %.2e, vs float32 %.2e (CPU FP8 vs float32 %.2e), image "
                "PSNR vs float32 %.1f dB\n",
                name, vs_fp8, vs_f32, rel_l2_error(c8.latents, c32.latents), psnr_u8(g.images, c32.images));
    EXPECT_LE(vs_f32, 0.08) << name;
    EXPECT_LE(vs_fp8, 0.08) << name;
  }
}
