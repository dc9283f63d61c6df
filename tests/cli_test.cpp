// End-to-end tests of the `zimage` binary: real processes, real files.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "io/image.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::temp_path;

namespace {

struct ProcessResult {
  int code;
  std::string out;  // stdout and stderr
};

ProcessResult run(const std::string& args) {
  const char* bin = std::getenv("ZIMAGE_BINARY");  // the binary of a build carried elsewhere
  std::string cmd = std::string(bin && *bin ? bin : ZIMAGE_BINARY) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST(Cli, GenerateWritesPngWithMetadataAndPerfDump) {
  std::string png = temp_path("fox.png"), perf = temp_path("perf.json");
  ProcessResult r = run("generate --model synthetic:tiny --prompt 'a red fox' --height 64 --width 48 --seed 5 --output-path " + png +
              " --perf-dump-path " + perf);
  ASSERT_EQ(r.code, 0) << r.out;
  std::string bytes = slurp(png);
  auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  ImageU8 img = decode_image(data, bytes.size());
  EXPECT_EQ(img.width, 48);
  EXPECT_EQ(img.height, 64);
  auto text = read_png_text(data, bytes.size());
  EXPECT_EQ(text["prompt"], "a red fox");
  EXPECT_EQ(text["seed"], "5");
  EXPECT_EQ(text["steps"], "9");  // the built-in models follow the Turbo recipe
  EXPECT_EQ(text["model"], "synthetic:tiny");
  auto j = nlohmann::json::parse(slurp(perf));
  EXPECT_EQ(j["steps"], 9);
  EXPECT_EQ(j["stages"]["denoise_steps_ms"].size(), 9u);
  EXPECT_EQ(j["stages"]["steps"][0]["name"], "text_encoder");
  EXPECT_GT(j["e2e_ms"].get<double>(), 0.0);
  EXPECT_EQ(j["resolution"], "48x64");
}

TEST(Cli, BatchToFolderAndFormatsByExtension) {
  std::string dir = temp_path("batch") + "/";
  ProcessResult r = run("generate --model synthetic:tiny --prompt a --prompt b --num-outputs-per-prompt 2 --height 32 --width 32 "
              "--num-inference-steps 2 --output-path " + dir);
  ASSERT_EQ(r.code, 0) << r.out;
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(std::filesystem::exists(dir + "zimage_42_" + std::to_string(i) + ".png")) << i;
  for (const char* ext : {"jpg", "webp"}) {
    std::string path = temp_path(std::string("one.") + ext);
    ASSERT_EQ(run("generate --model synthetic:tiny --prompt a --height 32 --width 32 --num-inference-steps 1 --output-path " + path).code, 0);
    EXPECT_EQ(read_image(path).width, 32);
  }
}

// A golden case through the CLI from its seed alone: the final latents and the image as diffusers saved it.
TEST(Cli, GoldenCaseFromSeed) {
  std::string png = temp_path("golden.png"), lat = temp_path("golden_latents.safetensors");
  ProcessResult r = run("generate --model " + golden_path("tiny-zimage") +
              " --prompt 'a cat holding a sign that says hello' --height 64 --width 64 --num-inference-steps 4"
              " --guidance-scale 0 --max-sequence-length 64 --seed 1 --generator-device cpu --backend cpu --output-path " +
              png + " --save-latents " + lat);
  ASSERT_EQ(r.code, 0) << r.out;
  auto golden = SafetensorsFile::open(golden_path("cases/turbo_square/tensors.safetensors"));
  EXPECT_LE(max_abs_diff(SafetensorsFile::open(lat)->get("latents"), golden->get("output.latents")), 1e-3);
  ImageU8 img = read_image(png);
  Tensor ref = golden->get("output.image_u8");
  int64_t off = 0;
  for (size_t i = 0; i < img.rgb.size(); ++i) {
    int d = std::abs(int(img.rgb[i]) - int(ref.data_as<uint8_t>()[i]));
    EXPECT_LE(d, 1);
    off += d > 0;
  }
  EXPECT_LE(double(off) / double(img.rgb.size()), 0.005);
}

TEST(Cli, BadInputExitsWithCode2AndWritesNothing) {
  const std::string base = "generate --model synthetic:tiny --prompt x --num-inference-steps 1 ";
  struct Case {
    std::string args, message;
  } cases[] = {
      {"--height 1000 --width 64", "height 1000 is not a multiple of 16 (nearest valid: 992 or 1008)"},
      {"--height 64 --width 0", "must be positive"},
      {"--height -64 --width 64", "must be positive"},
      {"--height 4096 --width 4096", "above the maximum"},
      {"--height 64 --width 64 --num-inference-steps 0", "at least 1"},
      {"--height 64 --width 64 --guidance-scale -1", "guidance_scale must be >= 0"},
      {"--height 64 --width 64 --model /no/such/folder", "does not exist"},
  };
  for (const auto& c : cases) {
    std::string out = temp_path("bad.png");
    ProcessResult r = run(base + c.args + " --output-path " + out);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << r.out;
    EXPECT_FALSE(std::filesystem::exists(out)) << c.args;
  }
  ProcessResult r = run(base + "--height 32 --width 32 --output-path " + temp_path("bad.gif"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(".gif"), std::string::npos) << r.out;
}

TEST(Cli, LongPromptIsTruncatedWithAWarning) {
  std::string prompt(400, 'a');
  for (size_t i = 1; i < prompt.size(); i += 2) prompt[i] = ' ';
  ProcessResult r = run("generate --model synthetic:tiny --prompt '" + prompt +
              "' --max-sequence-length 16 --height 32 --width 32 --num-inference-steps 1 --output-path " + temp_path("long.png"));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("truncated"), std::string::npos) << r.out;
}

TEST(Cli, TokenizeMatchesGoldenChat) {
  auto cases = nlohmann::json::parse(slurp(golden_path("tokenizer_cases.json")));
  const auto& c = cases["chat"][0];
  ProcessResult r = run("tokenize --model synthetic:tiny --chat --text '" + c["prompt"].get<std::string>() + "'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out), c["ids"]);
}

TEST(Cli, EncodePromptMatchesGoldenEmbeddings) {
  std::string out = temp_path("embeds.safetensors");
  ProcessResult r =
      run("encode-prompt --model " + golden_path("tiny-zimage") +
          " --prompt 'a cat holding a sign that says hello' --max-sequence-length 64 --backend cpu --out " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  auto golden = SafetensorsFile::open(golden_path("cases/turbo_square/tensors.safetensors"));
  EXPECT_LE(max_abs_diff(SafetensorsFile::open(out)->get("prompt_embeds.0"), golden->get("prompt_embeds.0")), 1e-4);
}

TEST(Cli, BenchComparesTwoPerfDumps) {
  std::string a = temp_path("perf_a.json"), b = temp_path("perf_b.json");
  for (const auto& p : {a, b})
    ASSERT_EQ(run("generate --model synthetic:tiny --prompt x --height 32 --width 32 --num-inference-steps 2 --output-path " +
                  temp_path("cmp.png") + " --perf-dump-path " + p)
                  .code,
              0);
  ProcessResult r = run("bench --compare " + a + " " + b);
  ASSERT_EQ(r.code, 0) << r.out;
  for (const char* row : {"e2e_ms", "dit_forward_ms", "vae_decode", "step 1"}) EXPECT_NE(r.out.find(row), std::string::npos) << r.out;
  EXPECT_EQ(run("bench --compare " + a + " " + temp_path("missing.json")).code, 2);
}

TEST(Cli, HelpOnEveryCommand) {
  for (const char* c : {"generate", "tokenize", "encode-prompt", "bench", "save-model"}) {
    ProcessResult r = run(std::string(c) + " --help");
    EXPECT_EQ(r.code, 0) << c;
    EXPECT_NE(r.out.find("--model"), std::string::npos) << c;
  }
  EXPECT_EQ(run("no-such-command").code, 2);
}

TEST(Cli, SavedModelGeneratesTheSamePixels) {
  std::string dir = temp_path("saved_by_cli");
  ProcessResult saved = run("save-model --model synthetic:tiny --shard-size 64KiB --out " + dir);
  ASSERT_EQ(saved.code, 0) << saved.out;
  EXPECT_NE(saved.out.find("wrote " + dir), std::string::npos) << saved.out;
  EXPECT_TRUE(std::filesystem::exists(dir + "/transformer/diffusion_pytorch_model.safetensors.index.json"))
      << saved.out;
  auto generate = [](const std::string& model, const std::string& png) {
    ProcessResult r =
        run("generate --model " + model + " --prompt 'a red fox' --height 64 --width 48 --seed 7 --output-path " + png);
    EXPECT_EQ(r.code, 0) << r.out;
    std::string bytes = slurp(png);
    return std::make_pair(decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()),
                          read_png_text(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  };
  auto [from_memory, text_a] = generate("synthetic:tiny", temp_path("from_memory.png"));
  auto [from_files, text_b] = generate(dir, temp_path("from_files.png"));
  EXPECT_EQ(from_files.width, 48);
  EXPECT_EQ(from_files.rgb, from_memory.rgb);
  EXPECT_EQ(text_b["steps"], "9");  // the Turbo recipe came with the folder, whose name does not say turbo
  std::filesystem::remove_all(dir);
}

TEST(Cli, SaveModelBadInputExitsWithCode2) {
  std::string busy = temp_path("busy_for_cli");
  std::filesystem::create_directories(busy);
  std::ofstream(busy + "/keep.txt") << "x";
  struct Case {
    std::string args, message;
  } cases[] = {
      {"--model synthetic:tiny --out " + busy, "not empty"},
      {"--model synthetic:huge --out " + temp_path("never"), "unknown synthetic model"},
      {"--model synthetic:tiny --shard-size 5XB --out " + temp_path("never"), "--shard-size '5XB'"},
      {"--model synthetic:tiny --shard-size 0 --out " + temp_path("never"), "not a positive size"},
  };
  for (const auto& c : cases) {
    ProcessResult r = run("save-model " + c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << r.out;
  }
  EXPECT_FALSE(std::filesystem::exists(temp_path("never")));
  EXPECT_TRUE(std::filesystem::exists(busy + "/keep.txt"));
}

// A checkpoint damaged on disk (the VAE's last bias all NaN): generate fails with the stage named and
// exit code 1, and writes no image instead of a black one.
TEST(Cli, NaNWeightsOnDiskFailTheGenerationNamingTheStage) {
  const std::string dir = temp_path("nan_vae_model");
  std::filesystem::copy(golden_path("tiny-zimage"), dir, std::filesystem::copy_options::recursive);
  const std::string file = dir + "/vae/diffusion_pytorch_model.safetensors";
  const SafetensorsEntry e = SafetensorsFile::open(file)->entries().at("decoder.conv_out.bias");
  const float nan = std::numeric_limits<float>::quiet_NaN();
  char nan_bytes[8];
  convert_from_f32(e.dtype, &nan, nan_bytes, 1);  // NaN in the file's dtype (bf16 here)
  const size_t width = dtype_size(e.dtype);
  uint64_t header_len = 0;
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.read(reinterpret_cast<char*>(&header_len), 8);  // little-endian u64, as on every machine we build for
  f.seekp(std::streamoff(8 + header_len + e.begin));
  for (size_t i = e.begin; i < e.end; i += width) f.write(nan_bytes, std::streamsize(width));
  f.close();

  const std::string png = temp_path("nan.png");
  ProcessResult r =
      run("generate --model " + dir + " --prompt 'a red fox' --height 32 --width 32 --output-path " + png);
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("the VAE decoder produced 3072 NaN/Inf values in the image"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(png));
  std::filesystem::remove_all(dir);
}

// `generate --image [--mask]` reproduces diffusers' image-to-image and inpainting cases (wave2), the size
// taken from the image.
TEST(Cli, ImageToImageAndInpaintGoldenCases) {
  struct Case {
    std::string name, args;
  } cases[] = {
      {"img2img_cfg",
       "--prompt 'a castle on a hill' --negative-prompt blurry --num-inference-steps 5 --guidance-scale 3 "
       "--strength 0.85 --seed 22"},
      {"inpaint_partial",
       "--prompt 'a blue window' --num-inference-steps 4 --guidance-scale 2.5 --strength 0.8 --seed 24"},
  };
  for (const auto& c : cases) {
    const std::string dir = golden_path("wave2/cases/" + c.name);
    const std::string png = temp_path(c.name + ".png"), lat = temp_path(c.name + ".safetensors");
    std::string args = "generate --model " + golden_path("tiny-zimage") + " " + c.args + " --image " + dir +
                       "/input.png --max-sequence-length 64 --generator-device cpu --backend cpu --output-path " + png +
                       " --save-latents " + lat;
    if (c.name.starts_with("inpaint")) args += " --mask " + dir + "/mask.png";
    ProcessResult r = run(args);
    ASSERT_EQ(r.code, 0) << r.out;
    auto golden = SafetensorsFile::open(dir + "/tensors.safetensors");
    EXPECT_LE(max_abs_diff(SafetensorsFile::open(lat)->get("latents"), golden->get("output.latents")), 1e-3) << c.name;
    ImageU8 img = read_image(png);
    Tensor ref = golden->get("output.image_u8");
    ASSERT_EQ(img.rgb.size(), size_t(ref.numel())) << c.name;
    int64_t off = 0;
    for (size_t i = 0; i < img.rgb.size(); ++i) {
      int d = std::abs(int(img.rgb[i]) - int(ref.data_as<uint8_t>()[i]));
      EXPECT_LE(d, 1);
      off += d > 0;
    }
    EXPECT_LE(double(off) / double(img.rgb.size()), 0.005) << c.name;
  }
}

// An init image of 70x50 gives 64x48 images (rounded down to the multiple of 16), one per output, with CFG.
TEST(Cli, ImageToImageSizeFromTheImageWithBatches) {
  ImageU8 init;
  init.width = 70;
  init.height = 50;
  for (int i = 0; i < 70 * 50 * 3; ++i) init.rgb.push_back(uint8_t(i * 13 % 256));
  const std::string in = temp_path("init70x50.png"), out = temp_path("i2i_batch/");
  write_image(in, init);
  ProcessResult r =
      run("generate --model synthetic:tiny --prompt a --prompt b --num-outputs-per-prompt 2 "
          "--guidance-scale 2 --num-inference-steps 3 --strength 0.7 --image " +
          in + " --output-path " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  for (int i = 0; i < 4; ++i) {
    ImageU8 img = read_image(out + "zimage_42_" + std::to_string(i) + ".png");
    EXPECT_EQ(img.width, 64);
    EXPECT_EQ(img.height, 48);
  }
}

TEST(Cli, ImageToImageBadInputExitsWithCode2) {
  ImageU8 init;
  init.width = init.height = 32;
  init.rgb.assign(32 * 32 * 3, 100);
  const std::string in = temp_path("init32.png");
  write_image(in, init);
  const std::string base = "generate --model synthetic:tiny --prompt x --num-inference-steps 2 ";
  struct Case {
    std::string args, message;
  } cases[] = {
      {"--image " + in + " --strength 0", "strength must be in (0, 1]"},
      {"--image " + in + " --strength 1.5", "strength must be in (0, 1]"},
      {"--mask " + in, "a mask needs an init image"},
      {"--strength 0.5", "no init image was given"},
      {"--image /no/such/image.png", "/no/such/image.png"},
  };
  for (const auto& c : cases) {
    const std::string out = temp_path("bad_i2i.png");
    ProcessResult r = run(base + c.args + " --output-path " + out);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_FALSE(std::filesystem::exists(out)) << c.args;
  }
}
