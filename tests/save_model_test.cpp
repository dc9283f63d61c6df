// The weight lists of the models (weight_specs) and `save-model`'s folders: a list holds exactly what
// the model's constructor loads and what diffusers stores, and a saved folder opens to the same tensors.
#include "model/save_model.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

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

using NamedShapes = std::vector<std::pair<std::string, Shape>>;

NamedShapes sorted(const std::vector<WeightSpec>& specs) {
  NamedShapes v;
  for (const auto& s : specs) v.emplace_back(s.name, s.shape);
  std::sort(v.begin(), v.end());
  return v;
}

// Passes every request on to `inner` and remembers it.
class RecordingWeights final : public WeightSource {
 public:
  explicit RecordingWeights(const WeightSource& inner) : inner_(inner) {}
  Tensor get(const std::string& name, const Shape& shape) const override {
    asked.push_back({name, shape});
    return inner_.get(name, shape);
  }
  bool has(const std::string& name) const override { return inner_.has(name); }
  std::string describe() const override { return inner_.describe(); }
  mutable std::vector<WeightSpec> asked;

 private:
  const WeightSource& inner_;
};

int64_t parameters(const std::vector<WeightSpec>& specs) {
  int64_t n = 0;
  for (const auto& s : specs) n += shape_numel(s.shape);
  return n;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

nlohmann::json read_json(const std::string& path) { return nlohmann::json::parse(std::ifstream(path)); }

}  // namespace

TEST(WeightSpecs, AreExactlyWhatTheConstructorsLoad) {
  ModelSource m = open_model("synthetic:tiny");
  auto be = make_cpu_backend();
  RecordingWeights te(*m.text_encoder_weights), dit(*m.transformer_weights), vae(*m.vae_weights);
  Qwen3TextEncoder text_encoder(*be, m.text_encoder, te);
  ZImageDit transformer(*be, m.transformer, dit);
  Vae autoencoder(*be, m.vae, vae);
  EXPECT_EQ(sorted(te.asked), sorted(Qwen3TextEncoder::weight_specs(m.text_encoder)));
  EXPECT_EQ(sorted(dit.asked), sorted(ZImageDit::weight_specs(m.transformer)));
  EXPECT_EQ(sorted(vae.asked), sorted(Vae::weight_specs(m.vae)));
}

TEST(WeightSpecs, AreExactlyWhatDiffusersStores) {
  // The golden folder was written by diffusers' save_pretrained: every tensor in it, with its shape.
  ModelSource m = open_model(golden_path("tiny-zimage"));
  auto stored = [](const std::string& component) {
    Checkpoint c = Checkpoint::open_dir(golden_path("tiny-zimage/" + component));
    NamedShapes v;
    for (const auto& n : c.names()) v.emplace_back(n, c.get(n).shape());
    return v;  // names() is sorted
  };
  EXPECT_EQ(sorted(ZImageDit::weight_specs(m.transformer)), stored("transformer"));
  EXPECT_EQ(sorted(Qwen3TextEncoder::weight_specs(m.text_encoder)), stored("text_encoder"));
  EXPECT_EQ(sorted(Vae::weight_specs(m.vae)), stored("vae"));
}

TEST(WeightSpecs, TurboHasTheRealModelsSizes) {
  ModelSource turbo = open_model("synthetic:turbo");
  // Qwen3-4B: its model.safetensors.index.json gives total_size 8044936192 bytes of bf16.
  EXPECT_EQ(parameters(Qwen3TextEncoder::weight_specs(turbo.text_encoder)), 8044936192 / 2);
  // The 6.15B DiT and the 84M-parameter Flux VAE.
  EXPECT_NEAR(double(parameters(ZImageDit::weight_specs(turbo.transformer))), 6.15e9, 0.01e9);
  EXPECT_NEAR(double(parameters(Vae::weight_specs(turbo.vae))), 83.8e6, 0.1e6);
}

TEST(SaveModel, ShardedFolderOpensToTheSameTensors) {
  const std::string dir = temp_path("saved_tiny_sharded");
  fs::remove_all(dir);
  ModelSource src = open_model("synthetic:tiny");
  SaveModelOptions opts;
  opts.shard_bytes = 64 * 1024;  // several shards per component at the tiny sizes
  SavedModel saved = save_model(src, dir, opts);
  EXPECT_EQ(saved.files.back(), "model_index.json");  // last: an interrupted save does not open

  ModelSource m = open_model(dir);
  EXPECT_FALSE(m.synthetic);
  EXPECT_EQ(m.default_steps, src.default_steps);  // the recipe travels in model_index.json
  EXPECT_EQ(m.default_guidance, src.default_guidance);
  EXPECT_EQ(m.transformer.json(), src.transformer.json());
  EXPECT_EQ(m.text_encoder.json(), src.text_encoder.json());
  EXPECT_EQ(m.vae.json(), src.vae.json());
  EXPECT_EQ(m.scheduler.json(), src.scheduler.json());
  EXPECT_TRUE(fs::exists(dir + "/tokenizer/tokenizer.json"));
  EXPECT_TRUE(fs::exists(dir + "/tokenizer/tokenizer_config.json"));

  struct Part {
    const char *folder, *stem, *prefix;
    std::vector<WeightSpec> specs;
    const WeightSource &saved, &original;
  };
  const Part parts[] = {
      {"transformer", "diffusion_pytorch_model", "", ZImageDit::weight_specs(src.transformer), *m.transformer_weights,
       *src.transformer_weights},
      {"text_encoder", "model", "model.", Qwen3TextEncoder::weight_specs(src.text_encoder), *m.text_encoder_weights,
       *src.text_encoder_weights},
      {"vae", "diffusion_pytorch_model", "", Vae::weight_specs(src.vae), *m.vae_weights, *src.vae_weights},
  };
  uint64_t all_bytes = 0;
  for (const auto& p : parts) {
    SCOPED_TRACE(p.folder);
    // Every tensor is bit for bit the source's.
    for (const auto& s : p.specs)
      EXPECT_TRUE(same_bytes(p.saved.get(s.name, s.shape), p.original.get(s.name, s.shape))) << s.name;
    // The index: total_size and a weight_map naming every tensor as stored, each in the shard that has it.
    auto index = read_json(dir + "/" + p.folder + "/" + p.stem + ".safetensors.index.json");
    std::set<std::string> expected, mapped, shards;
    uint64_t bytes = 0;
    for (const auto& s : p.specs) {
      expected.insert(p.prefix + s.name);
      bytes += uint64_t(shape_numel(s.shape)) * 2;
    }
    for (const auto& [name, shard] : index["weight_map"].items()) {
      mapped.insert(name);
      shards.insert(shard.get<std::string>());
      EXPECT_TRUE(SafetensorsFile::open(dir + "/" + p.folder + "/" + shard.get<std::string>())->has(name)) << name;
    }
    EXPECT_EQ(mapped, expected);
    EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), bytes);
    all_bytes += bytes;
    ASSERT_GT(shards.size(), 1u);
    const std::string n = std::to_string(shards.size());
    EXPECT_EQ(*shards.begin(),
              std::string(p.stem) + "-00001-of-" + std::string(5 - n.size(), '0') + n + ".safetensors");
    for (const auto& shard : shards) {  // within the limit unless one tensor alone is larger
      auto f = SafetensorsFile::open(dir + "/" + p.folder + "/" + shard);
      size_t data = 0;
      for (const auto& [name, e] : f->entries()) data += e.end - e.begin;
      EXPECT_TRUE(data <= opts.shard_bytes || f->entries().size() == 1) << shard;
      for (const auto& [name, e] : f->entries()) EXPECT_EQ(e.dtype, DType::BF16) << name;
    }
  }
  EXPECT_EQ(saved.weight_bytes, all_bytes);
  fs::remove_all(dir);
}

TEST(SaveModel, DefaultLayoutIsTheRealCheckpoints) {
  const std::string dir = temp_path("saved_tiny_default");
  fs::remove_all(dir);
  save_model(open_model("synthetic:tiny"), dir);
  // Small enough for one file per component, named as diffusers and transformers name a single file.
  for (const char* f :
       {"transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors", "transformer/config.json", "text_encoder/config.json",
        "vae/config.json", "scheduler/scheduler_config.json", "model_index.json"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  // The text encoder is stored as Qwen3ForCausalLM saves it (the real Z-Image-Turbo), under "model.".
  auto te = SafetensorsFile::open(dir + "/text_encoder/model.safetensors");
  EXPECT_TRUE(te->has("model.embed_tokens.weight"));
  EXPECT_FALSE(te->has("embed_tokens.weight"));
  auto index = read_json(dir + "/model_index.json");
  EXPECT_EQ(index["_class_name"], "ZImagePipeline");
  EXPECT_EQ(index["transformer"], nlohmann::json({"diffusers", "ZImageTransformer2DModel"}));
  EXPECT_EQ(index[kRecipeKey]["num_inference_steps"], kTurboSteps);
  fs::remove_all(dir);
}

TEST(SaveModel, RecipeKeyOverridesTheFolderName) {
  const std::string dir = temp_path("base_model_copy");
  fs::remove_all(dir);
  fs::copy(golden_path("tiny-zimage"), dir, fs::copy_options::recursive);
  for (auto& e : fs::recursive_directory_iterator(dir))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  EXPECT_EQ(open_model(dir).default_steps, 50);
  auto index = read_json(dir + "/model_index.json");
  index[kRecipeKey] = {{"num_inference_steps", 12}, {"guidance_scale", 1.5}};
  std::ofstream(dir + "/model_index.json") << index.dump();
  ModelSource m = open_model(dir);
  EXPECT_EQ(m.default_steps, 12);
  EXPECT_EQ(m.default_guidance, 1.5f);
  index[kRecipeKey]["num_inference_steps"] = 0;
  std::ofstream(dir + "/model_index.json") << index.dump();
  expect_error([&] { open_model(dir); }, ErrorKind::Format, {"model_index.json", kRecipeKey});
  fs::remove_all(dir);
}

TEST(SaveModel, ResavesAFolderWithItsRealLayout) {
  // A saved folder saved again: the "model."-prefixed text encoder is read back and written out again.
  const std::string first = temp_path("resave_first"), second = temp_path("resave_second");
  fs::remove_all(first);
  fs::remove_all(second);
  save_model(open_model("synthetic:tiny"), first);
  save_model(open_model(first), second);
  ModelSource a = open_model(first), b = open_model(second);
  for (const auto& s : Qwen3TextEncoder::weight_specs(a.text_encoder))
    EXPECT_TRUE(same_bytes(a.text_encoder_weights->get(s.name, s.shape), b.text_encoder_weights->get(s.name, s.shape)))
        << s.name;
  fs::remove_all(first);
  fs::remove_all(second);
}

TEST(SaveModel, DestinationMustBeEmptyOrAModelToReplace) {
  ModelSource tiny = open_model("synthetic:tiny");
  const std::string busy = temp_path("busy_folder");
  fs::remove_all(busy);
  fs::create_directories(busy);
  std::ofstream(busy + "/notes.txt") << "mine";
  expect_error([&] { save_model(tiny, busy); }, ErrorKind::InvalidArgument, {busy, "not empty", "--force"});
  SaveModelOptions force;
  force.overwrite = true;
  expect_error([&] { save_model(tiny, busy, force); }, ErrorKind::InvalidArgument, {"no model_index.json"});
  EXPECT_TRUE(fs::exists(busy + "/notes.txt"));

  const std::string file = temp_path("a_file");
  std::ofstream(file) << "x";
  expect_error([&] { save_model(tiny, file); }, ErrorKind::InvalidArgument, {"not a folder"});

  // Replacing a sharded save by a single-file one leaves no stale shard or index behind.
  const std::string dir = temp_path("replaced_model");
  fs::remove_all(dir);
  SaveModelOptions small;
  small.shard_bytes = 64 * 1024;
  save_model(tiny, dir, small);
  ASSERT_TRUE(fs::exists(dir + "/transformer/diffusion_pytorch_model.safetensors.index.json"));
  save_model(tiny, dir, force);
  EXPECT_FALSE(fs::exists(dir + "/transformer/diffusion_pytorch_model.safetensors.index.json"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir + "/transformer"), fs::directory_iterator{}), 2);
  EXPECT_EQ(open_model(dir).default_steps, kTurboSteps);

  expect_error([&] { save_model(open_model(dir), dir, force); }, ErrorKind::InvalidArgument,
               {"is the model being saved"});
  fs::remove_all(dir);
  fs::remove_all(busy);
}
