#include "model/qwen3.h"

#include <gtest/gtest.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_source.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::golden_path;
using zimage::testing::max_abs_diff;

namespace {

struct Golden {
  std::shared_ptr<SafetensorsFile> f = SafetensorsFile::open(golden_path("text_encoder/tensors.safetensors"));
  Tensor ids = f->get("input_ids").clone();
  std::vector<int64_t> lengths() const {
    Tensor mask = f->get("attention_mask");
    std::vector<int64_t> out;
    for (int64_t b = 0; b < mask.dim(0); ++b) {
      int64_t n = 0;
      for (int64_t i = 0; i < mask.dim(1); ++i) n += mask.data_as<int64_t>()[b * mask.dim(1) + i];
      out.push_back(n);
    }
    return out;
  }
};

}  // namespace

// Every layer's hidden states of the golden tiny Qwen3 within 1e-4 (rows of real tokens; padded rows
// are compared too, since transformers computes them with the same causal + padding mask).
TEST(Qwen3, MatchesEveryGoldenHiddenState) {
  auto be = make_cpu_backend();
  ModelSource m = open_model(golden_path("tiny-zimage"));
  Qwen3TextEncoder enc(*be, m.text_encoder, *m.text_encoder_weights);
  Golden g;
  auto lengths = g.lengths();
  EXPECT_EQ(lengths, (std::vector<int64_t>{lengths[0], lengths[1]}));
  for (int64_t k = 0; k <= enc.config().layers; ++k) {
    Tensor ref = g.f->get("hidden_states." + std::to_string(k));
    Tensor out = be->to_host_f32(enc.forward(g.ids, lengths, k));
    ASSERT_EQ(out.shape(), ref.shape());
    double err = max_abs_diff(out, ref);
    EXPECT_LE(err, 1e-4) << "hidden_states." << k;
    std::printf("hidden_states.%lld max abs error %.3g\n", (long long)k, err);
  }
}

// encode() = hidden_states[-2] with padding removed.
TEST(Qwen3, EncodeDropsPaddingRows) {
  auto be = make_cpu_backend();
  ModelSource m = open_model(golden_path("tiny-zimage"));
  Qwen3TextEncoder enc(*be, m.text_encoder, *m.text_encoder_weights);
  Golden g;
  auto lengths = g.lengths();
  auto embeds = enc.encode(g.ids, lengths);
  Tensor ref = g.f->get("hidden_states." + std::to_string(enc.config().layers - 1));
  ASSERT_EQ(embeds.size(), 2u);
  for (int64_t b = 0; b < 2; ++b) {
    Tensor e = be->to_host_f32(embeds[size_t(b)]);
    ASSERT_EQ(e.shape(), (Shape{lengths[size_t(b)], enc.config().hidden}));
    Tensor ref_rows = ref.reshape({-1, enc.config().hidden}).narrow0(b * ref.dim(1), lengths[size_t(b)]);
    EXPECT_LE(max_abs_diff(e, ref_rows), 1e-4);
  }
}

TEST(Qwen3, RejectsOutOfVocabularyIds) {
  auto be = make_cpu_backend();
  ModelSource m = open_model(golden_path("tiny-zimage"));
  Qwen3TextEncoder enc(*be, m.text_encoder, *m.text_encoder_weights);
  Tensor ids = Tensor::zeros({1, 4}, DType::I64);
  ids.data_as<int64_t>()[1] = 999999;
  EXPECT_THROW(enc.encode(ids, {4}), Error);
}
