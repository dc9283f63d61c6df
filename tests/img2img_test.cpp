// Image to image and inpainting on the CPU reference against diffusers' ZImageImg2ImgPipeline and
// ZImageInpaintPipeline (tests/golden/wave2): every random draw, the strength cut, the noised start, the
// final latents and the image; then the preprocessing (PIL's Lanczos resize, mask binarization) and bad input.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/image.h"
#include "io/safetensors.h"
#include "parallel/local_communicator.h"
#include "pipeline/denoise.h"
#include "pipeline/image_processor.h"
#include "pipeline/multi_gpu_pipeline.h"
#include "pipeline/text_to_image.h"
#include "golden_requests.h"
#include "simulated_ranks.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_images_match;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;

namespace {

const char* const kCases[] = {"img2img_turbo", "img2img_cfg", "inpaint_full", "inpaint_partial"};

struct Wave2Case {
  std::string name;
  nlohmann::json args;
  std::shared_ptr<SafetensorsFile> tensors;
  std::string dir;
};

Wave2Case load_case(const std::string& name) {
  Wave2Case c;
  c.name = name;
  c.dir = golden_path("wave2/cases/" + name);
  std::ifstream in(c.dir + "/case.json");
  c.args = nlohmann::json::parse(in);
  c.tensors = SafetensorsFile::open(c.dir + "/tensors.safetensors");
  return c;
}

GenerateRequest request_for(const Wave2Case& c) { return zimage::testing::golden_case_request(c.dir); }

TextToImagePipeline& tiny_pipeline() {
  static auto be = make_cpu_backend();
  static TextToImagePipeline p(*be, open_model(golden_path("tiny-zimage")));
  return p;
}

// DiT-space latents back to what diffusers' retrieve_latents returned: z / scale + shift.
Tensor raw_vae_sample(Vae& vae, const Tensor& latents) {
  Tensor raw = Tensor::empty(latents.shape(), DType::F32);
  for (int64_t i = 0; i < raw.numel(); ++i) raw.f32()[i] = latents.f32()[i] / vae.scaling_factor() + vae.shift_factor();
  return raw;
}

ImageU8 pattern(int w, int h) {  // the same formula as the PIL script that made the expected values
  ImageU8 im;
  im.width = w;
  im.height = h;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) im.rgb.push_back(uint8_t((x * 37 + y * 91 + c * 53 + (x * y) % 7 * 29) % 256));
  return im;
}

std::pair<int64_t, int64_t> checksum(const std::vector<uint8_t>& v) {
  int64_t sum = 0, weighted = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    sum += v[i];
    weighted += int64_t(v[i]) * int64_t(i % 251 + 1);
  }
  return {sum, weighted};
}

ImageU8 solid(int w, int h, uint8_t v) {
  ImageU8 im;
  im.width = w;
  im.height = h;
  im.rgb.assign(size_t(w) * size_t(h) * 3, v);
  return im;
}

}  // namespace

// Each stage of every case: the strength cut (timesteps run, start timestep), the VAE posterior's draws
// and the noise from one generator in diffusers' order, the noised start latents.
TEST(ImageToImage, GoldenDrawsAndStartLatents) {
  auto& p = tiny_pipeline();
  Backend& be = p.backend();
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    const Wave2Case c = load_case(name);
    const GenerateRequest r = p.resolve(request_for(c));
    // The decoded input is the recorded one.
    EXPECT_EQ(image_to_tensor(r.images[0]).to_vector(), c.tensors->get("input.image_u8").to_vector());

    const int steps = *r.steps;
    const FlowMatchSchedule sched = flow_match_schedule(p.model().scheduler, steps, (r.height / 16) * (r.width / 16));
    const int begin = strength_begin_index(steps, *r.strength);
    const std::vector<float> run(sched.timesteps.begin() + begin, sched.timesteps.end());
    EXPECT_LE(max_abs_diff(Tensor::from_f32({int64_t(run.size())}, run), c.tensors->get("scheduler.timesteps_run")),
              1e-3);
    EXPECT_NEAR(sched.timesteps[size_t(begin)], c.tensors->get("rec.start_timestep").to_vector()[0], 1e-3);

    const StartLatents start = p.make_start_latents(r, 1, sched.sigmas[size_t(begin)]);
    const double draw_err =
        max_abs_diff(raw_vae_sample(p.vae(), be.to_host_f32(start.image_latents)), c.tensors->get("rec.vae_latents.0"));
    const double start_err = max_abs_diff(be.to_host_f32(start.latents), c.tensors->get("rec.start_latents"));
    EXPECT_LE(draw_err, 1e-4);
    EXPECT_LE(start_err, 1e-4);

    // The noise is the generator's second draw, bit for bit.
    TorchGenerator gen(r.seed, GeneratorDevice::Cpu);
    const Tensor eps = gen.randn(start.image_latents.shape());
    const Tensor noise = gen.randn(start.latents.shape());
    EXPECT_EQ(noise.to_vector(), c.tensors->get("rec.noise.0").to_vector());
    std::printf("%-16s vae draw max err %.3g, start latents max err %.3g, begin %d of %d\n", name, draw_err, start_err,
                begin, steps);

    if (!r.masks.empty()) {
      ASSERT_TRUE(start.blend.has_value());
      EXPECT_EQ(be.to_host_f32(start.blend->noise).to_vector(), noise.to_vector());
      // The masked image's draw, third from the generator (diffusers makes it; its loop never reads it).
      const Tensor pixels = resize_images(r.images, r.height, r.width);
      const Tensor masks = preprocess_masks(r.masks, r.height, r.width);
      const Tensor masked = be.to_host_f32(masked_image_latents(be, p.vae(), pixels, masks, &gen));
      const double masked_err = max_abs_diff(raw_vae_sample(p.vae(), masked), c.tensors->get("rec.vae_latents.1"));
      EXPECT_LE(masked_err, 1e-4);
      // The latent mask: nearest neighbour of the binarized mask.
      const Tensor small = be.to_host_f32(start.blend->mask);
      const Tensor mask_u8 = c.tensors->get("input.mask_u8");
      for (int64_t y = 0; y < small.dim(2); ++y)
        for (int64_t x = 0; x < small.dim(3); ++x)
          ASSERT_EQ(small.f32()[y * small.dim(3) + x],
                    mask_u8.data_as<uint8_t>()[(8 * y) * mask_u8.dim(1) + 8 * x] >= 128 ? 1.0f : 0.0f);
    } else {
      EXPECT_FALSE(start.blend.has_value());
    }
  }
}

// Every case end to end from its seed: final latents within 1e-3, the image within one level.
TEST(ImageToImage, GoldenCasesEndToEnd) {
  auto& p = tiny_pipeline();
  for (const char* name : kCases) {
    SCOPED_TRACE(name);
    const Wave2Case c = load_case(name);
    const GenerateResult res = p.generate(request_for(c));
    EXPECT_EQ(res.steps_run, c.tensors->get("scheduler.timesteps_run").numel());
    const double err = max_abs_diff(res.latents, c.tensors->get("output.latents"));
    std::printf("%-16s final latents max err %.3g\n", name, err);
    EXPECT_LE(err, 1e-3);
    expect_images_match(res.images, c.tensors->get("output.image_u8"), name);
  }
}

// Two prompts, two outputs each, one init image: as diffusers, the image is encoded once (one VAE draw)
// and its latents repeated to the batch of 4, then one noise draw of [4, ...].
TEST(ImageToImage, BatchesRepeatTheImageAndDrawNoiseOnce) {
  auto& p = tiny_pipeline();
  const Wave2Case c = load_case("inpaint_partial");
  GenerateRequest r = request_for(c);
  r.prompts = {r.prompts[0], "a red door"};
  r.negative_prompts = {};
  r.num_images_per_prompt = 2;
  const GenerateRequest resolved = p.resolve(r);
  const StartLatents start = p.make_start_latents(resolved, 4, 0.5f);
  EXPECT_EQ(start.latents.dim(0), 4);
  EXPECT_EQ(start.image_latents.dim(0), 1);
  // All four start from the one image latent and different noise.
  const Tensor init = p.backend().to_host_f32(start.blend->init);
  const int64_t per = init.numel() / 4;
  for (int64_t b = 1; b < 4; ++b)
    for (int64_t i = 0; i < per; ++i) ASSERT_EQ(init.f32()[b * per + i], init.f32()[i]);
  const GenerateResult res = p.generate(r);
  EXPECT_EQ(res.images.dim(0), 4);
  EXPECT_TRUE(zimage::testing::all_finite(res.latents));
}

// The inpaint blend as the reference op: with mask 0 the latents become scale_noise(init), with mask 1
// they stay, per pixel and broadcast over channels.
TEST(FlowMatchBlend, KeepsTheRepaintedRegionAndNoisesTheRest) {
  auto be = make_cpu_backend();
  const Shape s = {2, 3, 2, 2};
  std::vector<float> x(24), init(24), noise(24), mask = {1, 0, 0, 1, 0, 1, 1, 0};
  for (int i = 0; i < 24; ++i) x[size_t(i)] = float(i), init[size_t(i)] = 100.0f + i, noise[size_t(i)] = -float(i);
  Tensor xt = Tensor::from_f32(s, x);
  const Tensor m = Tensor::from_f32({2, 1, 2, 2}, mask);
  be->flow_match_blend_(xt, Tensor::from_f32(s, init), Tensor::from_f32(s, noise), &m, 0.25f);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t p = 0; p < 4; ++p) {
        const size_t i = size_t((b * 3 + c) * 4 + p);
        const float want = mask[size_t(b * 4 + p)] ? x[i] : 0.25f * noise[i] + 0.75f * init[i];
        EXPECT_EQ(xt.f32()[i], want);
      }
  Tensor start = Tensor::from_f32(s, x);
  be->flow_match_blend_(start, Tensor::from_f32(s, init), Tensor::from_f32(s, noise), nullptr, 1.0f);
  EXPECT_EQ(start.to_vector(), noise);
}

// PIL's Image.resize(LANCZOS) on a 23x17 pattern; expected values from Pillow 9.4 (sum, sum weighted by
// i % 251 + 1, and three pixels): down, up, one axis only, both.
TEST(ImageProcessor, LanczosResizeMatchesPil) {
  struct Want {
    int w, h;
    int64_t sum, weighted;
    std::array<int, 9> pixels;  // (0, 0), (h-1, w-1), (h/2, w/2)
  };
  const Want wants[] = {
      {16, 16, 97104, 12094798, {12, 67, 118, 92, 146, 91, 129, 66, 127}},
      {48, 32, 583127, 72542565, {0, 44, 79, 0, 24, 171, 219, 0, 96}},
      {23, 40, 349147, 44027781, {0, 43, 86, 0, 52, 153, 250, 9, 75}},
      {10, 17, 64433, 7926123, {24, 73, 129, 91, 147, 88, 129, 86, 130}},
      {64, 48, 1166099, 146411636, {0, 42, 72, 0, 12, 181, 223, 0, 91}},
  };
  const ImageU8 src = pattern(23, 17);
  for (const Want& w : wants) {
    SCOPED_TRACE(std::to_string(w.w) + "x" + std::to_string(w.h));
    const ImageU8 out = resize_lanczos(src, w.w, w.h);
    ASSERT_EQ(out.width, w.w);
    ASSERT_EQ(out.height, w.h);
    EXPECT_EQ(checksum(out.rgb), std::make_pair(w.sum, w.weighted));
    auto px = [&](int y, int x, int c) { return int(out.rgb[(size_t(y) * size_t(w.w) + size_t(x)) * 3 + size_t(c)]); };
    const std::array<int, 9> got = {px(0, 0, 0),
                                    px(0, 0, 1),
                                    px(0, 0, 2),
                                    px(w.h - 1, w.w - 1, 0),
                                    px(w.h - 1, w.w - 1, 1),
                                    px(w.h - 1, w.w - 1, 2),
                                    px(w.h / 2, w.w / 2, 0),
                                    px(w.h / 2, w.w / 2, 1),
                                    px(w.h / 2, w.w / 2, 2)};
    EXPECT_EQ(got, w.pixels);
  }
  // The same size is a copy.
  EXPECT_EQ(resize_lanczos(src, 23, 17).rgb, src.rgb);
}

// A mask of any size and an RGB mask: resized like the image, converted to luminance as PIL's
// convert("L"), binarized at 0.5 (Pillow 9.4: 357 ones, weighted sum 45204).
TEST(ImageProcessor, MasksAreResizedConvertedAndBinarized) {
  const Tensor m = preprocess_masks({pattern(23, 17)}, 24, 32);
  ASSERT_EQ(m.shape(), (Shape{1, 1, 24, 32}));
  int64_t ones = 0, weighted = 0;
  for (int64_t i = 0; i < m.numel(); ++i) {
    ASSERT_TRUE(m.f32()[i] == 0.0f || m.f32()[i] == 1.0f);
    ones += int64_t(m.f32()[i]);
    weighted += int64_t(m.f32()[i]) * (i % 251 + 1);
  }
  EXPECT_EQ(ones, 357);
  EXPECT_EQ(weighted, 45204);
  // Gray 127 keeps, 128 repaints.
  EXPECT_EQ(preprocess_masks({solid(16, 16, 127)}, 16, 16).f32()[0], 0.0f);
  EXPECT_EQ(preprocess_masks({solid(16, 16, 128)}, 16, 16).f32()[0], 1.0f);
  // Images: bytes at the size asked; on the backend 0 -> -1, 255 -> 1, 51 -> 2 * (51 / 255) - 1 = -0.6f.
  auto be = make_cpu_backend();
  const Tensor pixels = resize_images({solid(16, 16, 0), solid(16, 16, 255), solid(16, 16, 51)}, 16, 16);
  ASSERT_EQ(pixels.dtype(), DType::U8);
  const Tensor x = be->u8_to_image(pixels);
  EXPECT_EQ(x.f32()[0], -1.0f);
  EXPECT_EQ(x.f32()[16 * 16 * 3 + 5], 1.0f);
  EXPECT_EQ(x.f32()[2 * 16 * 16 * 3], 2.0f * (51.0f / 255.0f) - 1.0f);
}

// Gray, gray + alpha, RGBA and 16-bit PNGs decode to the RGB that PIL's convert("RGB") gives (gray
// replicated, alpha dropped; 16-bit rounded to 8 bits, as io/image.h documents) and then run.
TEST(ImageToImage, GrayAlphaAnd16BitInputsConvertToRgb) {
  using zimage::testing::make_png;
  using zimage::testing::scanlines;
  const int w = 16, h = 16;
  std::vector<uint8_t> gray, gray_alpha, rgba, rgb16, rgb;
  for (int i = 0; i < w * h; ++i) {
    const uint8_t v = uint8_t(i * 7 % 256);
    gray.push_back(v);
    gray_alpha.insert(gray_alpha.end(), {v, uint8_t(i)});
    rgba.insert(rgba.end(), {v, v, v, uint8_t(255 - i % 256)});
    rgb16.insert(rgb16.end(), {v, v, v, v, v, v});  // v * 257: exactly v in 8 bits
    rgb.insert(rgb.end(), {v, v, v});
  }
  auto decode = [](const std::vector<uint8_t>& png) { return decode_image(png.data(), png.size()); };
  const ImageU8 inputs[] = {decode(make_png(w, h, 8, 0, scanlines(gray, w, h, 1))),
                            decode(make_png(w, h, 8, 4, scanlines(gray_alpha, w, h, 2))),
                            decode(make_png(w, h, 8, 6, scanlines(rgba, w, h, 4))),
                            decode(make_png(w, h, 16, 2, scanlines(rgb16, w, h, 6)))};
  for (const ImageU8& im : inputs) EXPECT_EQ(im.rgb, rgb);

  auto& p = tiny_pipeline();
  GenerateRequest r;
  r.prompts = {"a gray square"};
  r.height = r.width = 16;
  r.steps = 2;
  r.guidance = 0.0f;
  r.max_sequence_length = 32;
  r.generator = GeneratorDevice::Cpu;
  r.images = {inputs[3]};
  const GenerateResult from16 = p.generate(r);
  r.images = {inputs[0]};
  const GenerateResult from_gray = p.generate(r);
  EXPECT_EQ(from16.latents.to_vector(), from_gray.latents.to_vector());
}

TEST(ImageToImage, RejectsBadInput) {
  auto& p = tiny_pipeline();
  const Wave2Case c = load_case("inpaint_partial");
  auto expect_invalid = [&](const GenerateRequest& r, std::initializer_list<std::string> fragments) {
    expect_error([&] { p.generate(r); }, ErrorKind::InvalidArgument, fragments);
  };
  GenerateRequest r = request_for(c);
  for (double s : {0.0, -0.5, 1.5, std::nan("")}) {
    r.strength = s;
    expect_invalid(r, {"strength must be in (0, 1]"});
  }
  r = request_for(c);
  r.images = {solid(12, 40, 10)};
  r.masks = {};
  expect_invalid(r, {"an init image is 12x40 pixels", "at least 16 pixels"});
  r = request_for(c);
  r.masks = {solid(8, 8, 255)};
  expect_invalid(r, {"a mask is 8x8 pixels"});
  r = request_for(c);
  r.masks = {r.masks[0], r.masks[0]};
  expect_invalid(r, {"got 2 masks for 1 init images"});
  r = request_for(c);
  r.images = {r.images[0], r.images[0]};
  r.masks = {};
  expect_invalid(r, {"2 init images do not divide a batch of 1"});
  r = request_for(c);
  r.images = {};
  expect_invalid(r, {"a mask needs an init image"});
  r.masks = {};
  expect_invalid(r, {"strength applies to image-to-image"});
  // A tiny strength whose cut leaves no step.
  r = request_for(c);
  r.strength = 1e-300;
  expect_invalid(r, {"leaves no denoising step"});
  // A mask of another size than the image is resized as diffusers does (not an error): a 32x40 mask whose
  // top half is white repaints the top half of the 64x80 image.
  r = request_for(c);
  ImageU8 half = solid(32, 40, 0);
  std::fill(half.rgb.begin(), half.rgb.begin() + long(half.rgb.size() / 2), uint8_t(255));
  r.masks = {half};
  const GenerateRequest resolved = p.resolve(r);
  const StartLatents start = p.make_start_latents(resolved, 1, 0.5f);
  const Tensor m = p.backend().to_host_f32(start.blend->mask);  // [1, 1, 10, 8]
  for (int64_t y = 0; y < 10; ++y) EXPECT_EQ(m.f32()[y * 8 + 3], y < 5 ? 1.0f : 0.0f) << y;
}

TEST(ImageToImage, StrengthCutAsDiffusers) {
  EXPECT_EQ(strength_begin_index(4, 0.6), 1);   // 4 - 2.4 = 1.6
  EXPECT_EQ(strength_begin_index(5, 0.85), 0);  // 5 - 4.25 = 0.75
  EXPECT_EQ(strength_begin_index(5, 0.6), 2);   // 5 * 0.6 rounds to 3.0 in double (0.6f would give 3.0000001 -> 1)
  EXPECT_EQ(strength_begin_index(3, 0.1), 2);   // 3 - 0.30000000000000004
  EXPECT_EQ(strength_begin_index(10, 1.0), 0);
  EXPECT_EQ(strength_begin_index(8, 0.5), 4);
}

// Every rank of a multi-GPU run builds the same start latents: 2 Ulysses ranks x a CFG pair (simulated
// on CPU backends) give the one-rank result.
TEST(ImageToImage, MultiGpuRanksMatchOneRank) {
  zimage::testing::SimulatedRanks ranks(zimage::testing::parallel(2, true), open_model(golden_path("tiny-zimage")));
  for (const char* name : {"img2img_cfg", "inpaint_partial"}) {
    const GenerateRequest r = request_for(load_case(name));
    const GenerateResult want = tiny_pipeline().generate(r);
    const GenerateResult got = ranks.pipeline->generate(r);
    EXPECT_LE(max_abs_diff(got.latents, want.latents), 1e-5) << name;
  }
}
