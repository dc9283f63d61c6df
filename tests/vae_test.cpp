#include "model/vae.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;

namespace {

class VaeTest : public ::testing::Test {
 protected:
  VaeTest()
      : be_(make_cpu_backend()),
        weights_(Checkpoint::open_dir(golden_path("tiny-zimage/vae"))),
        vae_(*be_, Config::load(golden_path("tiny-zimage/vae/config.json")), weights_) {}

  std::unique_ptr<Backend> be_;
  CheckpointWeights weights_;
  Vae vae_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST_F(VaeTest, SizesFromConfig) {
  EXPECT_EQ(vae_.downscale(), 8);
  EXPECT_EQ(vae_.latent_channels(), 16);
  EXPECT_FLOAT_EQ(vae_.scaling_factor(), 0.3611f);
  EXPECT_FLOAT_EQ(vae_.shift_factor(), 0.1159f);
}

// golden decode.in is the input of diffusers' `vae.decode` (already in the VAE's latent space): decode_raw.
TEST_F(VaeTest, DecodeMatchesGolden) {
  auto golden = SafetensorsFile::open(golden_path("vae/tensors.safetensors"));
  auto t0 = std::chrono::steady_clock::now();
  Tensor img = vae_.decode_raw(be_->upload(golden->get("decode.in")));  // [1, 64, 48, 3]
  double secs = seconds_since(t0);
  ASSERT_EQ(img.shape(), (Shape{1, 64, 48, 3}));
  double err = max_abs_diff(be_->to_host_f32(be_->nhwc_to_nchw(img)), golden->get("decode.out"));
  std::printf("  decode [1,16,8,6] -> [1,64,48,3]: max |diff| %.3g, %.3f s\n", err, secs);
  EXPECT_LE(err, 1e-3);
}

// decode(latents) is decode_raw(latents / scaling_factor + shift_factor).
TEST_F(VaeTest, DecodeAppliesScalingAndShift) {
  auto golden = SafetensorsFile::open(golden_path("vae/tensors.safetensors"));
  Tensor z = be_->upload(golden->get("decode.in"));
  Tensor latents = be_->scale_shift(z, vae_.scaling_factor(), -vae_.shift_factor() * vae_.scaling_factor());
  double err = max_abs_diff(be_->to_host_f32(vae_.decode(latents)), be_->to_host_f32(vae_.decode_raw(z)));
  EXPECT_LE(err, 1e-4);
}

TEST_F(VaeTest, EncodeMatchesGolden) {
  auto golden = SafetensorsFile::open(golden_path("vae/tensors.safetensors"));
  auto t0 = std::chrono::steady_clock::now();
  Vae::Moments m = vae_.encode(be_->nchw_to_nhwc(be_->upload(golden->get("encode.in"))));
  double secs = seconds_since(t0);
  ASSERT_EQ(m.mean.shape(), (Shape{1, 16, 8, 6}));
  ASSERT_EQ(m.logvar.shape(), (Shape{1, 16, 8, 6}));
  double err_mean = max_abs_diff(be_->to_host_f32(m.mean), golden->get("encode.mean"));
  double err_logvar = max_abs_diff(be_->to_host_f32(m.logvar), golden->get("encode.logvar"));
  std::printf("  encode [1,64,48,3]: mean max |diff| %.3g, logvar max |diff| %.3g, %.3f s\n", err_mean, err_logvar,
              secs);
  EXPECT_LE(err_mean, 1e-3);
  EXPECT_LE(err_logvar, 1e-3);
}

// The pipeline's last stage on every golden case: the final latents, decoded with scaling, postprocessed.
TEST_F(VaeTest, PipelineCasesDecodeToGoldenImages) {
  for (const char* name : {"turbo_square", "cfg_portrait", "cfg_norm_trunc", "batch2"}) {
    SCOPED_TRACE(name);
    auto golden = SafetensorsFile::open(golden_path(std::string("cases/") + name + "/tensors.safetensors"));
    Tensor ref_u8 = golden->get("output.image_u8");  // [B, H, W, 3] uint8
    Tensor ref_float = golden->get("output.image_float");

    auto t0 = std::chrono::steady_clock::now();
    Tensor img = vae_.decode(be_->upload(golden->get("output.latents")));
    double secs = seconds_since(t0);
    ASSERT_EQ(img.shape(), ref_u8.shape());

    Tensor u8 = be_->to_host_u8(be_->image_to_u8(img));
    const auto* ours = u8.data_as<uint8_t>();
    const auto* ref = ref_u8.data_as<uint8_t>();
    int64_t off = 0, worst = 0;
    for (int64_t i = 0; i < u8.numel(); ++i) {
      int64_t d = std::abs(int64_t(ours[i]) - int64_t(ref[i]));
      off += d != 0;
      worst = std::max(worst, d);
    }

    // image_float = clamp(x / 2 + 0.5, 0, 1)
    Tensor fl = be_->to_host_f32(be_->scale_shift(img, 0.5f, 0.5f));
    for (int64_t i = 0; i < fl.numel(); ++i) fl.f32()[i] = std::clamp(fl.f32()[i], 0.0f, 1.0f);
    double err = max_abs_diff(fl, ref_float);

    std::printf("  %-15s %s: decode %.3f s, float max |diff| %.3g, u8 %lld/%lld values differ (max %lld)\n", name,
                shape_str(img.shape()).c_str(), secs, err, (long long)off, (long long)u8.numel(), (long long)worst);
    EXPECT_LE(worst, 1);
    EXPECT_LE(double(off), 0.005 * double(u8.numel()));
    EXPECT_LE(err, 1e-3);
  }
}

TEST_F(VaeTest, RejectsBadShapes) {
  EXPECT_THROW(
      {
        try {
          vae_.decode(be_->upload(Tensor::zeros({1, 4, 8, 8}, DType::F32)));
        } catch (const Error& e) {
          EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
          throw;
        }
      },
      Error);
  EXPECT_THROW(vae_.encode(be_->upload(Tensor::zeros({1, 60, 64, 3}, DType::F32))), Error);
}

// A config with 2 resnets per block and quant convs (the layout of other AutoencoderKL checkpoints), with
// synthetic weights: every weight name and shape the loader asks for exists, and the output is finite.
TEST(VaeSynthetic, TwoLayersPerBlockWithQuantConvs) {
  auto be = make_cpu_backend();
  Config cfg = Config::parse(R"({
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "scaling_factor": 0.3611, "shift_factor": 0.1159, "mid_block_add_attention": true,
    "use_quant_conv": true, "use_post_quant_conv": true})",
                             "synthetic vae config");
  SyntheticWeights ws(7, "synthetic vae");
  Vae vae(*be, cfg, ws);

  Tensor latents = Tensor::empty({2, 16, 4, 5}, DType::F32);
  for (int64_t i = 0; i < latents.numel(); ++i) latents.f32()[i] = float(i % 13) / 6.0f - 1.0f;
  Tensor img = vae.decode(be->upload(latents));
  ASSERT_EQ(img.shape(), (Shape{2, 32, 40, 3}));
  EXPECT_TRUE(zimage::testing::all_finite(be->to_host_f32(img)));

  Vae::Moments m = vae.encode(img);
  ASSERT_EQ(m.mean.shape(), (Shape{2, 16, 4, 5}));
  ASSERT_EQ(m.logvar.shape(), (Shape{2, 16, 4, 5}));
  EXPECT_TRUE(zimage::testing::all_finite(be->to_host_f32(m.mean)));
  EXPECT_TRUE(zimage::testing::all_finite(be->to_host_f32(m.logvar)));
}

}  // namespace
