#include "pipeline/text_to_image.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "parallel/local_communicator.h"
#include "pipeline/flow_match_scheduler.h"
#include "pipeline/multi_gpu_pipeline.h"
#include "simulated_ranks.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::parallel;
using zimage::testing::expect_images_match;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;

namespace {

struct GoldenCase {
  std::string name;
  nlohmann::json args;
  std::shared_ptr<SafetensorsFile> tensors;
};

std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> out;
  for (const auto& e : std::filesystem::directory_iterator(golden_path("cases"))) {
    GoldenCase c;
    c.name = e.path().filename();
    std::ifstream in(e.path() / "case.json");
    c.args = nlohmann::json::parse(in);
    c.tensors = SafetensorsFile::open((e.path() / "tensors.safetensors").string());
    out.push_back(std::move(c));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

const std::map<std::string, uint64_t> kSeeds = {{"turbo_square", 1}, {"cfg_portrait", 2}, {"cfg_norm_trunc", 3}, {"batch2", 4}};

GenerateRequest request_for(const GoldenCase& c) {
  GenerateRequest r;
  const auto& a = c.args;
  if (a["prompt"].is_array()) r.prompts = a["prompt"].get<std::vector<std::string>>();
  else r.prompts = {a["prompt"].get<std::string>()};
  if (a.contains("negative_prompt") && !a["negative_prompt"].is_null()) r.negative_prompts = {a["negative_prompt"].get<std::string>()};
  r.height = a["height"];
  r.width = a["width"];
  r.steps = a["steps"].get<int>();
  r.guidance = a["guidance_scale"].get<float>();
  // case.json writes cfg_normalization as false or a number, as the diffusers call received it.
  if (a.contains("cfg_normalization")) r.cfg_normalization = a["cfg_normalization"].is_boolean() ? 0.0f : a["cfg_normalization"].get<float>();
  if (a.contains("cfg_truncation")) r.cfg_truncation = a["cfg_truncation"].get<float>();
  r.max_sequence_length = a["max_sequence_length"];
  r.seed = kSeeds.at(c.name);
  r.generator = GeneratorDevice::Cpu;
  return r;
}

TextToImagePipeline& tiny_pipeline() {
  static auto be = make_cpu_backend();
  static TextToImagePipeline p(*be, open_model(golden_path("tiny-zimage")));
  return p;
}

}  // namespace

TEST(FlowMatchScheduler, MatchesGoldenSigmasAndTimesteps) {
  Config sched = Config::load(golden_path("tiny-zimage/scheduler/scheduler_config.json"));
  for (const auto& c : golden_cases()) {
    FlowMatchSchedule s = flow_match_schedule(sched, c.args["steps"].get<int>(), 16);
    EXPECT_LE(max_abs_diff(Tensor::from_f32({int64_t(s.sigmas.size())}, s.sigmas), c.tensors->get("scheduler.sigmas")), 1e-6);
    EXPECT_LE(max_abs_diff(Tensor::from_f32({int64_t(s.timesteps.size())}, s.timesteps), c.tensors->get("scheduler.timesteps")),
              1e-4);
    // The DiT time input of the first two calls.
    EXPECT_NEAR(s.dit_time(0), c.tensors->get("dit0.t").to_vector()[0], 1e-6) << c.name;
    EXPECT_NEAR(s.dit_time(1), c.tensors->get("dit1.t").to_vector()[0], 1e-6) << c.name;
  }
}

// A stranger's scheduler config whose shift settings make sigmas that are not numbers or leave (0, 1]:
// refused when the schedule is made, not discovered as a black image.
TEST(FlowMatchScheduler, RefusesShiftsThatBreakTheSigmas) {
  for (const char* bad : {R"({"shift": 0})", R"({"shift": -1.0})",
                          R"({"use_dynamic_shifting": true, "base_image_seq_len": 256, "max_image_seq_len": 256})",
                          R"({"use_dynamic_shifting": true, "max_shift": 1e300})", R"({"num_train_timesteps": 0})"}) {
    SCOPED_TRACE(bad);
    zimage::testing::expect_error([&] { flow_match_schedule(Config::parse(bad, "scheduler_config.json"), 9, 4096); },
                                  ErrorKind::Format, {"scheduler_config.json"});
  }
}

TEST(FlowMatchScheduler, NineStepTurboSchedule) {
  Config sched = Config::parse(R"({"shift": 3.0, "num_train_timesteps": 1000})", "test");
  FlowMatchSchedule s = flow_match_schedule(sched, 9, 4096);
  ASSERT_EQ(s.sigmas.size(), 10u);
  EXPECT_FLOAT_EQ(s.sigmas[0], 1.0f);
  EXPECT_FLOAT_EQ(s.sigmas[9], 0.0f);
  // s = 1/9 shifted by 3: 3*(1/9) / (1 + 2/9) = 3/11.
  EXPECT_NEAR(s.sigmas[8], 3.0 / 11.0, 1e-6);
  EXPECT_NEAR(s.timesteps[8], 3000.0 / 11.0, 1e-3);
}

// Every golden case end to end from its seed alone: prompt embeddings, final latents and the uint8 image.
TEST(TextToImage, GoldenCasesEndToEnd) {
  auto& p = tiny_pipeline();
  for (const auto& c : golden_cases()) {
    GenerateRequest r = request_for(c);
    // Prompt embeddings (and negative ones for CFG cases).
    auto embeds = p.encode_prompts(r.prompts, r.max_sequence_length);
    for (size_t i = 0; i < embeds.size(); ++i)
      EXPECT_LE(max_abs_diff(p.backend().to_host_f32(embeds[i]), c.tensors->get("prompt_embeds." + std::to_string(i))), 1e-4)
          << c.name;
    if (*r.guidance > 0) {
      auto neg = p.encode_prompts(r.negative_prompts.empty() ? std::vector<std::string>{""} : r.negative_prompts,
                                  r.max_sequence_length);
      EXPECT_LE(max_abs_diff(p.backend().to_host_f32(neg[0]), c.tensors->get("negative_prompt_embeds.0")), 1e-4) << c.name;
    }
    // Noise from the seed equals the recorded starting latents (the first DiT input).
    int64_t b = int64_t(r.prompts.size());
    Tensor noise = torch_randn({b, 16, r.height / 8, r.width / 8}, r.seed, GeneratorDevice::Cpu);
    EXPECT_LE(max_abs_diff(noise, c.tensors->get("input.latents")), 1e-6) << c.name;

    GenerateResult res = p.generate(r);
    double lat_err = max_abs_diff(res.latents, c.tensors->get("output.latents"));
    EXPECT_LE(lat_err, 1e-3) << c.name;
    std::printf("%-16s final latents max abs error %.3g, %.0f ms\n", c.name.c_str(), lat_err, res.times.total_ms);
    expect_images_match(res.images, c.tensors->get("output.image_u8"), c.name);
  }
}

TEST(TextToImage, CfgTruncationDropsGuidanceLateInTheSchedule) {
  // With truncation 0 every step has t_norm > 0 except none: guidance never applies, so the result
  // equals the guidance-free run with the same seed.
  auto& p = tiny_pipeline();
  GenerateRequest r;
  r.prompts = {"a lighthouse"};
  r.height = r.width = 32;
  r.steps = 3;
  r.seed = 7;
  r.generator = GeneratorDevice::Cpu;
  r.guidance = 0.0f;
  GenerateResult plain = p.generate(r);
  r.guidance = 4.0f;
  r.cfg_truncation = -0.5f;  // below every t_norm (t_norm >= 0): all steps truncated
  GenerateResult truncated = p.generate(r);
  EXPECT_EQ(max_abs_diff(plain.latents, truncated.latents), 0.0);
  r.cfg_truncation = 1.0f;  // never truncated: guidance changes the result
  GenerateResult guided = p.generate(r);
  EXPECT_GT(max_abs_diff(plain.latents, guided.latents), 1e-3);
}

TEST(CfgEulerStep, NormalizationCapsTheGuidedNorm) {
  auto be = make_cpu_backend();
  // One sample of 2 values: pos = (3, 4) (norm 5), neg = (0, 0); g = 1 -> pred = (6, 8) (norm 10).
  Tensor lat = Tensor::from_f32({1, 2}, {0, 0});
  Tensor out = Tensor::from_f32({2, 2}, {3, 4, 0, 0});
  be->cfg_euler_step_(lat, out, 1.0f, 0.0f, -1.0f);  // no normalization: latents = -dt * pred... = pred
  EXPECT_EQ(lat.to_vector(), (std::vector<float>{6, 8}));
  lat = Tensor::from_f32({1, 2}, {0, 0});
  be->cfg_euler_step_(lat, out, 1.0f, 1.2f, -1.0f);  // cap at 1.2 * 5 = 6: pred scaled by 0.6
  EXPECT_NEAR(lat.to_vector()[0], 3.6, 1e-6);
  EXPECT_NEAR(lat.to_vector()[1], 4.8, 1e-6);
  lat = Tensor::from_f32({1, 2}, {1, 1});
  be->cfg_euler_step_(lat, out, 1.0f, 3.0f, 0.5f);  // cap 15 > 10: untouched; latents += 0.5 * -pred
  EXPECT_EQ(lat.to_vector(), (std::vector<float>{-2, -3}));
}

TEST(TextToImage, RejectsBadRequests) {
  auto& p = tiny_pipeline();
  auto expect_invalid = [&](GenerateRequest r, const std::string& fragment) {
    r.prompts = r.prompts.empty() ? std::vector<std::string>{"x"} : r.prompts;
    zimage::testing::expect_error([&] { p.resolve(r); }, ErrorKind::InvalidArgument, {fragment});
  };
  GenerateRequest r;
  r.height = 1000;
  expect_invalid(r, "height 1000 is not a multiple of 16 (nearest valid: 992 or 1008)");
  r = {};
  r.width = 8;
  expect_invalid(r, "nearest valid: 16");
  r = {};
  r.height = 0;
  expect_invalid(r, "must be positive");
  r = {};
  r.width = -16;
  expect_invalid(r, "must be positive");
  r = {};
  r.height = r.width = 4096;
  expect_invalid(r, "above the maximum");
  r = {};
  r.steps = 0;
  expect_invalid(r, "at least 1");
  r = {};
  r.guidance = -1.0f;
  expect_invalid(r, "guidance_scale must be >= 0");
  r = {};
  r.prompts = {"a", "b"};
  r.negative_prompts = {"x", "y", "z"};
  expect_invalid(r, "negative prompts");
  r = {};
  r.prompts = {std::string(kMaxPromptBytes + 1, 'a')};
  expect_invalid(r, "prompt is 65537 bytes, above the limit of 65536 bytes");
  r = {};
  r.negative_prompts = {std::string("a\0b", 3)};
  expect_invalid(r, "negative prompt contains a NUL character");
}

// A batch made of independent requests (one noise group each) gives every request the images it gets
// alone: what the server's dynamic batching relies on.
TEST(TextToImage, NoiseGroupsMakeBatchedRequestsEqualAlone) {
  auto& p = tiny_pipeline();
  GenerateRequest a;
  a.prompts = {"a red apple"};
  a.height = 32;
  a.width = 48;
  a.steps = 2;
  a.guidance = 2.0f;
  a.seed = 11;
  a.num_images_per_prompt = 2;
  a.generator = GeneratorDevice::Cpu;
  GenerateRequest b = a;
  b.prompts = {"a much longer prompt about a quiet harbour at dawn with fishing boats"};
  b.negative_prompts = {"blurry"};
  b.seed = 12;
  GenerateResult ra = p.generate(a), rb = p.generate(b);

  GenerateRequest both = a;
  both.prompts = {a.prompts[0], a.prompts[0], b.prompts[0], b.prompts[0]};
  both.negative_prompts = {"", "", "blurry", "blurry"};
  both.num_images_per_prompt = 1;
  both.noise_groups = {{2, 11}, {2, 12}};
  GenerateResult rab = p.generate(both);
  int64_t per = ra.latents.numel();
  Tensor first = rab.latents.narrow0(0, 2), second = rab.latents.narrow0(2, 2);
  EXPECT_LE(max_abs_diff(first, ra.latents), 1e-5);
  EXPECT_LE(max_abs_diff(second, rb.latents), 1e-5);
  EXPECT_EQ(per * 2, rab.latents.numel());
}

namespace {

// N ranks of the tiny model simulated on CPU backends.
struct TinyRanks : zimage::testing::SimulatedRanks {
  explicit TinyRanks(const ParallelConfig& c, const ModelSource& model = open_model(golden_path("tiny-zimage")))
      : SimulatedRanks(c, model) {}
};

// A prompt at a size whose patch grid splits unevenly, with CFG.
GenerateRequest uneven_request(int w, int h) {
  GenerateRequest r;
  r.prompts = {"a red bicycle leaning on a wall"};
  r.width = w;
  r.height = h;
  r.steps = 2;
  r.guidance = 3.0f;
  r.seed = 11;
  r.generator = GeneratorDevice::Cpu;
  return r;
}

}  // namespace

// Every golden case (CFG with normalization and truncation, portrait, a batch of two) on 2 Ulysses
// ranks, on a CFG pair, and on both (4 ranks): the same latents and images as one rank.
TEST(MultiGpuPipeline, GoldenCasesMatchOneRank) {
  auto& single = tiny_pipeline();
  for (const ParallelConfig& c : {parallel(2, false), parallel(1, true), parallel(2, true)}) {
    TinyRanks ranks(c);
    for (const auto& gc : golden_cases()) {
      GenerateRequest r = request_for(gc);
      GenerateResult want = single.generate(r);
      GenerateResult got = ranks.pipeline->generate(r);
      double err = max_abs_diff(got.latents, want.latents);
      EXPECT_LE(err, 1e-5) << gc.name << " U=" << c.ulysses_degree << " cfg=" << c.cfg_parallel;
      std::printf("%-16s U=%d cfg-parallel=%d: final latents max abs diff to one rank %.3g\n", gc.name.c_str(),
                  c.ulysses_degree, int(c.cfg_parallel), err);
      expect_images_match(got.images, want.images, gc.name);
    }
  }
}

// Sizes whose patch grid does not split evenly: portrait 112x208 (grid 7x13: H is split 4/3), its
// transpose, and a square with an odd grid (7x7), with CFG.
TEST(MultiGpuPipeline, UnevenShardsMatchOneRank) {
  auto& single = tiny_pipeline();
  TinyRanks ranks(parallel(2, true));
  for (auto [w, h] : {std::pair{112, 208}, std::pair{208, 112}, std::pair{112, 112}}) {
    const GenerateRequest r = uneven_request(w, h);
    GenerateResult want = single.generate(r), got = ranks.pipeline->generate(r);
    double err = max_abs_diff(got.latents, want.latents);
    EXPECT_LE(err, 1e-5) << w << "x" << h;
    std::printf("%dx%d U=2 cfg-parallel: final latents max abs diff to one rank %.3g\n", w, h, err);
    expect_images_match(got.images, want.images, std::to_string(w) + "x" + std::to_string(h));
  }
}

// Ulysses x ring (USP) on 4 and 8 simulated ranks: U=2 x R=2, U=1 x R=4, U=2 x R=4, and U=2 x R=2 with
// CFG-parallel, every golden case (CFG on and off, portrait, a batch; on 4 shards: their grids are too small
// for 8) and grids that split unevenly (portrait and landscape, 7x13 patches over 4 and 8 shards, with
// CFG): the one-rank latents within 1e-5. An image too small for the shards is refused before the ranks run.
TEST(MultiGpuPipeline, UlyssesTimesRingMatchesOneRank) {
  auto& single = tiny_pipeline();
  for (const ParallelConfig& c : {parallel(2, false, 2), parallel(1, false, 4), parallel(2, false, 4),
                                  parallel(2, true, 2)}) {
    TinyRanks ranks(c);
    std::vector<std::pair<std::string, GenerateRequest>> requests;
    // The golden images (at most 6 patches a side) split over 4 shards; 8 shards need the larger grids.
    if (c.sequence_degree() <= 4)
      for (const auto& gc : golden_cases()) requests.emplace_back(gc.name, request_for(gc));
    for (auto [w, h] : {std::pair{112, 208}, std::pair{208, 112}})
      requests.emplace_back(std::to_string(w) + "x" + std::to_string(h), uneven_request(w, h));
    for (const auto& [name, r] : requests) {
      GenerateResult want = single.generate(r), got = ranks.pipeline->generate(r);
      const double err = max_abs_diff(got.latents, want.latents);
      EXPECT_LE(err, 1e-5) << name << " U=" << c.ulysses_degree << " R=" << c.ring_degree << " cfg=" << c.cfg_parallel;
      std::printf("%-16s U=%d R=%d cfg-parallel=%d: final latents max abs diff to one rank %.3g\n", name.c_str(),
                  c.ulysses_degree, c.ring_degree, int(c.cfg_parallel), err);
    }
    if (c.sequence_degree() == 8) {
      GenerateRequest small = request_for(golden_cases()[0]);
      zimage::testing::expect_error([&] { ranks.pipeline->resolve(small); }, ErrorKind::InvalidArgument,
                                    {"too small to split over 8 GPUs"});
    }
  }
}

// A bad request is refused before any rank starts, and the ranks still work afterwards.
TEST(MultiGpuPipeline, BadRequestLeavesTheRanksUsable) {
  TinyRanks ranks(parallel(2, false));
  GenerateRequest r;
  r.prompts = {"x"};
  r.width = r.height = 40;  // not a multiple of 16
  EXPECT_THROW(ranks.pipeline->generate(r), Error);
  r.width = r.height = 32;
  r.steps = 1;
  GenerateResult ok = ranks.pipeline->generate(r);
  EXPECT_EQ(ok.images.shape(), (Shape{1, 32, 32, 3}));
}

// Low-memory mode streams the text encoder's layers per prompt: the same computation, the same image.
TEST(TextToImage, LowMemoryModeGivesTheSameImage) {
  auto be = make_cpu_backend();
  PipelineLimits low;
  low.low_memory = true;
  TextToImagePipeline streamed(*be, open_model(golden_path("tiny-zimage")), low);
  GenerateRequest r;
  r.prompts = {"a lighthouse on a cliff"};
  r.height = r.width = 32;
  r.steps = 2;
  r.guidance = 2.0f;
  r.seed = 5;
  r.generator = GeneratorDevice::Cpu;
  GenerateResult want = tiny_pipeline().generate(r), got = streamed.generate(r);
  EXPECT_EQ(max_abs_diff(got.latents, want.latents), 0.0);
}

namespace {

GenerateRequest small_request(float guidance = 2.0f) {
  GenerateRequest r;
  r.prompts = {"a lighthouse on a cliff"};
  r.height = r.width = 32;
  r.steps = 3;
  r.guidance = guidance;
  r.seed = 5;
  r.generator = GeneratorDevice::Cpu;
  return r;
}

// The stage the numerical guard names for `r` on `pipe`, with its message; "" when nothing threw.
std::pair<std::string, std::string> non_finite_stage(ImageGenerator& pipe, const GenerateRequest& r) {
  try {
    pipe.generate(r);
  } catch (const NonFiniteError& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Numerical);
    return {e.stage(), e.what()};
  }
  return {"", ""};
}

}  // namespace

TEST(NumericalGuards, CpuCountsNaNAndInfIntoTheSlot) {
  auto be = make_cpu_backend();
  Tensor x = Tensor::zeros({4, 5}, DType::F32);
  x.f32()[0] = std::numeric_limits<float>::quiet_NaN();
  x.f32()[7] = std::numeric_limits<float>::infinity();
  x.f32()[19] = -std::numeric_limits<float>::infinity();
  x.f32()[3] = std::numeric_limits<float>::max();
  Tensor counts = Tensor::zeros({2}, DType::I32);
  be->count_non_finite(x, counts, 1);
  be->count_non_finite(x.narrow0(1, 2), counts, 1);  // rows 1-2 hold index 7 only
  EXPECT_EQ(counts.to_f32().to_vector(), (std::vector<float>{0, 4}));
}

// A good generation counts no NaN/Inf anywhere; a damaged weight in each model fails the request with
// an error naming the stage that produced the NaN, instead of returning a black image.
TEST(NumericalGuards, NameTheStageThatProducedNaN) {
  GenerateResult ok = tiny_pipeline().generate(small_request());
  EXPECT_EQ(ok.non_finite.prompt_embeddings, 0);
  EXPECT_EQ(ok.non_finite.latents, std::vector<int64_t>(3, 0));
  EXPECT_EQ(ok.non_finite.image, 0);

  struct Damage {
    std::shared_ptr<WeightSource> ModelSource::*weights;
    std::string tensor, stage, message;
  };
  // Every value of the prompt's and the (empty) negative prompt's embeddings, every latent, every pixel.
  int64_t embedding_values = 0;
  for (const Tensor& e : tiny_pipeline().encode_prompts({"a lighthouse on a cliff", ""}, 512))
    embedding_values += e.numel();
  for (const Damage& d : {Damage{&ModelSource::text_encoder_weights, "layers.0.mlp.down_proj.weight", "text_encoder",
                                 "the text encoder produced " + std::to_string(embedding_values) +
                                     " NaN/Inf values in the prompt embeddings"},
                          Damage{&ModelSource::transformer_weights, "all_final_layer.2-1.linear.bias", "denoise",
                                 "denoising produced 256 NaN/Inf values in the latents at step 1 of 3"},
                          Damage{&ModelSource::vae_weights, "decoder.conv_out.bias", "vae_decode",
                                 "the VAE decoder produced 3072 NaN/Inf values in the image"}}) {
    ModelSource model = open_model(golden_path("tiny-zimage"));
    model.*d.weights = zimage::testing::with_nan_tensor(model.*d.weights, d.tensor);
    auto be = make_cpu_backend();
    TextToImagePipeline damaged(*be, model);
    auto [stage, message] = non_finite_stage(damaged, small_request());
    EXPECT_EQ(stage, d.stage) << d.tensor;
    EXPECT_NE(message.find(d.message), std::string::npos) << message;
    // The result without the check carries the counts behind the error.
    GenerateResult counted = damaged.generate_unchecked(small_request());
    EXPECT_GT(counted.non_finite.prompt_embeddings + counted.non_finite.latents[0] + counted.non_finite.image, 0);
  }
}

// On simulated ranks the error comes from the caller's thread, not from a rank: the ranks are not
// torn down, and the next request gets the same clear error.
TEST(NumericalGuards, SimulatedRanksReportTheStageAndGoOn) {
  ModelSource model = open_model(golden_path("tiny-zimage"));
  model.transformer_weights =
      zimage::testing::with_nan_tensor(model.transformer_weights, "all_final_layer.2-1.linear.bias");
  TinyRanks ranks(parallel(2, true), model);
  for (int i = 0; i < 2; ++i) EXPECT_EQ(non_finite_stage(*ranks.pipeline, small_request()).first, "denoise") << i;
}

// A NaN image from huge but finite latents (an enormous guidance_scale overflows the VAE's bf16 math on
// the GPU) says so, instead of blaming the VAE's weights.
TEST(NumericalGuards, HugeLatentsAreNamedAsTheCause) {
  NonFiniteCounts c;
  c.latents = {0, 0};
  c.image = 12288;
  c.latents_max_abs = 3.1e37f;
  zimage::testing::expect_error([&] { check_finite(c); }, ErrorKind::Numerical,
                                {"12288 NaN/Inf values in the image", "reach 3.1e+37 in magnitude", "guidance_scale"});
  c.latents_max_abs = 3.5f;
  zimage::testing::expect_error([&] { check_finite(c); }, ErrorKind::Numerical, {"weights intact"});
  c.image = 0;
  check_finite(c);  // nothing non-finite: no error
}
