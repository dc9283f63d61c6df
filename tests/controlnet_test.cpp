// ControlNet Union on the CPU reference against diffusers' ZImageControlNetPipeline and
// ZImageControlNetInpaintPipeline (tests/golden/wave3: v1 and v2 ControlNets on the tiny model), the
// layouts it recognises and refuses, request checks, and the server's control_image field.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/image.h"
#include "io/safetensors.h"
#include "model/zimage_controlnet.h"
#include "parallel/local_communicator.h"
#include "pipeline/multi_gpu_pipeline.h"
#include "pipeline/request_limits.h"
#include "pipeline/text_to_image.h"
#include "server/base64.h"
#include "server/edit_request.h"
#include "server/image_request.h"
#include "golden_requests.h"
#include "simulated_ranks.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_images_match;
using zimage::testing::expect_error;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;

namespace {

struct CnCase {
  nlohmann::json args;
  std::shared_ptr<SafetensorsFile> tensors;
  std::string dir;
};

CnCase load_case(const std::string& name) {
  CnCase c;
  c.dir = golden_path("wave3/cases/" + name);
  std::ifstream in(c.dir + "/case.json");
  c.args = nlohmann::json::parse(in);
  c.tensors = SafetensorsFile::open(c.dir + "/tensors.safetensors");
  return c;
}

// controlnet "union_v1" -> tests/golden/wave3/controlnet_union_v1.{safetensors,json}
ModelSource tiny_with_controlnet(const std::string& which, bool with_config = true) {
  ModelSource m = open_model(golden_path("tiny-zimage"));
  const std::string base = golden_path("wave3/controlnet_" + which);
  attach_controlnet(m, base + ".safetensors", with_config ? base + ".json" : "");
  return m;
}

GenerateRequest request_for(const CnCase& c) { return zimage::testing::golden_case_request(c.dir); }

std::string base64_of_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return server::base64_encode(std::string(std::istreambuf_iterator<char>(in), {}));
}

}  // namespace

// Every v2 case end to end from its seed: final latents within 1e-3 of diffusers', the image within a
// level. cn_v1_turbo is not here: its config (add_control_noise_refiner null, n_refiner_layers 1) makes
// diffusers run a plain control_noise_refiner.0 block whose weights controlnet_union_v1.safetensors does
// not hold (diffusers initializes missing weights with a warning), so no loader of that file can give its
// latents; the engine runs the refiner blocks a v1 file holds (the released v1 holds none): 0.79 off.
TEST(ControlNet, GoldenCasesEndToEnd) {
  auto be = make_cpu_backend();
  for (const char* name : {"cn_v2_cfg", "cn_v2_inpaint"}) {
    SCOPED_TRACE(name);
    const CnCase c = load_case(name);
    const std::string which = c.args["controlnet"];
    TextToImagePipeline p(*be, tiny_with_controlnet(which));
    const GenerateRequest r = request_for(c);
    EXPECT_EQ(image_to_tensor(*r.control_image).to_vector(), c.tensors->get("input.control_u8").to_vector());
    const GenerateResult res = p.generate(r);
    const double err = max_abs_diff(res.latents, c.tensors->get("output.latents"));
    std::printf("%-14s final latents max err %.3g (|ref| max %.3g)\n", name, err,
                max_abs_diff(c.tensors->get("output.latents"), Tensor::zeros({res.latents.numel()}, DType::F32)));
    EXPECT_LE(err, 1e-3);
    expect_images_match(res.images, c.tensors->get("output.image_u8"), name);
  }
}

// The control changes the image, and scale 0 gives exactly the plain text-to-image result (its outputs are
// added times zero): the hook itself adds nothing else.
TEST(ControlNet, ScaleZeroIsTextToImage) {
  auto be = make_cpu_backend();
  const CnCase c = load_case("cn_v2_cfg");
  TextToImagePipeline with(*be, tiny_with_controlnet("union_v2"));
  GenerateRequest r = request_for(c);
  r.controlnet_scale = 0.0f;
  const GenerateResult zero = with.generate(r);
  GenerateRequest plain = r;
  plain.control_image.reset();
  const GenerateResult none = with.generate(plain);
  EXPECT_EQ(zero.latents.to_vector(), none.latents.to_vector());
  r.controlnet_scale = 0.6f;
  EXPECT_GT(max_abs_diff(with.generate(r).latents, none.latents), 1e-2);
}

// Two ranks splitting each image's tokens (Ulysses, simulated on the CPU) run the control blocks on
// their shards and give the single-rank latents.
TEST(ControlNet, SequenceParallelMatchesOneRank) {
  const CnCase c = load_case("cn_v2_inpaint");
  const ModelSource model = tiny_with_controlnet("union_v2");
  auto be = make_cpu_backend();
  TextToImagePipeline one(*be, model);
  const GenerateRequest r = request_for(c);
  const GenerateResult ref = one.generate(r);
  zimage::testing::SimulatedRanks sharded(zimage::testing::parallel(2, false), model);
  const GenerateResult res = sharded.pipeline->generate(r);
  const double err = max_abs_diff(res.latents, ref.latents);
  std::printf("ulysses 2 vs one rank: max err %.3g\n", err);
  EXPECT_LE(err, 1e-5);
}

// Without a config, only the released layouts are accepted (the tiny model's are not one of them);
// configs are checked against the DiT.
TEST(ControlNet, LayoutsAreRecognisedOrRefused) {
  expect_error([] { tiny_with_controlnet("union_v1", /*with_config=*/false); }, ErrorKind::InvalidArgument,
               {"1 control blocks over 16 input channels", "not a released Z-Image ControlNet layout",
                "--controlnet-config"});
  const DitConfig tiny = DitConfig::from(open_model(golden_path("tiny-zimage")).transformer);
  auto config = [&](const std::string& patch) {
    nlohmann::json j = nlohmann::json::parse(std::ifstream(golden_path("wave3/controlnet_union_v2.json")));
    j.merge_patch(nlohmann::json::parse(patch));
    return ControlNetConfig::from(Config(j, "config.json"), tiny);
  };
  const ControlNetConfig v2 = config("{}");
  EXPECT_EQ(v2.layer_places, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(v2.refiner, ControlRefiner::ControlBlocks);
  EXPECT_TRUE(v2.takes_mask(16));
  expect_error([&] { config(R"({"control_layers_places": [1, 0]})"); }, ErrorKind::InvalidArgument,
               {"control_layers_places [1,0]", "increasing", "starting at 0"});
  expect_error([&] { config(R"({"control_layers_places": [0, 2]})"); }, ErrorKind::InvalidArgument, {"below 2"});
  expect_error([&] { config(R"({"control_in_dim": 20})"); }, ErrorKind::InvalidArgument, {"control_in_dim 20"});
  expect_error([&] { config(R"({"dim": 128})"); }, ErrorKind::InvalidArgument, {"made for another model"});
  expect_error([&] { config(R"({"add_control_noise_refiner": "other"})"); }, ErrorKind::InvalidArgument,
               {"add_control_noise_refiner 'other'"});

  // The released layouts on Z-Image's 30-layer DiT, as their synthetic variants lay them out.
  const DitConfig turbo = DitConfig::from(open_model("synthetic:turbo").transformer);
  const ControlNetConfig v21 = ControlNetConfig::released("v2.1", turbo);
  EXPECT_EQ(v21.layer_places.size(), 15u);
  EXPECT_EQ(v21.layer_places.back(), 28);
  EXPECT_EQ(v21.in_channels, 33);
  const auto specs = ZImageControlNet::weight_specs(turbo, v21);
  // 17 blocks of 15 tensors (+ adaLN pair), 17 after_proj pairs, 2 before_proj pairs, the embedder pair.
  EXPECT_EQ(specs.size(), size_t(17 * 15 + 17 * 2 + 2 * 2 + 2));
  EXPECT_EQ(ControlNetConfig::released("v1", turbo).layer_places, (std::vector<int64_t>{0, 5, 10, 15, 20, 25}));
  expect_error([&] { ControlNetConfig::released("v1", tiny); }, ErrorKind::InvalidArgument, {"below 2"});
  expect_error([&] { ControlNetConfig::released("v3", turbo); }, ErrorKind::InvalidArgument, {"unknown ControlNet"});
}

// What resolve() refuses, with messages naming the problem.
TEST(ControlNet, RequestChecks) {
  const CnCase c = load_case("cn_v2_inpaint");
  const GenerateRequest r = request_for(c);
  const PipelineLimits limits;
  expect_error([&] { resolve_request(r, open_model(golden_path("tiny-zimage")), limits); },
               ErrorKind::InvalidArgument, {"control image needs a ControlNet", "--controlnet"});
  const ModelSource v2 = tiny_with_controlnet("union_v2");
  GenerateRequest s = r;
  s.strength = 0.5;
  expect_error([&] { resolve_request(s, v2, limits); }, ErrorKind::InvalidArgument, {"strength does not apply"});
  s = r;
  s.masks.clear();
  expect_error([&] { resolve_request(s, v2, limits); }, ErrorKind::InvalidArgument, {"needs a mask"});
  expect_error([&] { resolve_request(r, tiny_with_controlnet("union_v1"), limits); }, ErrorKind::InvalidArgument,
               {"needs a v2.x ControlNet", "takes 16"});
  s = r;
  s.controlnet_scale = std::numeric_limits<float>::infinity();
  expect_error([&] { resolve_request(s, v2, limits); }, ErrorKind::InvalidArgument, {"controlnet_scale"});
  EXPECT_NO_THROW(resolve_request(r, v2, limits));
}

TEST(ControlNet, Base64Decoding) {
  EXPECT_EQ(server::base64_decode("aGVsbG8="), "hello");
  EXPECT_EQ(server::base64_decode("aGVsbG8h"), "hello!");
  EXPECT_EQ(server::base64_decode("aGk="), "hi");
  EXPECT_EQ(server::base64_decode("aA=="), "h");
  EXPECT_EQ(server::base64_decode(""), "");
  for (const char* bad : {"aGVsbG8", "aGVs=G8=", "a===", "aGk*", "aG\nk=", "=aGk"})
    EXPECT_FALSE(server::base64_decode(bad).has_value()) << bad;
  const std::string bytes = "\x00\xff\x10 binary \x80";
  EXPECT_EQ(server::base64_decode(server::base64_encode(bytes)), bytes);
}

// The JSON field: base64 or a data URL of the file; refused without a loaded ControlNet or when broken.
TEST(ControlNet, ServerControlImageField) {
  const std::string png = golden_path("wave3/cases/cn_v1_turbo/control.png");
  const std::string b64 = base64_of_file(png);
  server::RequestPolicy p;
  p.controlnet = true;
  for (const std::string& value : {b64, "data:image/png;base64," + b64}) {
    auto parsed = server::parse_image_request(
        nlohmann::json{{"prompt", "x"}, {"control_image", value}, {"controlnet_scale", 0.5}}.dump(), p);
    ASSERT_TRUE(std::holds_alternative<server::ImageRequest>(parsed));
    const auto& r = std::get<server::ImageRequest>(parsed);
    ASSERT_TRUE(r.control_image.has_value());
    EXPECT_EQ(image_to_tensor(*r.control_image).to_vector(), image_to_tensor(read_image(png)).to_vector());
    EXPECT_EQ(r.controlnet_scale, 0.5f);
    EXPECT_TRUE(r.runs_alone());
  }
  auto error = [&](const nlohmann::json& body, const server::RequestPolicy& policy) {
    auto parsed = server::parse_image_request(body.dump(), policy);
    EXPECT_TRUE(std::holds_alternative<server::RequestError>(parsed)) << body.dump();
    return std::holds_alternative<server::RequestError>(parsed) ? std::get<server::RequestError>(parsed)
                                                                 : server::RequestError{};
  };
  server::RequestPolicy none;
  auto e = error({{"prompt", "x"}, {"control_image", b64}}, none);
  EXPECT_NE(e.message.find("without --controlnet"), std::string::npos) << e.message;
  EXPECT_EQ(e.param, "control_image");
  e = error({{"prompt", "x"}, {"control_image", "not base64!"}}, p);
  EXPECT_NE(e.message.find("not valid base64"), std::string::npos) << e.message;
  e = error({{"prompt", "x"}, {"control_image", server::base64_encode("GIF89a....")}}, p);
  EXPECT_NE(e.message.find("not a PNG, JPEG or WebP"), std::string::npos) << e.message;
  e = error({{"prompt", "x"}, {"control_image", 3}}, p);
  EXPECT_NE(e.message.find("must be a base64 string"), std::string::npos) << e.message;
  e = error({{"prompt", "x"}, {"control_image", "data:image/png," + b64}}, p);
  EXPECT_NE(e.message.find("without \";base64,\""), std::string::npos) << e.message;
}

// On /v1/images/edits the control image is a file part: with the image and its mask it is ControlNet
// inpainting; without a mask, with a strength or without a loaded ControlNet it is refused.
TEST(ControlNet, EditsTakeAControlImagePart) {
  using zimage::testing::FormField;
  const std::string dir = golden_path("wave3/cases/cn_v2_inpaint");
  auto bytes = [&](const std::string& name) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const FormField image{"image", bytes("input.png"), "input.png", "image/png"};
  const FormField mask{"mask", bytes("mask.png"), "mask.png", "image/png"};
  const FormField control{"control_image", bytes("control.png"), "control.png", "image/png"};
  server::RequestPolicy p;
  p.controlnet = true;
  auto parse = [&](const std::vector<FormField>& fields, const server::RequestPolicy& policy) {
    return server::parse_edit_request(zimage::testing::kFormType, zimage::testing::form_body(fields), policy);
  };
  auto ok = parse({{"prompt", "a stone bridge"}, image, mask, control, {"controlnet_scale", "0.9"}}, p);
  ASSERT_TRUE((std::holds_alternative<std::vector<server::ImageRequest>>(ok)))
      << std::get<server::RequestError>(ok).message;
  const auto& r = std::get<std::vector<server::ImageRequest>>(ok).at(0);
  ASSERT_TRUE(r.control_image.has_value());
  EXPECT_EQ(image_to_tensor(*r.control_image).to_vector(), image_to_tensor(read_image(dir + "/control.png")).to_vector());
  EXPECT_EQ(r.controlnet_scale, 0.9f);
  EXPECT_EQ(r.masks.size(), 1u);
  EXPECT_TRUE(r.runs_alone());
  auto refused = [&](const std::vector<FormField>& fields, const server::RequestPolicy& policy, const std::string& part) {
    auto res = parse(fields, policy);
    ASSERT_TRUE(std::holds_alternative<server::RequestError>(res));
    EXPECT_NE(std::get<server::RequestError>(res).message.find(part), std::string::npos)
        << std::get<server::RequestError>(res).message;
  };
  refused({{"prompt", "x"}, image, control}, p, "give one image and its mask");
  refused({{"prompt", "x"}, image, mask, control, {"strength", "0.5"}}, p, "strength does not apply");
  refused({{"prompt", "x"}, image, mask, control}, server::RequestPolicy{}, "without --controlnet");
  refused({{"prompt", "x"}, image, mask, control, control}, p, "more than once");
}
