#include "model/model_source.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/qwen3.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::temp_path;
namespace fs = std::filesystem;

namespace {

// A writable copy of the golden model folder for breaking on purpose.
std::string copy_of_golden_model(const std::string& name) {
  std::string dst = temp_path(name);
  fs::remove_all(dst);
  fs::copy(golden_path("tiny-zimage"), dst, fs::copy_options::recursive);
  for (auto& e : fs::recursive_directory_iterator(dst))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  return dst;
}

}  // namespace

TEST(ModelSource, OpensTheGoldenFolderWithItsConfigs) {
  ModelSource m = open_model(golden_path("tiny-zimage"));
  EXPECT_EQ(m.transformer.integer("dim"), 64);
  EXPECT_EQ(m.text_encoder.integer("num_hidden_layers"), 3);
  EXPECT_EQ(m.vae.integers("block_out_channels"), (std::vector<int64_t>{32, 32, 64, 64}));
  EXPECT_DOUBLE_EQ(m.scheduler.number("shift"), 3.0);
  EXPECT_TRUE(m.transformer_weights->has("x_pad_token"));
  EXPECT_EQ(m.default_steps, 50);  // not a Turbo folder: the base recipe
  EXPECT_FALSE(m.synthetic);
}

TEST(ModelSource, SyntheticModelsHaveTheRealShapes) {
  ModelSource tiny = open_model("synthetic:tiny");
  EXPECT_EQ(tiny.transformer.integer("dim"), 64);
  ModelSource turbo = open_model("synthetic:turbo");
  EXPECT_EQ(turbo.transformer.integer("dim"), 3840);
  EXPECT_EQ(turbo.transformer.integer("n_layers"), 30);
  EXPECT_EQ(turbo.text_encoder.integer("hidden_size"), 2560);
  EXPECT_EQ(turbo.text_encoder.integer("num_hidden_layers"), 36);
  EXPECT_EQ(turbo.vae.integers("block_out_channels"), (std::vector<int64_t>{128, 256, 512, 512}));
  EXPECT_EQ(turbo.default_steps, 9);
  EXPECT_EQ(turbo.default_guidance, 0.0f);
  // Deterministic weights: the same name gives the same values, another name others.
  Tensor a = turbo.transformer_weights->get("layers.0.attention.to_q.weight", {8, 16});
  Tensor b = turbo.transformer_weights->get("layers.0.attention.to_q.weight", {8, 16});
  Tensor c = turbo.transformer_weights->get("layers.1.attention.to_q.weight", {8, 16});
  EXPECT_EQ(a.to_vector(), b.to_vector());
  EXPECT_NE(a.to_vector(), c.to_vector());
  expect_error([] { open_model("synthetic:huge"); }, ErrorKind::InvalidArgument, {"synthetic:huge", "synthetic:tiny"});
}

TEST(ModelSource, MissingFolderComponentFileOrKey) {
  expect_error([] { open_model(temp_path("no_such_model")); }, ErrorKind::NotFound, {"does not exist"});

  std::string no_vae = copy_of_golden_model("no_vae");
  fs::remove_all(no_vae + "/vae");
  expect_error([&] { open_model(no_vae); }, ErrorKind::NotFound, {"'vae'"});

  std::string no_index = copy_of_golden_model("no_index");
  fs::remove(no_index + "/model_index.json");
  expect_error([&] { open_model(no_index); }, ErrorKind::NotFound, {"model_index.json"});

  std::string no_weights = copy_of_golden_model("no_weights");
  fs::remove(no_weights + "/transformer/diffusion_pytorch_model.safetensors");
  expect_error([&] { open_model(no_weights); }, ErrorKind::NotFound, {"transformer", ".safetensors"});

  std::string no_key = copy_of_golden_model("no_key");
  {
    std::ifstream in(no_key + "/text_encoder/config.json");
    auto j = nlohmann::json::parse(in);
    j.erase("hidden_size");
    std::ofstream(no_key + "/text_encoder/config.json") << j.dump();
  }
  ModelSource m = open_model(no_key);  // configs are read lazily by the models that need them
  auto be = make_cpu_backend();
  expect_error([&] { Qwen3TextEncoder enc(*be, m.text_encoder, *m.text_encoder_weights); }, ErrorKind::NotFound,
               {"text_encoder/config.json", "missing config key 'hidden_size'"});

  std::string bad_json = copy_of_golden_model("bad_json");
  std::ofstream(bad_json + "/vae/config.json") << "{ not json";
  expect_error([&] { open_model(bad_json); }, ErrorKind::Format, {"vae/config.json", "not valid JSON"});
}

TEST(ModelSource, WeightShapeMismatchNamesTheTensor) {
  ModelSource m = open_model(golden_path("tiny-zimage"));
  expect_error([&] { m.transformer_weights->get("x_pad_token", {1, 128}); }, ErrorKind::Format,
               {"'x_pad_token'", "[1, 64]", "[1, 128]"});
  expect_error([&] { m.transformer_weights->get("no.such.weight", {1}); }, ErrorKind::NotFound, {"'no.such.weight'"});
}

TEST(Config, TypedAccessorsNameTheKey) {
  Config c = Config::parse(R"({"a": 3, "b": "x", "c": [1, 2], "d": 1.5, "e": true})", "test.json");
  EXPECT_EQ(c.integer("a"), 3);
  EXPECT_EQ(c.string("b"), "x");
  EXPECT_EQ(c.integers("c"), (std::vector<int64_t>{1, 2}));
  EXPECT_DOUBLE_EQ(c.number("d"), 1.5);
  EXPECT_TRUE(c.boolean("e"));
  EXPECT_EQ(c.integer_or("zz", 7), 7);
  expect_error([&] { c.integer("b"); }, ErrorKind::Format, {"test.json", "'b'", "integer"});
  expect_error([&] { c.integer("d"); }, ErrorKind::Format, {"'d'"});
  expect_error([&] { c.string("zz"); }, ErrorKind::NotFound, {"missing config key 'zz'"});
}
