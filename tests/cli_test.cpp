// End-to-end tests of the `zimage` binary: real processes, real files.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
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
  EXPECT_EQ(text["steps"], "8");  // the built-in models follow the Turbo recipe: 8 steps since diffusers PR #13730
  EXPECT_EQ(text["model"], "synthetic:tiny");
  auto j = nlohmann::json::parse(slurp(perf));
  EXPECT_EQ(j["steps"], 8);
  EXPECT_EQ(j["stages"]["denoise_steps_ms"].size(), 8u);
  EXPECT_EQ(j["dit_forwards"], 8);  // no CFG: one DiT call per step
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
  const std::string base = "generate --prompt x ";
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
    const std::string model = c.args.find("--model") == std::string::npos ? "--model synthetic:tiny " : "";
    ProcessResult r = run(base + model + c.args + " --output-path " + out);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << r.out;
    EXPECT_FALSE(std::filesystem::exists(out)) << c.args;
  }
  ProcessResult r = run(base + "--model synthetic:tiny --height 32 --width 32 --output-path " + temp_path("bad.gif"));
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
  EXPECT_EQ(text_b["steps"], "8");  // the Turbo recipe came with the folder, whose name does not say turbo
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

namespace {

ProcessResult run_binary(const std::string& binary, const std::string& args) {
  FILE* p = popen((binary + " " + args + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::map<std::string, std::string> png_text(const std::string& path) {
  std::string bytes = slurp(path);
  return read_png_text(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

// The golden tiny model with a tokenizer.json that fails to load: any request that reaches the load
// fails with the tokenizer's error, so an error about the request proves it was checked first.
std::string model_that_fails_to_load() {
  namespace fs = std::filesystem;
  const fs::path dir = temp_path("fails_to_load");
  fs::create_directories(dir / "tokenizer");
  for (const char* part : {"model_index.json", "transformer", "text_encoder", "vae", "scheduler"})
    if (!fs::exists(dir / part)) fs::create_symlink(golden_path(std::string("tiny-zimage/") + part), dir / part);
  std::ofstream(dir / "tokenizer" / "tokenizer.json") << "{}";
  return dir.string();
}

}  // namespace

// `--negative-prompt` once per prompt: each image gets its own. The batch's second image equals the one
// made with its negative for all prompts; the first differs (the pipeline used "x", not the last value).
TEST(Cli, NegativePromptPerPrompt) {
  const std::string args = "generate --model synthetic:tiny --prompt a --prompt b --height 32 --width 32 "
                           "--num-inference-steps 2 --guidance-scale 3 --backend cpu ";
  const std::string per = temp_path("neg_per"), all = temp_path("neg_all");
  ProcessResult r = run(args + "--negative-prompt x --negative-prompt y --output-path " + per);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(png_text(per + "/zimage_42_0.png")["negative_prompt"], "x");
  EXPECT_EQ(png_text(per + "/zimage_42_1.png")["negative_prompt"], "y");
  r = run(args + "--negative-prompt y --output-path " + all);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(png_text(all + "/zimage_42_0.png")["negative_prompt"], "y");
  EXPECT_NE(read_image(per + "/zimage_42_0.png").rgb, read_image(all + "/zimage_42_0.png").rgb);
  EXPECT_EQ(read_image(per + "/zimage_42_1.png").rgb, read_image(all + "/zimage_42_1.png").rgb);

  const std::string never = temp_path("neg_never.png");
  r = run(args + "--negative-prompt x --negative-prompt y --negative-prompt z --output-path " + never);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--negative-prompt is given 3 times for 2 prompts"), std::string::npos) << r.out;
  EXPECT_FALSE(std::filesystem::exists(never));
}

// A repeated single-value option is an error in every command, not a silent last-wins.
TEST(Cli, RepeatedSingleValueOptionIsExit2) {
  const std::string png = temp_path("repeated.png");
  struct Case {
    std::string args, option;
  } cases[] = {
      {"generate --model synthetic:tiny --prompt a --seed 1 --seed 2 --output-path " + png, "--seed"},
      {"generate --model synthetic:tiny --prompt a --height 32 --height 64 --output-path " + png, "--height"},
      {"generate --model synthetic:tiny --model synthetic:turbo --prompt a --output-path " + png, "--model"},
      {"generate --model synthetic:tiny --prompt a --backend cpu --backend cpu --output-path " + png, "--backend"},
      {"tokenize --model synthetic:tiny --text a --text b", "--text"},
      {"encode-prompt --model synthetic:tiny --prompt a --out a.st --out b.st", "--out"},
      {"bench --model synthetic:tiny --runs 5 --runs 6", "--runs"},
      {"serve --model synthetic:tiny --port 0 --port 1", "--port"},
      {"save-model --model synthetic:tiny --out a --out b", "--out"},
  };
  for (const auto& c : cases) {
    ProcessResult r = run(c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.option + " takes one value but was given 2 times"), std::string::npos) << r.out;
  }
  EXPECT_FALSE(std::filesystem::exists(png));
}

// A path without an extension is a folder, made if missing; default names never replace an image.
TEST(Cli, OutputFolderIsCreatedAndDefaultNamesNeverOverwrite) {
  namespace fs = std::filesystem;
  const std::string dir = temp_path("made/for/outputs");
  const std::string args = "generate --model synthetic:tiny --height 32 --width 32 --num-inference-steps 1 "
                           "--num-outputs-per-prompt 2 --output-path " + dir;
  ProcessResult r = run(args + " --prompt first");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::is_directory(dir));
  r = run(args + " --prompt second");
  ASSERT_EQ(r.code, 0) << r.out;
  for (int i = 0; i < 2; ++i) {
    const std::string first = dir + "/zimage_42_" + std::to_string(i) + ".png";
    const std::string second = dir + "/zimage_42_" + std::to_string(i) + "-1.png";
    EXPECT_EQ(png_text(first)["prompt"], "first") << first;
    EXPECT_EQ(png_text(second)["prompt"], "second") << second;
    EXPECT_NE(r.out.find(second), std::string::npos) << r.out;  // the paths written are printed
  }
  // A name taken by anything (here a folder) moves the whole batch to the next free counter.
  fs::create_directories(dir + "/zimage_42_1-2.png");
  r = run(args + " --prompt third");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(png_text(dir + "/zimage_42_0-3.png")["prompt"], "third");
  EXPECT_EQ(png_text(dir + "/zimage_42_1-3.png")["prompt"], "third");
  EXPECT_FALSE(fs::exists(dir + "/zimage_42_0-2.png"));
  // A file named explicitly is the user's choice and is replaced.
  const std::string named = temp_path("named.png");
  ASSERT_EQ(run(args.substr(0, args.find("--num-outputs")) + "--prompt one --output-path " + named).code, 0);
  ASSERT_EQ(run(args.substr(0, args.find("--num-outputs")) + "--prompt two --output-path " + named).code, 0);
  EXPECT_EQ(png_text(named)["prompt"], "two");
}

// Every request error comes before the load: the model here fails to load, yet each bad input gets its
// own message (exit 2) and no file is written.
TEST(Cli, InputsAreCheckedBeforeTheModelLoads) {
  namespace fs = std::filesystem;
  const std::string model = model_that_fails_to_load();
  const std::string a_file = temp_path("a_plain_file");
  std::ofstream(a_file) << "x";
  const std::string png = temp_path("never.png");
  const std::string base = "generate --model " + model + " --prompt x ";
  ProcessResult loads = run(base + "--height 32 --width 32 --output-path " + png);
  ASSERT_NE(loads.code, 0) << loads.out;  // the control: this model does not load
  ASSERT_NE(loads.out.find("tokenizer"), std::string::npos) << loads.out;
  struct Case {
    std::string args, message;
  } cases[] = {
      {"--height 1000 --width 64", "height 1000 is not a multiple of 16 (nearest valid: 992 or 1008)"},
      {"--height 2147483647 --width 64", "(nearest valid: 2147483632 or 2147483648)"},
      {"--height 64 --width 64 --num-inference-steps 0", "num_inference_steps must be at least 1"},
      {"--height 64 --width 64 --num-inference-steps 1001", "above the maximum of 1000"},
      {"--height 64 --width 64 --seed -1", "--seed '-1' is negative"},
      {"--height 64 --width 64 --seed 9223372036854775808", "is above the largest seed, 9223372036854775807"},
      {"--height 64 --width 64 --seed 18446744073709551615", "is above the largest seed"},
      {"--height 64 --width 64 --seed 0x10", "is not a whole number"},
      {"--height 64 --width 64 --num-outputs-per-prompt 17", "above the maximum of 16"},
      {"--height 64 --width 64 --save-latents " + a_file + "/latents.safetensors", "--save-latents"},
      {"--height 64 --width 64 --save-latents /dev/full", "is not a regular file"},
      {"--height 64 --width 64 --perf-dump-path " + a_file + "/perf.json", "--perf-dump-path"},
      {"--height 64 --width 64 --perf-dump-path " + temp_path(""), "is a folder"},
      {"--height 64 --width 64 --output-path " + a_file + "/sub/x.png", "--output-path"},
      {"--height 64 --width 64 --output-path " + temp_path("x.gif"), ".gif"},
  };
  for (const auto& c : cases) {
    ProcessResult r = run(base + c.args + (c.args.find("--output-path") == std::string::npos ? " --output-path " + png : ""));
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_EQ(r.out.find("-2147483648"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("tokenizer"), std::string::npos) << c.args << " reached the load:\n" << r.out;
  }
  EXPECT_FALSE(fs::exists(png));
  EXPECT_TRUE(fs::is_character_file("/dev/full"));

  // bench: every resolution and the result folder, before the load.
  const std::string bench = "bench --model " + model + " --runs 1 --output-dir " + temp_path("bench_out") + " ";
  ProcessResult bench_loads = run(bench + "--resolutions 32x32");
  ASSERT_NE(bench_loads.code, 0) << bench_loads.out;
  ASSERT_NE(bench_loads.out.find("tokenizer"), std::string::npos) << bench_loads.out;
  Case bench_cases[] = {
      {"--resolutions 32x32 1000x64", "width 1000 is not a multiple of 16"},
      {"--resolutions 32x32 64x1000", "height 1000 is not a multiple of 16"},
      {"--resolutions 32x32 64x64junk", "resolution '64x64junk' is not WIDTHxHEIGHT"},
      {"--resolutions 99999999999x64", "is not WIDTHxHEIGHT"},
  };
  for (const auto& c : bench_cases) {
    ProcessResult r = run(bench + c.args);
    EXPECT_EQ(r.code, 2) << c.args << "\n" << r.out;
    EXPECT_NE(r.out.find(c.message), std::string::npos) << c.args << "\n" << r.out;
    EXPECT_EQ(r.out.find("tokenizer"), std::string::npos) << c.args << " reached the load:\n" << r.out;
  }
  ProcessResult r = run("bench --model " + model + " --resolutions 32x32 --output-dir " + a_file + "/results");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--output-dir"), std::string::npos) << r.out;
}

// A write that fails (the disk is full) fails the command.
TEST(Cli, FailedWriteIsANonZeroExit) {
  ProcessResult r = run("generate --model synthetic:tiny --prompt x --height 32 --width 32 --num-inference-steps 1 "
                        "--output-path " + temp_path("full.png") + " --perf-dump-path /dev/full");
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("/dev/full: write failed: No space left on device"), std::string::npos) << r.out;
}

// Prompt files as editors save them: a UTF-8 BOM, CRLF line ends, blank and whitespace-only lines.
TEST(Cli, PromptFileSkipsBomAndBlankLinesAndRejectsBadUtf8) {
  const std::string file = temp_path("prompts.txt"), dir = temp_path("from_file");
  std::ofstream(file, std::ios::binary) << "\xEF\xBB\xBF" "a red fox\r\n   \r\n\t\n\nblue sky\n  \n";
  ProcessResult r = run("generate --model synthetic:tiny --prompt-file " + file +
                        " --height 32 --width 32 --num-inference-steps 1 --output-path " + dir);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(png_text(dir + "/zimage_42_0.png")["prompt"], "a red fox");
  EXPECT_EQ(png_text(dir + "/zimage_42_1.png")["prompt"], "blue sky");
  EXPECT_FALSE(std::filesystem::exists(dir + "/zimage_42_2.png"));

  std::ofstream(file, std::ios::binary | std::ios::trunc) << "fine\nbad \xff\xfe\x1b[2J here\n";
  r = run("generate --model synthetic:tiny --prompt-file " + file + " --height 32 --width 32 --output-path " +
          temp_path("bad_utf8.png"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("line 2 of the prompt file"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("not valid UTF-8: byte 0xff at offset 4 (\"bad \\xff\\xfe\\x1b[2J"), std::string::npos) << r.out;
  for (char raw : {'\xff', '\xfe', '\x1b'}) EXPECT_EQ(r.out.find(raw), std::string::npos) << r.out;
  // The same from the command line.
  r = run("generate --model synthetic:tiny --prompt \"$(printf 'a\\377b')\" --height 32 --width 32 --output-path " +
          temp_path("bad_arg.png"));
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("prompt is not valid UTF-8: byte 0xff at offset 1 (\"a\\xffb\")"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\xff'), std::string::npos) << r.out;
}

TEST(Cli, VersionPrintsTheVersionAndTheCommit) {
  ProcessResult r = run("--version");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.rfind("zimage 0.1.0 (commit ", 0), 0u) << r.out;
  ProcessResult git = run_binary("git -C " ZIMAGE_SOURCE_DIR, "rev-parse --short=12 HEAD");
  if (git.code == 0) {
    EXPECT_NE(r.out.find("(commit " + git.out.substr(0, 12)), std::string::npos) << r.out << " vs " << git.out;
  } else {
    EXPECT_NE(r.out.find("(commit unknown)"), std::string::npos) << r.out;
  }
}

// `cmake --install` lays out P/bin/zimage and P/share/zimage/, and the installed binary finds its
// tokenizer from its own path: no ZIMAGE_ASSETS, nothing else copied.
TEST(Cli, InstalledBinaryFindsItsDataFromItsOwnPath) {
  namespace fs = std::filesystem;
  if (!fs::exists(ZIMAGE_BUILD_DIR "/cmake_install.cmake") || std::getenv("ZIMAGE_BINARY"))
    GTEST_SKIP() << "not run from its build folder";
  const std::string prefix = temp_path("prefix with space");
  ProcessResult inst = run_binary(ZIMAGE_CMAKE_COMMAND, "--install " ZIMAGE_BUILD_DIR " --prefix '" + prefix + "'");
  ASSERT_EQ(inst.code, 0) << inst.out;
  EXPECT_TRUE(fs::exists(prefix + "/share/zimage/tokenizer.json"));
  EXPECT_TRUE(fs::exists(prefix + "/share/zimage/tokenizer_config.json"));
  const std::string bin = "env -u ZIMAGE_ASSETS '" + prefix + "/bin/zimage'";
  ProcessResult version = run_binary(bin, "--version");
  ASSERT_EQ(version.code, 0) << version.out;
  EXPECT_NE(version.out.find("data: " + prefix + "/share/zimage"), std::string::npos) << version.out;
  const std::string png = prefix + "/fox.png";
  ProcessResult r = run_binary(bin, "generate --model synthetic:tiny --prompt 'a red fox' --height 32 --width 32 "
                                    "--num-inference-steps 1 --output-path '" + png + "'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(read_image(png).width, 32);
  // $ZIMAGE_ASSETS still wins.
  ProcessResult over = run_binary("env ZIMAGE_ASSETS=/nowhere '" + prefix + "/bin/zimage'", "--version");
  EXPECT_NE(over.out.find("data: /nowhere"), std::string::npos) << over.out;
  fs::remove_all(prefix);
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

// --quantization fp8 through the binary: the tiny golden model generates with FP8 linears (an image near the
// plain one, not equal to it), the bench writes its accuracy against the bf16 run, and the flags' mistakes
// exit 2 before anything loads.
TEST(Cli, Fp8QuantizationGeneratesAndBenchReportsItsAccuracy) {
  const std::string base = "generate --model " + golden_path("tiny-zimage") +
                           " --prompt 'a red fox' --height 64 --width 64 --num-inference-steps 3 --seed 5 --backend cpu";
  const std::string plain = temp_path("plain.png"), fp8 = temp_path("fp8.png");
  ProcessResult a = run(base + " --output-path " + plain);
  ASSERT_EQ(a.code, 0) << a.out;
  ProcessResult b = run(base + " --quantization fp8 --output-path " + fp8);
  ASSERT_EQ(b.code, 0) << b.out;
  EXPECT_NE(b.out.find("FP8 linears"), std::string::npos) << b.out;
  const ImageU8 pa = read_image(plain), pb = read_image(fp8);
  ASSERT_EQ(pa.rgb.size(), pb.rgb.size());
  int diff = 0;
  for (size_t i = 0; i < pa.rgb.size(); ++i) diff = std::max(diff, std::abs(int(pa.rgb[i]) - int(pb.rgb[i])));
  EXPECT_GT(diff, 0) << "FP8 changed nothing";
  EXPECT_LE(diff, 64);

  const std::string dir = temp_path("fp8_bench");
  ProcessResult c = run("bench --model " + golden_path("tiny-zimage") +
                        " --backend cpu --resolutions 64x64 --runs 1 --quantization fp8 --label fp8 --output-dir " + dir);
  ASSERT_EQ(c.code, 0) << c.out;
  ASSERT_TRUE(std::filesystem::exists(dir));
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const auto r = nlohmann::json::parse(slurp(e.path().string()))["results"][0];
    EXPECT_EQ(r["quantization"], "fp8");
    EXPECT_GT(r["vs_bf16_latent_rel"].get<double>(), 1e-4);
    EXPECT_LT(r["vs_bf16_latent_rel"].get<double>(), 0.1);
    EXPECT_GT(r["vs_bf16_psnr_db"].get<double>(), 25.0);
  }

  struct Case {
    std::string args, message;
  } cases[] = {{"--fp8-keep-bf16 'layers.*'", "--fp8-keep-bf16 needs --quantization fp8"},
               {"--quantization fp8 --fp8-keep-bf16 'a,,b'", "empty pattern"},
               {"--quantization fp4", "fp4"}};
  for (const auto& k : cases) {
    const std::string out = temp_path("bad_fp8.png");
    ProcessResult r = run(base + " " + k.args + " --output-path " + out);
    EXPECT_EQ(r.code, 2) << k.args << "\n" << r.out;
    EXPECT_NE(r.out.find(k.message), std::string::npos) << k.args << "\n" << r.out;
    EXPECT_FALSE(std::filesystem::exists(out)) << k.args;
  }
}
