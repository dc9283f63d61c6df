// Every CUDA op against the CPU reference op on fresh random inputs at the real model sizes
// (subsampled where the CPU is slow): relative error ‖out − ref‖/‖ref‖ ≤ 1e-2, no NaN, and every
// output element written (new device buffers are poisoned with NaN through ZIMAGE_POISON=1).
// Skipped, with a message, where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include "backend/backend.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::all_finite;
using zimage::testing::max_abs_diff;
using zimage::testing::rel_l2_error;

namespace {

class CudaOps : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (cuda_device_count() == 0) return;
    setenv("ZIMAGE_POISON", "1", 1);
    gpu_ = make_cuda_backend(0).release();
    cpu_ = make_cpu_backend().release();
    std::printf("GPU: %s\n", gpu_->name().c_str());
  }
  void SetUp() override {
    if (!gpu_) GTEST_SKIP() << "no CUDA GPU on this machine: the CUDA op tests run on the device";
  }

  // Random values rounded to bf16, so both backends see exactly the same inputs.
  static Tensor rnd(const Shape& s, float scale = 1.0f, float offset = 0.0f) {
    static std::mt19937 gen(1234);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    Tensor t = Tensor::empty(s, DType::F32);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = nd(gen) * scale + offset;
    return t.to_dtype(DType::BF16).to_f32();
  }
  static Tensor g(const Tensor& host) { return gpu_->upload(host); }
  static Tensor g32(const Tensor& host) { return gpu_->upload(host, DType::F32); }

  static void expect_close(const Tensor& gpu_out, const Tensor& cpu_out, const std::string& what, double tol = 1e-2) {
    Tensor out = gpu_->to_host_f32(gpu_out);
    ASSERT_EQ(out.shape(), cpu_out.shape()) << what;
    EXPECT_TRUE(all_finite(out)) << what << ": NaN/Inf or unwritten elements";
    double err = rel_l2_error(out, cpu_out);
    EXPECT_LE(err, tol) << what;
    std::printf("  %-58s rel err %.2e\n", what.c_str(), err);
  }

  static Backend* gpu_;
  static Backend* cpu_;
};

Backend* CudaOps::gpu_ = nullptr;
Backend* CudaOps::cpu_ = nullptr;

}  // namespace

TEST_F(CudaOps, Linear) {
  struct Case {
    int64_t m, k, n;
    bool bias;
  } cases[] = {{300, 3840, 11520, false},  // DiT packed QKV (rows subsampled)
               {300, 10240, 3840, false},  // DiT w2
               {77, 2560, 19456, false},   // Qwen3 gate|up
               {22, 2560, 19456, false},   // Qwen3 gate|up on one 22-token prompt
               {22, 9728, 2560, false},    // Qwen3 down on one prompt
               {2, 256, 3840 * 4 * 8, true},  // adaLN modulations of 8 blocks
               {33, 64, 170, true}};          // tiny, odd N
  for (const auto& c : cases) {
    Tensor x = rnd({c.m, c.k}), w = rnd({c.n, c.k}, 1.0f / std::sqrt(float(c.k))), b = rnd({c.n}, 0.1f);
    Tensor ref = cpu_->linear(x, w, c.bias ? &b : nullptr);
    Tensor gb = g(b);
    expect_close(gpu_->linear(g(x), g(w), c.bias ? &gb : nullptr), ref,
                 "linear " + std::to_string(c.m) + "x" + std::to_string(c.k) + "x" + std::to_string(c.n));
  }
}

TEST_F(CudaOps, Norms) {
  for (int64_t d : {3840, 2560, 64}) {
    Tensor x = rnd({2, 600, d}, 2.0f), y = rnd({2, 600, d}), w = rnd({d}, 0.2f, 1.0f);
    Tensor scale = rnd({2, d}, 0.5f), gate = rnd({2, d});
    std::string sd = " d=" + std::to_string(d);
    expect_close(gpu_->rms_norm(g(x), nullptr, 1e-6f), cpu_->rms_norm(x, nullptr, 1e-6f), "rms_norm" + sd);
    Tensor gw = g(w), gs = g(scale), gg = g(gate);
    expect_close(gpu_->rms_norm(g(x), &gw, 1e-6f), cpu_->rms_norm(x, &w, 1e-6f), "rms_norm affine" + sd);
    expect_close(gpu_->modulated_rms_norm(g(x), gw, &gs, 1e-5f), cpu_->modulated_rms_norm(x, w, &scale, 1e-5f),
                 "modulated_rms_norm" + sd);
    expect_close(gpu_->modulated_rms_norm(g(x), gw, nullptr, 1e-5f), cpu_->modulated_rms_norm(x, w, nullptr, 1e-5f),
                 "modulated_rms_norm no scale" + sd);
    Tensor xc = x.clone(), xg = g(x);
    cpu_->gated_residual_rms_norm_(xc, y, w, &gate, 1e-5f);
    gpu_->gated_residual_rms_norm_(xg, g(y), gw, &gg, 1e-5f);
    expect_close(xg, xc, "gated_residual_rms_norm_" + sd);
    xc = x.clone();
    xg = g(x);
    cpu_->gated_residual_rms_norm_(xc, y, w, nullptr, 1e-5f);
    gpu_->gated_residual_rms_norm_(xg, g(y), gw, nullptr, 1e-5f);
    expect_close(xg, xc, "gated_residual_rms_norm_ no gate" + sd);
    Tensor extra = rnd({2, 600, d}), ge = g(extra);  // a ControlNet's output added after the layer
    xc = x.clone();
    xg = g(x);
    cpu_->gated_residual_rms_norm_(xc, y, w, &gate, 1e-5f, &extra);
    gpu_->gated_residual_rms_norm_(xg, g(y), gw, &gg, 1e-5f, &ge);
    expect_close(xg, xc, "gated_residual_rms_norm_ extra" + sd);
    {
      Tensor w2 = rnd({d}, 0.2f, 1.0f), gw2 = g(w2);
      xc = x.clone();
      xg = g(x);
      Tensor nc = cpu_->gated_residual_then_rms_norm_(xc, y, w, &gate, w2, &scale, 1e-5f, &extra);
      Tensor ng = gpu_->gated_residual_then_rms_norm_(xg, g(y), gw, &gg, gw2, &gs, 1e-5f, &ge);
      expect_close(xg, xc, "gated_residual_then_rms_norm_ extra (x)" + sd);
      expect_close(ng, nc, "gated_residual_then_rms_norm_ extra (out)" + sd);
    }
    for (bool modulated : {true, false}) {  // the fused residual + next norm, as the DiT blocks call it
      Tensor w2 = rnd({d}, 0.2f, 1.0f), scale2 = rnd({2, d}, 0.5f), gw2 = g(w2), gs2 = g(scale2);
      xc = x.clone();
      xg = g(x);
      Tensor nc = cpu_->gated_residual_then_rms_norm_(xc, y, w, modulated ? &gate : nullptr, w2,
                                                      modulated ? &scale2 : nullptr, 1e-5f);
      Tensor ng = gpu_->gated_residual_then_rms_norm_(xg, g(y), gw, modulated ? &gg : nullptr, gw2,
                                                      modulated ? &gs2 : nullptr, 1e-5f);
      std::string what = std::string("gated_residual_then_rms_norm_") + (modulated ? "" : " no mod") + sd;
      expect_close(xg, xc, what + " (x)");
      expect_close(ng, nc, what + " (out)");
    }
    expect_close(gpu_->modulated_layer_norm(g(x), gs, 1e-6f), cpu_->modulated_layer_norm(x, scale, 1e-6f),
                 "modulated_layer_norm" + sd);
  }
}

TEST_F(CudaOps, GroupNorm) {
  struct Case {
    Shape s;
    int groups;
  } cases[] = {{{1, 128, 128, 512}, 32}, {{1, 256, 256, 256}, 32}, {{2, 12, 8, 64}, 32}, {{1, 64, 48, 32}, 32}};
  for (const auto& c : cases)
    for (bool silu : {false, true}) {
      int64_t ch = c.s[3];
      Tensor x = rnd(c.s, 3.0f, 0.5f), w = rnd({ch}, 0.2f, 1.0f), b = rnd({ch}, 0.2f);
      expect_close(gpu_->group_norm(g(x), g(w), g(b), c.groups, 1e-6f, silu), cpu_->group_norm(x, w, b, c.groups, 1e-6f, silu),
                   "group_norm " + shape_str(c.s) + (silu ? " +silu" : ""));
    }
}

TEST_F(CudaOps, QkNormRope) {
  struct Case {
    int64_t rows;
    int hq, hkv, d;
    RopeStyle style;
  } cases[] = {{4128, 30, 30, 128, RopeStyle::Interleaved},
               {256, 32, 8, 128, RopeStyle::HalfSplit},
               {96, 2, 2, 32, RopeStyle::Interleaved},
               {48, 4, 2, 16, RopeStyle::HalfSplit}};
  for (const auto& c : cases) {
    Tensor qkv = rnd({c.rows, int64_t(c.hq + 2 * c.hkv) * c.d}, 2.0f);
    Tensor qw = rnd({c.d}, 0.2f, 1.0f), kw = rnd({c.d}, 0.2f, 1.0f);
    Tensor angle = rnd({c.rows, c.d / 2}, 3.0f), cos = Tensor::empty(angle.shape(), DType::F32), sin = cos.clone();
    for (int64_t i = 0; i < angle.numel(); ++i) {
      cos.f32()[i] = std::cos(angle.f32()[i]);
      sin.f32()[i] = std::sin(angle.f32()[i]);
    }
    Tensor ref = qkv.clone();
    cpu_->qk_norm_rope_(ref, c.hq, c.hkv, c.d, qw, kw, 1e-6f, cos, sin, c.style);
    Tensor out = g(qkv);
    gpu_->qk_norm_rope_(out, c.hq, c.hkv, c.d, g(qw), g(kw), 1e-6f, g32(cos), g32(sin), c.style);
    expect_close(out, ref, "qk_norm_rope_ " + std::to_string(c.hq) + "/" + std::to_string(c.hkv) + "x" + std::to_string(c.d) +
                               (c.style == RopeStyle::Interleaved ? " interleaved" : " half-split"));
  }
}

TEST_F(CudaOps, Attention) {
  struct Case {
    int64_t b, s;
    int hq, hkv, d;
    bool causal;
    std::vector<int> key_len;
    const char* what;
  } cases[] = {
      {1, 4128, 30, 30, 128, false, {4128}, "DiT 1024^2"},
      {2, 4128, 30, 30, 128, false, {4128, 4096}, "DiT CFG batch, key padding"},
      {2, 128, 32, 8, 128, true, {100, 128}, "Qwen3 GQA causal + padding"},
      {1, 4096, 1, 1, 512, false, {4096}, "VAE mid-block 512^2 (d=512)"},
      {1, 8300, 1, 1, 512, false, {8300}, "GEMM attention, 3 query chunks"},
      {2, 1000, 2, 1, 512, false, {1000, 700}, "GEMM attention, GQA, key padding"},
      {2, 96, 2, 2, 32, false, {96, 64}, "tiny DiT"},
      {2, 24, 4, 2, 16, true, {5, 24}, "tiny Qwen3"},
      {1, 48, 1, 1, 64, false, {48}, "tiny VAE"},
  };
  for (const auto& c : cases) {
    Tensor qkv = rnd({c.b, c.s, int64_t(c.hq + 2 * c.hkv) * c.d});
    float scale = 1.0f / std::sqrt(float(c.d));
    Tensor ref = cpu_->attention(qkv, c.hq, c.hkv, c.d, scale, c.causal, c.key_len);
    expect_close(gpu_->attention(g(qkv), c.hq, c.hkv, c.d, scale, c.causal, c.key_len), ref,
                 std::string("attention ") + c.what);
  }
}

// Ring attention's parts (parallel/usp_attention.h) against the CPU: a partial attention with its
// log-sum-exp (queries and keys from two buffers, a key block without valid keys), and the merge.
TEST_F(CudaOps, PartialAttentionAndMerge) {
  struct Case {
    int64_t b, sq, sk;
    int h, d;
    std::vector<int> key_len;
    const char* what;
  } cases[] = {
      {1, 2208, 2048, 15, 128, {2048}, "DiT 1024^2 ring block (U=2, R=2)"},
      {2, 2112, 2048, 15, 128, {2000, 0}, "CFG pair, one block with no valid key"},
      {2, 96, 64, 1, 32, {64, 17}, "tiny DiT"},
  };
  for (const auto& c : cases) {
    Tensor q = rnd({c.b, c.sq, 3 * int64_t(c.h) * c.d}), kv = rnd({c.b, c.sk, 3 * int64_t(c.h) * c.d});
    Tensor kv2 = rnd({c.b, c.sk, 3 * int64_t(c.h) * c.d});
    const float scale = 1.0f / std::sqrt(float(c.d));
    Tensor lse_c, lse_g, lse2_c, lse2_g;
    Tensor out_c = cpu_->attention_with_lse(q, kv, c.h, c.d, scale, c.key_len, lse_c);
    Tensor out_g = gpu_->attention_with_lse(g(q), g(kv), c.h, c.d, scale, c.key_len, lse_g);
    expect_close(out_g, out_c, std::string("attention_with_lse ") + c.what);
    Tensor lse_host = gpu_->to_host_f32(lse_g);
    double worst = 0;  // -inf where the reference has it, else within 1e-2 (bf16 inputs' rounding)
    for (int64_t i = 0; i < lse_c.numel(); ++i) {
      const float a = lse_host.f32()[i], b = lse_c.f32()[i];
      if (std::isinf(b)) {
        EXPECT_TRUE(std::isinf(a) && a < 0) << c.what;
      } else {
        worst = std::max(worst, double(std::fabs(a - b)));
      }
    }
    EXPECT_LE(worst, 1e-2) << c.what;
    std::vector<int> all(c.key_len.size(), int(c.sk));
    Tensor out2_c = cpu_->attention_with_lse(q, kv2, c.h, c.d, scale, all, lse2_c);
    Tensor out2_g = gpu_->attention_with_lse(g(q), g(kv2), c.h, c.d, scale, all, lse2_g);
    cpu_->merge_attention_(out_c, lse_c, out2_c, lse2_c);
    gpu_->merge_attention_(out_g, lse_g, out2_g, lse2_g);
    expect_close(out_g, out_c, std::string("merge_attention_ ") + c.what);
  }
}

TEST_F(CudaOps, Conv2d) {
  struct Case {
    Shape x;
    int64_t o, k;
    Conv2dParams p;
  } cases[] = {{{1, 128, 128, 512}, 512, 3, Conv2dParams::same(3)},
               {{1, 256, 256, 3}, 128, 3, Conv2dParams::same(3)},
               {{1, 128, 128, 256}, 512, 1, Conv2dParams::same(1)},
               {{1, 128, 128, 128}, 128, 3, Conv2dParams{2, 0, 1, 0, 1}},  // encoder downsample
               {{2, 8, 6, 16}, 64, 3, Conv2dParams::same(3)},
               {{1, 64, 48, 32}, 32, 3, Conv2dParams{2, 0, 1, 0, 1}}};
  for (const auto& c : cases) {
    Tensor x = rnd(c.x), w = rnd({c.o, c.k, c.k, c.x[3]}, 1.0f / std::sqrt(float(c.k * c.k * c.x[3]))), b = rnd({c.o}, 0.1f);
    Tensor gb = g(b);
    expect_close(gpu_->conv2d(g(x), g(w), &gb, c.p), cpu_->conv2d(x, w, &b, c.p),
                 "conv2d " + shape_str(c.x) + " -> " + std::to_string(c.o) + " k" + std::to_string(c.k) + " s" +
                     std::to_string(c.p.stride));
  }
}

TEST_F(CudaOps, ElementwiseAndLayout) {
  Tensor x = rnd({4128, 2 * 10240});
  expect_close(gpu_->swiglu(g(x)), cpu_->swiglu(x), "swiglu 4128x2x10240");
  Tensor a = rnd({3, 1000, 64}), b = rnd({3, 1000, 64});
  expect_close(gpu_->silu(g(a)), cpu_->silu(a), "silu");
  expect_close(gpu_->scale_shift(g(a), 1.0f / 0.3611f, 0.1159f), cpu_->scale_shift(a, 1.0f / 0.3611f, 0.1159f), "scale_shift");
  Tensor ac = a.clone(), ag = g(a);
  cpu_->add_(ac, b);
  gpu_->add_(ag, g(b));
  expect_close(ag, ac, "add_");
  Tensor lat = rnd({16, 128, 96});
  Tensor tok = cpu_->patchify(lat, 2);
  expect_close(gpu_->patchify(g(lat), 2), tok, "patchify 16x128x96");
  Tensor tok_pad = rnd({tok.dim(0) + 32, 64});
  expect_close(gpu_->unpatchify(g(tok_pad), 16, 128, 96, 2), cpu_->unpatchify(tok_pad, 16, 128, 96, 2), "unpatchify");
  Tensor img = rnd({2, 16, 24, 40});
  expect_close(gpu_->nchw_to_nhwc(g(img)), cpu_->nchw_to_nhwc(img), "nchw_to_nhwc");
  Tensor nhwc = rnd({2, 24, 40, 16});
  expect_close(gpu_->nhwc_to_nchw(g(nhwc)), cpu_->nhwc_to_nchw(nhwc), "nhwc_to_nchw");
  Tensor up = rnd({1, 64, 48, 512});
  expect_close(gpu_->upsample_nearest2x(g(up)), cpu_->upsample_nearest2x(up), "upsample_nearest2x");
  Tensor f = rnd({5000, 7});
  expect_close(gpu_->cast(gpu_->cast(g32(f), DType::BF16), DType::F32), f, "cast f32->bf16->f32");
  std::vector<int32_t> idx = {3, -1, 0, 4999, 17, -1};
  Tensor rows = rnd({5000, 3840});
  expect_close(gpu_->gather_rows(g(rows), idx), cpu_->gather_rows(rows, idx), "gather_rows (with zero rows)", 0.0);
  expect_close(gpu_->concat_rows(g(a), g(b)), cpu_->concat_rows(a, b), "concat_rows", 0.0);
  Tensor mod = rnd({2, 4 * 3840});
  expect_close(gpu_->slice_cols(g(mod), 3840, 3840), cpu_->slice_cols(mod, 3840, 3840), "slice_cols", 0.0);
}

TEST_F(CudaOps, ImageToU8IsExactWithinOneLevel) {
  Tensor x = rnd({1, 256, 256, 3}, 0.7f);
  Tensor ref = cpu_->image_to_u8(x);
  Tensor out = gpu_->to_host_u8(gpu_->image_to_u8(g(x)));
  int worst = 0;
  for (int64_t i = 0; i < x.numel(); ++i)
    worst = std::max(worst, std::abs(int(out.data_as<uint8_t>()[i]) - int(ref.data_as<uint8_t>()[i])));
  EXPECT_EQ(worst, 0);  // the inputs are bf16 values: both sides round the same float
}

// Every byte value: the GPU's bf16 is the CPU's float32 value rounded once.
TEST_F(CudaOps, U8ToImageIsExact) {
  Tensor x = Tensor::empty({1, 16, 16, 3}, DType::U8);
  for (int64_t i = 0; i < x.numel(); ++i) x.data_as<uint8_t>()[i] = uint8_t((i * 7) % 256);
  const std::vector<float> ref = Tensor(cpu_->u8_to_image(x)).to_dtype(DType::BF16).to_f32().to_vector();
  EXPECT_EQ(gpu_->to_host_f32(gpu_->u8_to_image(gpu_->upload(x, DType::U8))).to_vector(), ref);
}

// NaN and both infinities counted, huge finite values and -0 not, in float32 and bf16, over more
// elements than one pass of the grid (the grid-stride loop), accumulating into the chosen slot.
TEST_F(CudaOps, CountNonFinite) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  Tensor x = rnd({3, 1000003});
  const std::vector<std::pair<int64_t, float>> specials = {{0, nan},       {17, inf},  {999999, -inf}, {2000000, nan},
                                                           {3000002, inf}, {5, 1e38f}, {6, -1e38f},    {7, -0.0f}};
  for (auto [i, v] : specials) x.f32()[i] = v;
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor counts = gpu_->upload(Tensor::zeros({3}, DType::I32), DType::I32);
    Tensor xd = gpu_->upload(x, dt);
    gpu_->count_non_finite(xd, counts, 1);
    gpu_->count_non_finite(xd, counts, 1);
    gpu_->count_non_finite(xd.narrow0(1, 1), counts, 2);  // row 1: elements [1000003, 2000006) hold one NaN
    EXPECT_EQ(gpu_->to_host_f32(counts).to_vector(), (std::vector<float>{0, 10, 1})) << dtype_name(dt);
  }
}

TEST_F(CudaOps, TimestepEmbedding) {
  Tensor t = Tensor::from_f32({4}, {0.0f, 1.0f, 0.8735f, 0.125f});  // DiT times; t_scale 1000 as the DiT passes it
  expect_close(gpu_->timestep_embedding(g32(t), 1000.0f, 256, 10000.0f),
               cpu_->timestep_embedding(t, 1000.0f, 256, 10000.0f), "timestep_embedding 4x256");
}

TEST_F(CudaOps, CfgEulerStep) {
  for (float norm : {0.0f, 1.0f}) {
    Tensor lat = rnd({2, 16, 128, 128}), out = rnd({4, 16, 128, 128});
    Tensor lc = lat.clone(), lg = g32(lat);
    cpu_->cfg_euler_step_(lc, out, 4.0f, norm, -0.11f);
    gpu_->cfg_euler_step_(lg, g32(out), 4.0f, norm, -0.11f);
    expect_close(lg, lc, std::string("cfg_euler_step_ 2x16x128x128") + (norm > 0 ? " normalized" : ""), 1e-5);
  }
  Tensor lat = rnd({1, 16, 64, 64}), out = rnd({1, 16, 64, 64});
  Tensor lc = lat.clone(), lg = g32(lat);
  cpu_->cfg_euler_step_(lc, out, 0.0f, 0.0f, -0.2f);
  gpu_->cfg_euler_step_(lg, g32(out), 0.0f, 0.0f, -0.2f);
  expect_close(lg, lc, "euler step without CFG", 1e-6);
}

// The image-to-image ops against their CPU references: the VAE's logvar clamp (bf16), the posterior's
// draw from bf16 moments into DiT latent space, and the flow-match noising / inpaint blend (float32 with the
// reference's roundings: equal up to the host compiler's choice of contracting into FMAs).
TEST_F(CudaOps, LatentSamplingAndBlend) {
  Tensor logvar = rnd({2, 16, 64, 48}, 20.0f);  // beyond [-30, 20] in places
  expect_close(gpu_->clamp(g(logvar), -30.0f, 20.0f), cpu_->clamp(logvar, -30.0f, 20.0f), "clamp 2x16x64x48", 0.0);
  Tensor mean = rnd({2, 16, 64, 48}), lv = rnd({2, 16, 64, 48}, 2.0f, -3.0f), eps = rnd({2, 16, 64, 48});
  expect_close(gpu_->gaussian_sample(g(mean), g(lv), g32(eps), 0.1159f, 0.3611f),
               cpu_->gaussian_sample(mean, lv, eps, 0.1159f, 0.3611f), "gaussian_sample 2x16x64x48", 1e-6);
  Tensor x = rnd({2, 16, 64, 48}), init = rnd({2, 16, 64, 48}), noise = rnd({2, 16, 64, 48});
  Tensor mask = Tensor::empty({2, 1, 64, 48}, DType::F32);
  for (int64_t i = 0; i < mask.numel(); ++i) mask.f32()[i] = float((i * 7 / 5) % 2);
  for (bool masked : {false, true}) {
    Tensor xc = x.clone(), xg = g32(x), mg = g32(mask);
    cpu_->flow_match_blend_(xc, init, noise, masked ? &mask : nullptr, 0.37f);
    gpu_->flow_match_blend_(xg, g32(init), g32(noise), masked ? &mg : nullptr, 0.37f);
    EXPECT_LE(max_abs_diff(gpu_->to_host_f32(xg), xc), 1e-6) << (masked ? "blend" : "scale_noise");
    expect_close(xg, xc, masked ? "flow_match_blend_ with mask" : "flow_match_blend_ (scale_noise)", 1e-7);
  }
}

// A batch of items gives each item the bits it gets alone: a CFG pair run as one batch of two on one
// GPU must make the same image as the two branches on two GPUs (issue 9), and a server batch the same
// images as its requests alone. GEMMs: the rows of each item of a batched call against a call on that
// item's rows alone, at the DiT's shapes (time MLP and modulations with 1 vs 2 rows, two captions' rows,
// refiners of 32-row captions, image rows at 1024^2) and the text encoder's. Attention: each item of a
// batch of 2 against the item alone at its own length, as the DiT runs it (captions padded to 32 vs 64).
TEST_F(CudaOps, BatchedItemsEqualItemsAlone) {
  struct LinearCase {
    int64_t m0, m1, k, n;
    bool bias;
  } linears[] = {{1, 1, 256, 1024, true},          {1, 1, 1024, 256, true},          {1, 1, 256, 3840 * 4 * 32, true},
                 {18, 7, 2560, 3840, true},        {4096, 4096, 64, 3840, true},     {32, 32, 3840, 11520, false},
                 {32, 32, 10240, 3840, false},     {4128, 4128, 3840, 11520, false}, {4128, 4128, 3840, 3840, false},
                 {4128, 4160, 3840, 20480, false}, {4128, 4128, 10240, 3840, false}, {4096, 4096, 3840, 64, true},
                 {22, 77, 2560, 19456, false},     {22, 77, 9728, 2560, false},      {22, 77, 2560, 6144, false}};
  for (const auto& c : linears) {
    Tensor x = g(rnd({c.m0 + c.m1, c.k})), w = g(rnd({c.n, c.k}, 1.0f / std::sqrt(float(c.k)))),
           b = g(rnd({c.n}, 0.1f));
    const Tensor* bias = c.bias ? &b : nullptr;
    Tensor both = gpu_->to_host_f32(gpu_->linear(x, w, bias));
    Tensor first = gpu_->to_host_f32(gpu_->linear(x.narrow0(0, c.m0), w, bias));
    Tensor second = gpu_->to_host_f32(gpu_->linear(x.narrow0(c.m0, c.m1), w, bias));
    const double d0 = max_abs_diff(both.narrow0(0, c.m0), first), d1 = max_abs_diff(both.narrow0(c.m0, c.m1), second);
    std::printf("  linear [%lld + %lld rows] x %lld x %lld: batched vs alone max diff %.3g, %.3g\n", (long long)c.m0,
                (long long)c.m1, (long long)c.k, (long long)c.n, d0, d1);
    EXPECT_EQ(d0, 0.0) << c.m0 << "+" << c.m1 << " rows, K " << c.k << ", N " << c.n;
    EXPECT_EQ(d1, 0.0) << c.m0 << "+" << c.m1 << " rows, K " << c.k << ", N " << c.n;
  }
  struct AttentionCase {
    int64_t s;
    int h, d;
    std::vector<int> key_len;
  } attentions[] = {{4128, 30, 128, {4128, 4128}}, {4160, 30, 128, {4160, 4128}}, {64, 30, 128, {32, 64}}};
  for (const auto& c : attentions) {
    const int64_t width = int64_t(3 * c.h) * c.d;
    Tensor qkv = g(rnd({2, c.s, width}));
    const float scale = 1.0f / std::sqrt(float(c.d));
    Tensor both = gpu_->to_host_f32(gpu_->attention(qkv, c.h, c.h, c.d, scale, false, c.key_len));
    for (int64_t i = 0; i < 2; ++i) {
      const int64_t len = c.key_len[size_t(i)];
      Tensor mine = qkv.reshape({2 * c.s, width}).narrow0(i * c.s, len).reshape({1, len, width});
      Tensor alone = gpu_->to_host_f32(gpu_->attention(mine, c.h, c.h, c.d, scale, false, {int(len)}));
      const double d = max_abs_diff(both.reshape({2 * c.s, int64_t(c.h) * c.d}).narrow0(i * c.s, len), alone);
      std::printf("  attention item %lld of a batch of 2 (seq %lld) vs alone (seq %lld): max diff %.3g\n", (long long)i,
                  (long long)c.s, (long long)len, d);
      EXPECT_EQ(d, 0.0) << "seq " << c.s << " item " << i;
    }
  }
}

// FP8 activations: the CUDA quantization equals the CPU reference bit for bit (codes and scales), on the
// DiT's row widths and an unaligned one, with outlier rows, a row of zeros and tiny values.
TEST_F(CudaOps, QuantizeFp8RowsIsExact) {
  for (const int64_t k : {int64_t(3840), int64_t(10240), int64_t(170)}) {
    Tensor x = rnd({64, k});
    for (int64_t c = 0; c < k; ++c) {
      x.f32()[3 * k + c] *= 6.5e4f;  // FFN inputs of the real model reach |x| ~ 6.6e4
      x.f32()[4 * k + c] = 0.0f;
      x.f32()[5 * k + c] *= 1e-7f;
    }
    x = x.to_dtype(DType::BF16).to_f32();
    const Backend::Fp8Rows ref = cpu_->quantize_fp8_rows(x), got = gpu_->quantize_fp8_rows(g(x));
    const Tensor codes = gpu_->to_host_u8(got.q), scales = gpu_->to_host_f32(got.scale);
    int64_t code_diffs = 0, scale_diffs = 0;
    for (int64_t i = 0; i < x.numel(); ++i) code_diffs += codes.data_as<uint8_t>()[i] != ref.q.data_as<uint8_t>()[i];
    for (int64_t r = 0; r < 64; ++r) scale_diffs += scales.f32()[r] != ref.scale.f32()[r];
    std::printf("  quantize_fp8_rows 64 x %5lld: %lld codes and %lld scales differ from the CPU reference\n",
                (long long)k, (long long)code_diffs, (long long)scale_diffs);
    EXPECT_EQ(code_diffs, 0) << k;
    EXPECT_EQ(scale_diffs, 0) << k;
  }
}

// The norms and SwiGLU that write an FP8 linear's input themselves equal their bf16 op followed by
// quantize_fp8_rows, code for code (the DiT's widths, a modulated batch of 2, a ControlNet's extra input).
TEST_F(CudaOps, FusedFp8ProducersEqualTheComposition) {
  auto same = [&](const Backend::Fp8Rows& fused, const Backend::Fp8Rows& composed, const std::string& what) {
    const Tensor a = gpu_->to_host_u8(fused.q), b = gpu_->to_host_u8(composed.q);
    const Tensor sa = gpu_->to_host_f32(fused.scale), sb = gpu_->to_host_f32(composed.scale);
    ASSERT_EQ(a.shape(), b.shape()) << what;
    int64_t codes = 0;
    for (int64_t i = 0; i < a.numel(); ++i) codes += a.data_as<uint8_t>()[i] != b.data_as<uint8_t>()[i];
    const double scales = max_abs_diff(sa, sb);
    std::printf("  %-44s %lld codes differ, scales max diff %.3g\n", what.c_str(), (long long)codes, scales);
    EXPECT_EQ(codes, 0) << what;
    EXPECT_EQ(scales, 0.0) << what;
  };
  for (const int64_t d : {int64_t(3840), int64_t(64)}) {
    const Tensor x = g(rnd({2, 300, d})), y = g(rnd({2, 300, d})), w = g(rnd({d}, 0.2f, 1.0f)),
                 w2 = g(rnd({d}, 0.2f, 1.0f)), scale = g(rnd({2, d}, 0.3f)), gate = g(rnd({2, d}, 0.5f)),
                 extra = g(rnd({2, 300, d}, 0.1f));
    const std::string at = " d=" + std::to_string(d);
    same(gpu_->modulated_rms_norm_fp8(x, w, &scale, 1e-6f),
         gpu_->quantize_fp8_rows(gpu_->modulated_rms_norm(x, w, &scale, 1e-6f)), "modulated_rms_norm_fp8" + at);
    for (const bool with_extra : {false, true}) {
      Tensor r1 = gpu_->cast(x, DType::BF16), r2 = gpu_->cast(x, DType::BF16);
      const Tensor* e = with_extra ? &extra : nullptr;
      const Backend::Fp8Rows fused = gpu_->gated_residual_then_rms_norm_fp8_(r1, y, w, &gate, w2, &scale, 1e-6f, e);
      const Backend::Fp8Rows composed =
          gpu_->quantize_fp8_rows(gpu_->gated_residual_then_rms_norm_(r2, y, w, &gate, w2, &scale, 1e-6f, e));
      same(fused, composed, "gated_residual_then_rms_norm_fp8_" + at + (with_extra ? " +extra" : ""));
      EXPECT_EQ(max_abs_diff(gpu_->to_host_f32(r1), gpu_->to_host_f32(r2)), 0.0) << "the residual stream";
    }
  }
  for (const int64_t f : {int64_t(10240), int64_t(170)}) {
    const Tensor x = g(rnd({300, 2 * f}, 3.0f));
    same(gpu_->swiglu_fp8(x), gpu_->quantize_fp8_rows(gpu_->swiglu(x)), "swiglu_fp8 f=" + std::to_string(f));
  }
}

// The W8A8 GEMM at every GEMM shape of the full-size DiT at 1024^2 (M = 4224 tokens): against float64 of exactly
// the quantized values (the bf16 output's rounding is ~2e-3), and the same rows alone as in the batch.
TEST_F(CudaOps, LinearFp8MatchesFloat64) {
  struct Case {
    int64_t m, k, n;
    bool bias;
  } cases[] = {{4224, 3840, 11520, false}, {4224, 3840, 3840, false}, {4224, 3840, 20480, false},
               {4224, 10240, 3840, false}, {4224, 3840, 3840, true},  {32, 3840, 3840, true}};
  for (const auto& c : cases) {
    Tensor x = rnd({c.m, c.k});
    for (int64_t i = 0; i < c.m; i += 97)
      for (int64_t j = 0; j < c.k; ++j) x.f32()[i * c.k + j] *= 40.0f;  // outlier tokens
    const Tensor w = rnd({c.n, c.k}, 1.0f / std::sqrt(float(c.k))), b = rnd({c.n}, 0.1f);
    const StoredWeight sw = quantize_fp8_weight(w);
    StoredWeight gw = sw;
    gw.data = gpu_->upload(sw.data, DType::F8E4M3);
    gw.scale = g32(sw.scale);
    const Tensor gb = g(b);
    const Backend::Fp8Rows xq = gpu_->quantize_fp8_rows(g(x));
    const Tensor y = gpu_->to_host_f32(gpu_->linear_fp8(xq, gw, c.bias ? &gb : nullptr));
    ASSERT_TRUE(all_finite(y));
    // float64 of the quantized values on a subsample of rows (every 61st, the outliers among them).
    const Tensor codes = gpu_->to_host_u8(xq.q), xs = gpu_->to_host_f32(xq.scale);
    double num = 0, den = 0;
    for (int64_t i = 0; i < c.m; i += 61)
      for (int64_t j = 0; j < c.n; ++j) {
        double acc = 0;
        for (int64_t t = 0; t < c.k; ++t)
          acc += double(f8e4m3_to_f32(codes.data_as<uint8_t>()[i * c.k + t])) *
                 double(f8e4m3_to_f32(sw.data.data_as<uint8_t>()[j * c.k + t]));
        acc = acc * xs.f32()[i] * sw.scale.f32()[j] + (c.bias ? double(b.f32()[j]) : 0.0);
        const double got = y.f32()[i * c.n + j];
        num += (got - acc) * (got - acc);
        den += acc * acc;
      }
    const double err = std::sqrt(num / den);
    // The same rows alone: per-token scales and no split-K keep each row independent of the batch.
    const int64_t part = c.m / 2;
    const Tensor alone = gpu_->to_host_f32(gpu_->linear_fp8(
        gpu_->quantize_fp8_rows(g(x.narrow0(part, c.m - part).clone())), gw, c.bias ? &gb : nullptr));
    const double batch_diff = max_abs_diff(y.narrow0(part, c.m - part), alone);
    std::printf("  linear_fp8 %4lld x %5lld x %5lld%s: vs float64 of the quantized values %.2e, rows alone vs batched "
                "max diff %.3g\n",
                (long long)c.m, (long long)c.k, (long long)c.n, c.bias ? " +bias" : "", err, batch_diff);
    EXPECT_LE(err, 4e-3);
    EXPECT_EQ(batch_diff, 0.0);
  }
}

// make_graph: the first call runs the function, the second records it, later calls replay it with
// their own inputs (device t, device row indices, a GEMM, elementwise work and a fresh allocation in
// between); every call returns what the ops give when called directly, bit for bit, and a new tensor.
TEST_F(CudaOps, GraphRunsThenRecordsThenReplays) {
  Tensor w = g(rnd({64, 48}, 0.2f)), pick = gpu_->upload_i32({2, 0, -1, 1}), first = gpu_->upload_i32({0, 0, 0, 0});
  auto fn = [&](const std::vector<Tensor>& in) {
    Tensor y = gpu_->silu(gpu_->linear(gpu_->gather_rows(in[0], pick), w));                           // [4, 64]
    gpu_->add_(y, gpu_->gather_rows(gpu_->timestep_embedding(in[1], 1000.0f, 64, 10000.0f), first));  // t on every row
    return y;
  };
  auto graph = gpu_->make_graph(fn);
  std::vector<Tensor> outs;
  for (int call = 0; call < 4; ++call) {
    std::vector<Tensor> in = {g(rnd({3, 48})), g32(Tensor::from_f32({1}, {0.1f * float(call + 1)}))};
    Tensor want = gpu_->to_host_f32(fn(in));
    Tensor got = (*graph)(in);
    EXPECT_EQ(graph->recorded(), call >= 1) << "call " << call;
    EXPECT_EQ(max_abs_diff(gpu_->to_host_f32(got), want), 0.0) << "call " << call;
    outs.push_back(got);
  }
  EXPECT_NE(max_abs_diff(gpu_->to_host_f32(outs[2]), gpu_->to_host_f32(outs[3])), 0.0);  // not overwritten
  zimage::testing::expect_error(
      [&] {
        (*graph)({g(rnd({5, 48})), g32(Tensor::from_f32({1}, {0.5f}))});
      },
      ErrorKind::Internal, {"recorded graph", "[5, 48]"});
}
