#include "model/model_source.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/qwen3.h"
#include "model/vae.h"
#include "model/zimage_dit.h"
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
  EXPECT_EQ(turbo.default_steps, 8);  // diffusers PR #13730: Turbo is distilled for 8 steps
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

// Integers from a stranger's config: converting 1e300 to int64 was undefined behaviour, and 2^64-1 came
// back as -1.
TEST(Config, IntegersOutOfRange) {
  Config c = Config::parse(R"({"big": 1e300, "u": 18446744073709551615, "f": 64.0, "neg": -2})", "t.json");
  expect_error([&] { c.integer("big"); }, ErrorKind::Format, {"'big'", "an integer"});
  expect_error([&] { c.integer("u"); }, ErrorKind::Format, {"'u'", "below 2^63"});
  expect_error([&] { Config::parse(R"({"inf": 1e999})", "t.json"); }, ErrorKind::Format, {"t.json", "not valid JSON"});
  EXPECT_EQ(c.integer("f"), 64);
  EXPECT_EQ(c.integer_in("f", 1, 64), 64);
  expect_error([&] { c.integer_in("neg", 1, 64); }, ErrorKind::Format, {"'neg' is -2, outside 1 to 64"});
  EXPECT_EQ(c.integer_in_or("zz", 5, 1, 64), 5);
}

TEST(Config, DeeplyNestedJsonIsRefused) {
  expect_error(
      [] { Config::parse(R"({"a": )" + std::string(10000, '[') + std::string(10000, ']') + "}", "deep.json"); },
      ErrorKind::Format, {"deep.json", "nests deeper than 64 levels"});
}

// Each model's config reader refuses what would divide by zero, overflow or allocate absurdly later.
TEST(Config, ModelConfigsRefuseUnusableSizes) {
  const ModelSource m = open_model("synthetic:tiny");
  auto with = [](const Config& base, const std::string& key, const nlohmann::json& value) {
    nlohmann::json j = base.json();
    j[key] = value;
    return Config(j, base.where());
  };
  expect_error([&] { Qwen3Config::from(with(m.text_encoder, "num_attention_heads", 0)); }, ErrorKind::Format,
               {"'num_attention_heads' is 0"});
  expect_error([&] { Qwen3Config::from(with(m.text_encoder, "num_key_value_heads", 0)); }, ErrorKind::Format,
               {"'num_key_value_heads' is 0"});
  expect_error([&] { Qwen3Config::from(with(m.text_encoder, "num_hidden_layers", 1)); }, ErrorKind::Format,
               {"'num_hidden_layers' is 1, outside 2 to 1024"});
  expect_error([&] { DitConfig::from(with(m.transformer, "n_heads", 0)); }, ErrorKind::Format, {"'n_heads' is 0"});
  expect_error([&] { DitConfig::from(with(m.transformer, "dim", int64_t(1) << 62)); }, ErrorKind::Format, {"'dim'"});
  expect_error([&] { DitConfig::from(with(m.transformer, "all_patch_size", {0})); }, ErrorKind::Format,
               {"all_patch_size 0"});
  expect_error(
      [&] {
        DitConfig::from(with(m.transformer, "axes_dims", {int64_t(1) << 62, int64_t(1) << 62, 16}));
      },
      ErrorKind::Format, {"axes_dims"});
  expect_error([&] { VaeConfig::from(with(m.vae, "block_out_channels", nlohmann::json::array())); }, ErrorKind::Format,
               {"block_out_channels must list 1 to 8 blocks"});
  expect_error([&] { VaeConfig::from(with(m.vae, "block_out_channels", std::vector<int>(40, 32))); }, ErrorKind::Format,
               {"1 to 8 blocks"});
  expect_error([&] { VaeConfig::from(with(m.vae, "norm_num_groups", 0)); }, ErrorKind::Format,
               {"'norm_num_groups' is 0"});
  expect_error([&] { VaeConfig::from(with(m.vae, "scaling_factor", 1e300)); }, ErrorKind::Format, {"scaling_factor"});
  // The unmodified configs read as before.
  EXPECT_EQ(DitConfig::from(m.transformer).head_dim, 32);
  EXPECT_EQ(VaeConfig::from(m.vae).block_out_channels.size(), 4u);
  EXPECT_EQ(Qwen3Config::from(m.text_encoder).kv_heads, 2);
}
