// LoRA: the key formats trainers write (one mapping table), merge at load against diffusers'
// load_lora_weights + set_adapters (tests/golden/wave2), and what is refused or reported.
#include "model/lora.h"

#include <gtest/gtest.h>
#include <httplib.h>
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/linear.h"
#include "model/model_source.h"
#include "model/zimage_dit.h"
#include "parallel/local_communicator.h"
#include "pipeline/multi_gpu_pipeline.h"
#include "pipeline/text_to_image.h"
#include "server/batcher.h"
#include "server/http_server.h"
#include "server/lora_library.h"
#include "server/metrics.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_images_match;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;
using zimage::testing::temp_path;

namespace {

// A DiT of dim 8 (1 head of 8), one layer and one refiner of each kind: every LoRA-able module exists.
std::vector<WeightSpec> small_specs() {
  Config c = Config::parse(R"({"dim": 8, "n_heads": 1, "n_layers": 1, "n_refiner_layers": 1, "in_channels": 4,
    "all_patch_size": [2], "all_f_patch_size": [1], "cap_feat_dim": 6, "axes_dims": [2, 2, 4],
    "rope_theta": 256.0, "t_scale": 1000.0, "norm_eps": 1e-5})",
                           "small");
  return ZImageDit::weight_specs(c);
}

Tensor ramp(const Shape& shape, float step, float offset = 0.0f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = offset + step * float((i * 7) % 13 - 6);
  return t;
}

std::shared_ptr<const LoraAdapter> write_and_load(const std::string& file,
                                                  const std::vector<std::pair<std::string, Tensor>>& tensors,
                                                  const std::vector<WeightSpec>& specs,
                                                  const std::map<std::string, std::string>& metadata = {}) {
  const std::string path = temp_path(file);
  write_safetensors(path, tensors, metadata);
  return std::make_shared<const LoraAdapter>(load_lora(path, specs));
}

// The update one adapter makes to `name` (merged minus base), as float32 [rows, in].
Tensor delta_of(const LoraAdapter& a, const std::string& name, const Shape& shape, float scale = 1.0f) {
  Tensor w = Tensor::zeros(shape, DType::F32);
  for (const auto& f : a.factors)
    if (f.target == name) add_low_rank_(w, f, scale);
  return w;
}

}  // namespace

TEST(LoraKeys, EveryFormatMapsToTheCanonicalModule) {
  const auto specs = small_specs();
  const std::vector<std::pair<std::string, std::string>> cases = {
      // kohya / musubi
      {"lora_unet_layers_0_attention_to_q.lora_down.weight", "layers.0.attention.to_q"},
      {"lora_unet_layers_0_attention_to_out_0.lora_up.weight", "layers.0.attention.to_out.0"},
      {"lora_unet_noise_refiner_0_feed_forward_w1.alpha", "noise_refiner.0.feed_forward.w1"},
      {"lora_unet_context_refiner_0_feed_forward_w2.lora_down.weight", "context_refiner.0.feed_forward.w2"},
      {"lora_unet_layers_0_adaLN_modulation_0.lora_down.weight", "layers.0.adaLN_modulation.0"},
      {"lora_unet_all_final_layer_2_1_linear.lora_up.weight", "all_final_layer.2-1.linear"},
      // PEFT / diffusers, every prefix, adapter names
      {"transformer.layers.0.attention.to_k.lora_A.weight", "layers.0.attention.to_k"},
      {"diffusion_model.layers.0.attention.to_v.lora_B.weight", "layers.0.attention.to_v"},
      {"layers.0.feed_forward.w3.lora_A.weight", "layers.0.feed_forward.w3"},
      {"transformer.layers.0.attention.to_q.lora_A.default.weight", "layers.0.attention.to_q"},
      {"base_model.model.layers.0.attention.to_q.lora_B.my_style.weight", "layers.0.attention.to_q"},
      {"transformer.noise_refiner.0.adaLN_modulation.0.lora_A.weight", "noise_refiner.0.adaLN_modulation.0"},
      {"transformer.t_embedder.mlp.2.lora_A.weight", "t_embedder.mlp.2"},
      // ai-toolkit
      {"diffusion_model.noise_refiner.0.attention.to_out.0.lora_A.weight", "noise_refiner.0.attention.to_out.0"},
      // ComfyUI / original names: fused qkv, out, final_layer, x_embedder
      {"diffusion_model.layers.0.attention.qkv.lora_A.weight", "layers.0.attention.qkv"},
      {"model.diffusion_model.layers.0.attention.out.lora_B.weight", "layers.0.attention.to_out.0"},
      {"lora_unet_layers_0_attention_qkv.lora_down.weight", "layers.0.attention.qkv"},
      {"diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight", "all_final_layer.2-1.adaLN_modulation.1"},
      {"diffusion_model.x_embedder.lora_A.weight", "all_x_embedder.2-1"},
      {"diffusion_model.cap_embedder.1.lora_A.weight", "cap_embedder.1"},
      // dot forms
      {"diffusion_model.layers.0.attention.to.q.lora.down.weight", "layers.0.attention.to_q"},
      {"layers.0.attention.to_out.0.lora.up.weight", "layers.0.attention.to_out.0"},
      // nothing: text encoder, norms, modules that do not exist
      {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", ""},
      {"diffusion_model.layers.0.attention_norm1.lora_A.weight", ""},
      {"diffusion_model.layers.7.attention.to_q.lora_A.weight", ""},
      {"diffusion_model.layers.0.attention.to_q.weight", ""},
  };
  for (const auto& [key, module] : cases) EXPECT_EQ(lora_module_for_key(key, specs), module) << key;
}

TEST(LoraKeys, KohyaPeftComfyAndDotFormsGiveTheSameUpdate) {
  const auto specs = small_specs();
  const std::string q = "layers.0.attention.to_q.weight";
  Tensor down = ramp({2, 8}, 0.1f), up = ramp({8, 2}, 0.05f, 0.01f);
  Tensor alpha = Tensor::from_f32({}, {1.0f});  // alpha 1, rank 2: x0.5
  auto kohya = write_and_load("k.safetensors",
                              {{"lora_unet_layers_0_attention_to_q.lora_down.weight", down.to_dtype(DType::BF16)},
                               {"lora_unet_layers_0_attention_to_q.lora_up.weight", up.to_dtype(DType::BF16)},
                               {"lora_unet_layers_0_attention_to_q.alpha", alpha}},
                              specs);
  auto peft = write_and_load("p.safetensors",
                             {{"transformer.layers.0.attention.to_q.lora_A.default.weight", down},
                              {"transformer.layers.0.attention.to_q.lora_B.default.weight", up}},
                             specs);
  auto dots = write_and_load("d.safetensors",
                             {{"diffusion_model.layers.0.attention.to.q.lora.down.weight", down},
                              {"diffusion_model.layers.0.attention.to.q.lora.up.weight", up},
                              {"diffusion_model.layers.0.attention.to_q.alpha", alpha}},
                             specs);
  // PEFT metadata alpha (diffusers' save_lora_weights writes lora_adapter_metadata).
  auto meta = write_and_load(
      "m.safetensors", {{"layers.0.attention.to_q.lora_A.weight", down}, {"layers.0.attention.to_q.lora_B.weight", up}},
      specs, {{"lora_adapter_metadata", R"({"r": 2, "lora_alpha": 1})"}});
  // Reference: 0.5 * up * down in double.
  Tensor ref = Tensor::zeros({8, 8}, DType::F32);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      double s = 0;
      for (int k = 0; k < 2; ++k) s += double(up.f32()[i * 2 + k]) * double(down.f32()[k * 8 + j]);
      ref.f32()[i * 8 + j] = float(0.5 * s);
    }
  EXPECT_LE(max_abs_diff(delta_of(*peft, q, {8, 8}, 0.5f), ref), 1e-6) << "PEFT without alpha: alpha = r";
  EXPECT_LE(max_abs_diff(delta_of(*dots, q, {8, 8}), ref), 1e-6);
  EXPECT_LE(max_abs_diff(delta_of(*meta, q, {8, 8}), ref), 1e-6);
  EXPECT_LE(max_abs_diff(delta_of(*kohya, q, {8, 8}), ref), 2e-3) << "bf16 factors";
  EXPECT_EQ(kohya->factors.size(), 1u);
  EXPECT_EQ(kohya->max_rank, 2);
}

TEST(LoraKeys, FusedQkvLandsInRowSlicesAndDuplicatesAreSkipped) {
  const auto specs = small_specs();
  Tensor down = ramp({2, 8}, 0.1f), up = ramp({24, 2}, 0.05f);
  auto fused = write_and_load("qkv.safetensors",
                              {{"diffusion_model.layers.0.attention.qkv.lora_A.weight", down},
                               {"diffusion_model.layers.0.attention.qkv.lora_B.weight", up},
                               {"diffusion_model.layers.0.attention.out.lora_A.weight", down},
                               {"diffusion_model.layers.0.attention.out.lora_B.weight", up.narrow0(0, 8).clone()}},
                              specs);
  ASSERT_EQ(fused->factors.size(), 4u);
  const char* names[] = {"to_q", "to_k", "to_v"};
  for (int p = 0; p < 3; ++p) {
    auto separate = write_and_load(
        std::string("sep_") + names[p] + ".safetensors",
        {{std::string("layers.0.attention.") + names[p] + ".lora_A.weight", down},
         {std::string("layers.0.attention.") + names[p] + ".lora_B.weight", up.narrow0(8 * p, 8).clone()}},
        specs);
    const std::string w = std::string("layers.0.attention.") + names[p] + ".weight";
    EXPECT_EQ(max_abs_diff(delta_of(*fused, w, {8, 8}), delta_of(*separate, w, {8, 8})), 0.0) << names[p];
  }
  EXPECT_GT(
      max_abs_diff(delta_of(*fused, "layers.0.attention.to_out.0.weight", {8, 8}), Tensor::zeros({8, 8}, DType::F32)),
      0);
  // Anime-Z style files carry qkv beside to_q/k/v and out beside to_out.0: diffusers uses the individual
  // ones; so do we, and say so.
  auto both = write_and_load("both.safetensors",
                             {{"layers.0.attention.qkv.lora_A.weight", down},
                              {"layers.0.attention.qkv.lora_B.weight", up},
                              {"layers.0.attention.to_q.lora_A.weight", down},
                              {"layers.0.attention.to_q.lora_B.weight", up.narrow0(0, 8).clone()},
                              {"layers.0.attention.out.lora_A.weight", down},
                              {"layers.0.attention.out.lora_B.weight", up.narrow0(0, 8).clone()},
                              {"layers.0.attention.to_out.0.lora_A.weight", down},
                              {"layers.0.attention.to_out.0.lora_B.weight", up.narrow0(0, 8).clone()}},
                             specs);
  EXPECT_EQ(both->factors.size(), 2u);
  EXPECT_EQ(both->ignored.size(), 2u);
  EXPECT_EQ(max_abs_diff(delta_of(*both, "layers.0.attention.to_k.weight", {8, 8}), Tensor::zeros({8, 8}, DType::F32)),
            0);
}

TEST(LoraKeys, UnmatchedKeysAreReportedAndNothingMatchedIsAnError) {
  const auto specs = small_specs();
  Tensor down = ramp({2, 8}, 0.1f), up = ramp({8, 2}, 0.05f);
  auto partly = write_and_load("partly.safetensors",
                               {{"layers.0.attention.to_q.lora_A.weight", down},
                                {"layers.0.attention.to_q.lora_B.weight", up},
                                {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", down},
                                {"layers.9.attention.to_q.lora_A.weight", down}},
                               specs);
  EXPECT_EQ(partly->factors.size(), 1u);
  EXPECT_EQ(partly->unmatched,
            (std::vector<std::string>{"layers.9.attention.to_q.lora_A.weight",
                                      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"}));
  write_safetensors(temp_path("none.safetensors"), {{"lora_te_x.lora_down.weight", down}, {"something_else", up}});
  expect_error([&] { load_lora(temp_path("none.safetensors"), specs); }, ErrorKind::InvalidArgument,
               {"no key matches", "lora_te_x.lora_down.weight", "something_else"});
}

TEST(LoraKeys, RefusesLycorisAndMismatchedShapes) {
  const auto specs = small_specs();
  Tensor m = ramp({4, 4}, 0.1f);
  write_safetensors(temp_path("lokr.safetensors"), {{"lycoris_layers_0_attention_to_q.lokr_w1", m}});
  expect_error([&] { load_lora(temp_path("lokr.safetensors"), specs); }, ErrorKind::Format, {"LoKr", "LoRA only"});
  write_safetensors(temp_path("loha.safetensors"), {{"lycoris_layers_0_attention_to_q.hada_w1_a", m}});
  expect_error([&] { load_lora(temp_path("loha.safetensors"), specs); }, ErrorKind::Format, {"LoHa"});
  write_safetensors(temp_path("big.safetensors"), {{"layers.0.attention.to_q.lora_A.weight", ramp({2, 16}, 0.1f)},
                                                   {"layers.0.attention.to_q.lora_B.weight", ramp({16, 2}, 0.1f)}});
  expect_error([&] { load_lora(temp_path("big.safetensors"), specs); }, ErrorKind::Format, {"another model"});
  write_safetensors(temp_path("half.safetensors"), {{"layers.0.attention.to_q.lora_A.weight", ramp({2, 8}, 0.1f)}});
  expect_error([&] { load_lora(temp_path("half.safetensors"), specs); }, ErrorKind::Format, {"no up"});
  expect_error([&] { load_lora(temp_path("missing.safetensors"), specs); }, ErrorKind::NotFound, {"does not exist"});
}

// apply(): y_i = W x_i + b + B_i (A_i x_i) per item, items of uneven row counts (row offsets that break
// 16-byte alignment take the copy path), a packed Linear whose second part alone has an adapter, and an
// item without one, against the sums in double.
TEST(LinearApply, PerItemAdaptersMatchTheMath) {
  auto be = make_cpu_backend();
  const int64_t in = 170, out_q = 6, out_k = 4;
  Tensor wq = ramp({out_q, in}, 0.01f), wk = ramp({out_k, in}, 0.02f, 0.001f), bias = ramp({out_q + out_k}, 0.1f);
  Linear l;
  l.w = be->upload(Tensor::zeros({out_q + out_k, in}, DType::F32));
  std::memcpy(l.w.f32(), wq.f32(), wq.nbytes());
  std::memcpy(l.w.f32() + out_q * in, wk.f32(), wk.nbytes());
  l.bias = be->upload(bias);
  l.parts = {"q.weight", "k.weight"};
  l.part_rows = {out_q, out_k};
  auto adapter = [&](float s) {
    auto a = std::make_shared<LoraAdapter>();
    a->factors.push_back({"k.weight", 0, ramp({3, in}, 0.03f * s), ramp({out_k, 3}, 0.05f), "k"});
    return a;
  };
  std::vector<ScaledLora> one = {{adapter(1.0f), 0.5f}}, two = {{adapter(-2.0f), 1.0f}, {adapter(1.0f), 0.25f}};
  auto s1 = std::make_shared<const LoraSet>(*be, one, std::vector<const Linear*>{&l});
  auto s2 = std::make_shared<const LoraSet>(*be, two, std::vector<const Linear*>{&l});
  LoraBatch batch{{s1, nullptr, s2, s2}};
  const std::vector<int64_t> rows = {1, 2, 3, 1};
  Tensor x = ramp({7, in}, 0.05f, 0.01f);
  Tensor y = be->to_host_f32(apply(*be, l, be->upload(x), &batch, &rows));
  const std::vector<ScaledLora>* sets[] = {&one, nullptr, &two, &two};
  double worst = 0;
  for (int64_t item = 0, r = 0; item < 4; ++item)
    for (int64_t k = 0; k < rows[size_t(item)]; ++k, ++r)
      for (int64_t o = 0; o < out_q + out_k; ++o) {
        double want = bias.f32()[o];
        for (int64_t j = 0; j < in; ++j) want += double(l.w.f32()[o * in + j]) * x.f32()[r * in + j];
        if (sets[item] && o >= out_q)
          for (const auto& sa : *sets[item])
            for (const auto& f : sa.adapter->factors)
              for (int64_t q = 0; q < 3; ++q) {
                double ax = 0;
                for (int64_t j = 0; j < in; ++j) ax += double(f.down.f32()[q * in + j]) * x.f32()[r * in + j];
                want += sa.scale * double(f.up.f32()[(o - out_q) * 3 + q]) * ax;
              }
        worst = std::max(worst, std::abs(want - double(y.f32()[r * (out_q + out_k) + o])));
      }
  EXPECT_LE(worst, 1e-4);
  EXPECT_EQ(s1->find(l) != nullptr, true);
}

TEST(LoraFlag, FileAndOptionalScale) {
  EXPECT_EQ(parse_lora_flag("a.safetensors"), (std::pair<std::string, float>{"a.safetensors", 1.0f}));
  EXPECT_EQ(parse_lora_flag("a.safetensors:0.8"), (std::pair<std::string, float>{"a.safetensors", 0.8f}));
  EXPECT_EQ(parse_lora_flag("/x/a:b.safetensors"), (std::pair<std::string, float>{"/x/a:b.safetensors", 1.0f}));
  EXPECT_EQ(parse_lora_flag("a.safetensors:-1.5"), (std::pair<std::string, float>{"a.safetensors", -1.5f}));
}

// ---- Golden: diffusers' ZImagePipeline.load_lora_weights + set_adapters on the tiny model. ----

namespace {

struct LoraCase {
  std::string name;
  nlohmann::json args;
  std::shared_ptr<SafetensorsFile> tensors;
};

LoraCase lora_case(const std::string& name) {
  const auto dir = std::filesystem::path(golden_path("wave2/cases")) / name;
  std::ifstream in(dir / "case.json");
  return {name, nlohmann::json::parse(in), SafetensorsFile::open((dir / "tensors.safetensors").string())};
}

GenerateRequest request_for(const LoraCase& c) {
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

// The case's adapter (none for lora_none), as diffusers loaded it.
std::vector<ScaledLora> adapters_for(const LoraCase& c, const ModelSource& m) {
  if (!c.args.contains("lora")) return {};
  auto a = std::make_shared<const LoraAdapter>(load_lora(
      golden_path("wave2/" + c.args["lora"]["file"].get<std::string>()), ZImageDit::weight_specs(m.transformer)));
  return {{a, c.args["lora"]["scale"].get<float>()}};
}

const char* const kLoraCases[] = {"lora_kohya", "lora_peft_scaled", "lora_none"};

}  // namespace

TEST(LoraGolden, MergedAtLoadMatchesDiffusers) {
  auto be = make_cpu_backend();
  for (const char* name : kLoraCases) {
    const LoraCase c = lora_case(name);
    ModelSource m = open_model(golden_path("tiny-zimage"));
    auto adapters = adapters_for(c, m);
    if (!adapters.empty()) m.transformer_weights = std::make_shared<LoraMergedWeights>(m.transformer_weights, adapters);
    TextToImagePipeline p(*be, m);
    GenerateResult res = p.generate(request_for(c));
    const double err = max_abs_diff(res.latents, c.tensors->get("output.latents"));
    EXPECT_LE(err, 1e-3) << name;
    std::printf("%-18s merged: final latents max abs error %.3g\n", name, err);
    expect_images_match(res.images, c.tensors->get("output.image_u8"), name);
  }
}

TEST(LoraGolden, RuntimeAdaptersMatchDiffusersAndTheMergedPath) {
  auto be = make_cpu_backend();
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  TextToImagePipeline p(*be, m);  // base weights, adapters per request
  for (const char* name : kLoraCases) {
    const LoraCase c = lora_case(name);
    GenerateRequest r = request_for(c);
    r.lora_groups = {{1, adapters_for(c, m)}};
    GenerateResult res = p.generate(r);
    const double err = max_abs_diff(res.latents, c.tensors->get("output.latents"));
    EXPECT_LE(err, 1e-3) << name;
    std::printf("%-18s runtime: final latents max abs error %.3g\n", name, err);
    expect_images_match(res.images, c.tensors->get("output.image_u8"), name);
  }
}

TEST(LoraGolden, ItemsWithDifferentAdaptersShareABatch) {
  auto be = make_cpu_backend();
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  TextToImagePipeline p(*be, m);
  const LoraCase kohya = lora_case("lora_kohya"), peft = lora_case("lora_peft_scaled"), none = lora_case("lora_none");
  // Three requests in one batch, as the server's batcher makes it: [kohya, none, peft], each its own noise.
  GenerateRequest r = request_for(none);
  r.prompts = {r.prompts[0], r.prompts[0], r.prompts[0]};
  r.noise_groups = {{1, r.seed}, {1, r.seed}, {1, r.seed}};
  r.lora_groups = {{1, adapters_for(kohya, m)}, {1, {}}, {1, adapters_for(peft, m)}};
  GenerateResult batch = p.generate(r);
  const LoraCase* refs[] = {&kohya, &none, &peft};
  for (int64_t i = 0; i < 3; ++i) {
    const double err = max_abs_diff(batch.latents.narrow0(i, 1), refs[i]->tensors->get("output.latents"));
    EXPECT_LE(err, 1e-3) << refs[i]->name;
    std::printf("batch item %lld (%s): final latents max abs error %.3g\n", (long long)i, refs[i]->name.c_str(), err);
  }
  // The same request alone gives the same latents (the CPU backend is batch-invariant), and a later
  // request without adapters sees the base weights.
  GenerateRequest alone = request_for(kohya);
  alone.lora_groups = {{1, adapters_for(kohya, m)}};
  EXPECT_EQ(max_abs_diff(p.generate(alone).latents, batch.latents.narrow0(0, 1)), 0.0);
  EXPECT_LE(max_abs_diff(p.generate(request_for(none)).latents, none.tensors->get("output.latents")), 1e-3);
  // Counts that do not cover the batch are the caller's error.
  r.lora_groups = {{2, {}}};
  expect_error([&] { p.generate(r); }, ErrorKind::InvalidArgument, {"LoRA groups cover 2 images of a batch of 3"});
}

TEST(LoraGolden, RuntimeEqualsMergedWithinFloat32Rounding) {
  auto be = make_cpu_backend();
  ModelSource base = open_model(golden_path("tiny-zimage"));
  const LoraCase c = lora_case("lora_kohya");
  // Two adapters at once, scales adding as set_adapters(["a", "b"], [0.7, -0.4]).
  auto specs = ZImageDit::weight_specs(base.transformer);
  std::vector<ScaledLora> two = {
      {std::make_shared<const LoraAdapter>(load_lora(golden_path("wave2/lora_kohya.safetensors"), specs)), 0.7f},
      {std::make_shared<const LoraAdapter>(load_lora(golden_path("wave2/lora_peft.safetensors"), specs)), -0.4f}};
  GenerateRequest r = request_for(c);
  r.lora_groups = {{1, two}};
  TextToImagePipeline runtime(*be, base);
  const Tensor a = runtime.generate(r).latents;
  ModelSource merged_model = base;
  merged_model.transformer_weights = std::make_shared<LoraMergedWeights>(base.transformer_weights, two);
  TextToImagePipeline merged(*be, merged_model);
  r.lora_groups.clear();
  const Tensor b = merged.generate(r).latents;
  const double err = max_abs_diff(a, b);
  std::printf("two adapters, runtime vs merged: final latents max abs difference %.3g\n", err);
  EXPECT_LE(err, 1e-5);
  EXPECT_GT(max_abs_diff(a, c.tensors->get("output.latents")), 1e-3) << "the second adapter changes the image";
}

// Adapters on every kind of projection, the packed ones included (the stacked adaLN of all modulated
// blocks, QKV, w1|w3), the embedders and the final layer: run time equals merged.
TEST(LoraGolden, EveryProjectionRuntimeEqualsMerged) {
  ModelSource base = open_model(golden_path("tiny-zimage"));
  const auto specs = ZImageDit::weight_specs(base.transformer);
  std::vector<std::pair<std::string, Tensor>> tensors;
  int k = 0;
  for (const auto& spec : specs) {
    if (spec.shape.size() != 2 || spec.name.size() < 7 || spec.name.compare(spec.name.size() - 7, 7, ".weight") != 0)
      continue;
    const std::string module = "diffusion_model." + spec.name.substr(0, spec.name.size() - 7);
    const int64_t r = 2 + k % 3;
    tensors.push_back({module + ".lora_A.weight", ramp({r, spec.shape[1]}, 0.02f, 0.001f * float(k))});
    tensors.push_back({module + ".lora_B.weight", ramp({spec.shape[0], r}, 0.02f, -0.001f * float(k))});
    ++k;
  }
  const std::string path = temp_path("every_projection.safetensors");
  write_safetensors(path, tensors);
  auto adapter = std::make_shared<const LoraAdapter>(load_lora(path, specs));
  EXPECT_EQ(int64_t(adapter->factors.size()), int64_t(k));
  EXPECT_TRUE(adapter->unmatched.empty());
  const std::vector<ScaledLora> set = {{adapter, 0.8f}};
  auto be = make_cpu_backend();
  GenerateRequest r = request_for(lora_case("lora_none"));
  r.guidance = 2.0f;  // CFG: every item twice per call
  r.prompts = {"pixel art robot", "a lighthouse at night"};
  r.lora_groups = {{1, {}}, {1, set}};
  TextToImagePipeline runtime(*be, base);
  const Tensor a = runtime.generate(r).latents;
  ModelSource merged_model = base;
  merged_model.transformer_weights = std::make_shared<LoraMergedWeights>(base.transformer_weights, set);
  TextToImagePipeline merged(*be, merged_model), plain(*be, base);
  r.lora_groups.clear();
  const Tensor b = merged.generate(r).latents, c = plain.generate(r).latents;
  const double err = max_abs_diff(a.narrow0(1, 1), b.narrow0(1, 1));
  std::printf("LoRA on all %d projections, runtime vs merged: final latents max abs difference %.3g\n", k, err);
  EXPECT_LE(err, 1e-5);
  EXPECT_EQ(max_abs_diff(a.narrow0(0, 1), c.narrow0(0, 1)), 0.0) << "the item without an adapter is the base model's";
  EXPECT_GT(max_abs_diff(b.narrow0(1, 1), c.narrow0(1, 1)), 1e-3);
}

// With CFG (each item twice in a call: [positives | negatives]) and across simulated ranks (Ulysses halves
// of every item's tokens; a CFG pair split over two ranks), a batch with different adapters per item
// gives what one rank gives.
TEST(LoraGolden, MixedAdaptersWithCfgAndSimulatedRanksMatchOneRank) {
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  auto be = make_cpu_backend();
  TextToImagePipeline single(*be, m);
  const LoraCase kohya = lora_case("lora_kohya"), peft = lora_case("lora_peft_scaled");
  GenerateRequest r = request_for(kohya);
  r.prompts = {"pixel art robot", "a watercolor fox"};
  r.guidance = 3.0f;
  r.noise_groups = {{1, 25}, {1, 26}};
  r.lora_groups = {{1, adapters_for(kohya, m)}, {1, adapters_for(peft, m)}};
  const GenerateResult want = single.generate(r);
  GenerateRequest plain = r;
  plain.lora_groups.clear();
  EXPECT_GT(max_abs_diff(single.generate(plain).latents, want.latents), 1e-3) << "the adapters change the images";
  for (auto [u, cfg] : {std::pair{2, false}, std::pair{1, true}, std::pair{2, true}}) {
    ParallelConfig c;
    c.ulysses_degree = u;
    c.cfg_parallel = cfg;
    c.num_gpus = u * c.cfg_groups();
    std::vector<std::unique_ptr<Backend>> backends;
    std::vector<Backend*> raw;
    for (int i = 0; i < c.num_gpus; ++i) {
      backends.push_back(make_cpu_backend());
      raw.push_back(backends.back().get());
    }
    LocalWorld world(c.num_gpus);
    MultiGpuPipeline ranks(raw, world, m, c);
    const double err = max_abs_diff(ranks.generate(r).latents, want.latents);
    std::printf("mixed adapters, CFG, U=%d cfg-parallel=%d: final latents max abs diff to one rank %.3g\n", u, int(cfg),
                err);
    EXPECT_LE(err, 1e-5) << "U=" << u << " cfg=" << cfg;
  }
}

// ---- Runtime adapters through the server: one session, requests with and without a LoRA. ----

TEST(LoraServer, RequestsWithAndWithoutAnAdapterShareOneModel) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  const fs::path dir = temp_path("lora_dir");
  fs::create_directories(dir);
  fs::copy_file(golden_path("wave2/lora_kohya.safetensors"), dir / "pixel.safetensors",
                fs::copy_options::overwrite_existing);
  fs::copy_file(golden_path("wave2/lora_peft.safetensors"), dir / "soft.safetensors",
                fs::copy_options::overwrite_existing);

  auto be = make_cpu_backend();
  const ModelSource m = open_model(golden_path("tiny-zimage"));
  TextToImagePipeline pipeline(*be, m);
  std::vector<size_t> batch_groups;  // lora_groups of every batch the model ran
  server::Metrics metrics;
  server::Batcher::Options bo;
  bo.batch_delay = std::chrono::milliseconds(200);  // the two concurrent requests below share a batch
  server::Batcher batcher(
      [&](const GenerateRequest& r) {
        batch_groups.push_back(r.lora_groups.size());
        return pipeline.generate(r);
      },
      bo, metrics);
  server::ServerOptions so;
  so.port = 0;
  so.model_id = "tiny-zimage";
  so.policy.default_steps = 3;
  so.loras = std::make_shared<server::LoraLibrary>(dir.string(), ZImageDit::weight_specs(m.transformer), 1);
  so.policy.lora_names = {"pixel", "soft"};
  server::HttpServer http(so, batcher, metrics);
  const int port = http.start();
  http.set_ready();
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(120, 0);

  auto body = [](json lora) {
    json b = {{"prompt", "pixel art robot"},
              {"size", "64x64"},
              {"num_inference_steps", 3},
              {"seed", 25},
              {"max_sequence_length", 64}};
    if (!lora.is_null()) b["lora"] = lora;
    return b;
  };
  auto image_of = [&](const json& b) {
    httplib::Client c("127.0.0.1", port);  // one per call: the concurrent ones below need their own
    c.set_read_timeout(120, 0);
    auto r = c.Post("/v1/images/generations", b.dump(), "application/json");
    EXPECT_TRUE(r && r->status == 200) << (r ? r->body : "no answer");
    return r && r->status == 200 ? json::parse(r->body)["data"][0]["b64_json"].get<std::string>() : std::string();
  };
  const std::string base = image_of(body(nullptr));
  const std::string pixel = image_of(body(json::array({{{"name", "pixel"}, {"scale", 1.0}}})));
  const std::string soft = image_of(body(json::array({{{"name", "soft"}, {"scale", 0.6}}})));
  json sglang = body(nullptr);
  sglang["lora_path"] = "pixel";
  const std::string pixel_sglang = image_of(sglang);
  const std::string base_after = image_of(body(nullptr));
  EXPECT_NE(base, pixel);
  EXPECT_NE(pixel, soft);
  EXPECT_EQ(pixel, pixel_sglang) << "lora_path names the same adapter at scale 1";
  EXPECT_EQ(base, base_after) << "the base weights never change";

  // Two requests, different adapters, arriving together: one batch, each image as made alone.
  std::string together[2];
  std::thread a([&] { together[0] = image_of(body(json::array({{{"name", "pixel"}}}))); });
  std::thread b([&] { together[1] = image_of(body(nullptr)); });
  a.join();
  b.join();
  EXPECT_EQ(together[0], pixel);
  EXPECT_EQ(together[1], base);
  std::string sizes;
  for (size_t g : batch_groups) sizes += std::to_string(g) + " ";
  EXPECT_EQ(batch_groups.back(), 2u) << "the last batch held both requests, each with its adapters; batches: " << sizes;

  // Unknown adapters are 400 naming the field; /v1/models lists the adapters.
  auto bad = client.Post("/v1/images/generations", body(json::array({{{"name", "nope"}}})).dump(), "application/json");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
  EXPECT_EQ(json::parse(bad->body)["error"]["param"], "lora");
  EXPECT_NE(bad->body.find("unknown LoRA adapter 'nope'"), std::string::npos) << bad->body;
  auto models = client.Get("/v1/models");
  ASSERT_TRUE(models && models->status == 200);
  std::vector<std::string> ids;
  const json listed = json::parse(models->body);
  for (const auto& d : listed["data"]) ids.push_back(d["id"]);
  EXPECT_EQ(ids, (std::vector<std::string>{"tiny-zimage", "pixel", "soft"}));
  http.stop();
}

// ---- zimage generate --lora: the whole command against diffusers. ----

namespace {

std::pair<int, std::string> run_zimage(const std::string& args) {
  const char* bin = std::getenv("ZIMAGE_BINARY");  // the binary of a build carried elsewhere
  FILE* p = popen((std::string(bin && *bin ? bin : ZIMAGE_BINARY) + " " + args + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

}  // namespace

TEST(LoraCli, GenerateMergesLoraFilesAtLoad) {
  const std::string base =
      "generate --backend cpu --model " + golden_path("tiny-zimage") +
      " --prompt 'pixel art robot' --height 64 --width 64 --num-inference-steps 3 --guidance-scale 0"
      " --max-sequence-length 64 --seed 25 --generator-device cpu --output-path " +
      temp_path("cli_lora.png");
  for (const auto& [name, flag] : std::vector<std::pair<std::string, std::string>>{
           {"lora_kohya", " --lora " + golden_path("wave2/lora_kohya.safetensors")},
           {"lora_peft_scaled", " --lora " + golden_path("wave2/lora_peft.safetensors") + ":0.6"}}) {
    const std::string latents = temp_path(name + "_latents.safetensors");
    auto [code, out] = run_zimage(base + flag + " --save-latents " + latents);
    ASSERT_EQ(code, 0) << out;
    EXPECT_NE(out.find("merged at load"), std::string::npos) << out;
    const double err =
        max_abs_diff(SafetensorsFile::open(latents)->get("latents"), lora_case(name).tensors->get("output.latents"));
    std::printf("zimage generate %-18s final latents max abs error %.3g\n", name.c_str(), err);
    EXPECT_LE(err, 1e-3) << name;
  }
  // A file that is not a LoRA for this model fails before any work, naming what is wrong.
  write_safetensors(temp_path("te_only.safetensors"),
                    {{"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", ramp({2, 8}, 0.1f)}});
  auto [code, out] = run_zimage(base + " --lora " + temp_path("te_only.safetensors"));
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("no key matches a weight of the Z-Image DiT"), std::string::npos) << out;
  EXPECT_NE(out.find("lora_te_text_model_encoder_layers_0_self_attn_q_proj"), std::string::npos) << out;
}
