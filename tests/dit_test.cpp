#include "model/zimage_dit.h"

#include <gtest/gtest.h>


#include "io/safetensors.h"
#include "model/model_source.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_case_names;
using zimage::testing::golden_path;
using zimage::testing::stack_golden_items;
using zimage::testing::max_abs_diff;

TEST(DitLayout, PadsToMultiplesOf32) {
  DitLayout l = dit_layout(2, 12, 8, 2, {15, 45});
  EXPECT_EQ(l.image_tokens, 24);
  EXPECT_EQ(l.image_padded, 32);
  EXPECT_EQ(l.cap_padded, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(l.cap_max, 64);
  EXPECT_EQ(l.unified_max, 96);
}

TEST(TimestepFeatures, CosThenSin) {
  Tensor f = make_cpu_backend()->timestep_embedding(Tensor::from_f32({2}, {0.0f, 0.5f}), 1000.0f, 256, 10000.0f);
  EXPECT_FLOAT_EQ(f.f32()[0], 1.0f);    // cos(0)
  EXPECT_FLOAT_EQ(f.f32()[128], 0.0f);  // sin(0)
  EXPECT_NEAR(f.f32()[256], std::cos(500.0), 1e-6);
  EXPECT_NEAR(f.f32()[256 + 128], std::sin(500.0), 1e-6);
}

// Both recorded DiT calls of every golden case (batched CFG calls with captions of different lengths
// included) within 1e-4 of diffusers.
TEST(ZImageDit, MatchesGoldenCalls) {
  auto be = make_cpu_backend();
  ModelSource m = open_model(golden_path("tiny-zimage"));
  ZImageDit dit(*be, m.transformer, *m.transformer_weights);
  for (const auto& name : golden_case_names()) {
    auto f = SafetensorsFile::open(golden_path("cases/" + name + "/tensors.safetensors"));
    for (const std::string call : {"dit0.", "dit1."}) {
      Tensor t = f->get(call + "t");
      int64_t n = t.numel();
      std::vector<Tensor> caps;
      for (int64_t j = 0; j < n; ++j) caps.push_back(f->get(call + "cap." + std::to_string(j)).clone());
      Tensor x = stack_golden_items(*f, call + "x.", n);
      Tensor out = be->to_host_f32(dit.forward(x, t.to_vector(), caps));
      Tensor ref = stack_golden_items(*f, call + "out.", n);
      double err = max_abs_diff(out, ref);
      EXPECT_LE(err, 1e-4) << name << " " << call;
      std::printf("%-16s %s N=%lld max abs error %.3g\n", name.c_str(), call.c_str(), (long long)n, err);
    }
  }
}
