// The CPU backend's batch invariance: a row of a linear layer and a query of attention get the same
// bits whatever else shares the call (the server's batched == alone promise rests on it), and the
// fixed-order GEMM is a correct GEMM (against a float64 reference).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "backend/backend.h"
#include "backend/cpu/gemm_fixed_order.h"
#include "test_util.h"

using namespace zimage;

namespace {

std::vector<float> random_values(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

TEST(CpuGemm, FixedOrderMatchesFloat64Reference) {
  // Edges of every kind: rows not a multiple of the 4-row tile, odd columns, k below, at and past 8 lanes.
  for (auto [m, n, k] : {std::tuple{1, 1, 1}, {3, 5, 7}, {4, 2, 8}, {9, 7, 13}, {33, 65, 100}, {70, 130, 64}}) {
    SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    auto x = random_values(size_t(m * k), 1), w = random_values(size_t(n * k), 2), bias = random_values(size_t(n), 3);
    std::vector<float> y(size_t(m * n));
    linear_fixed_order(x.data(), m, k, w.data(), n, bias.data(), y.data());
    std::vector<float> ys(size_t(m * n));
    gemm_nt_fixed_order(m, n, k, 0.5f, x.data(), k, w.data(), k, nullptr, ys.data(), n);
    double worst = 0;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double ref = 0, mag = 0;
        for (int e = 0; e < k; ++e) {
          ref += double(x[size_t(i * k + e)]) * w[size_t(j * k + e)];
          mag += std::abs(double(x[size_t(i * k + e)]) * w[size_t(j * k + e)]);
        }
        worst = std::max(worst, std::abs(y[size_t(i * n + j)] - (ref + bias[size_t(j)])) / (mag + 1.0));
        worst = std::max(worst, std::abs(ys[size_t(i * n + j)] - 0.5 * ref) / (mag + 1.0));
      }
    EXPECT_LT(worst, 1e-6);
  }
}

TEST(CpuOps, LinearRowsEqualTheRowsAlone) {
  auto be = make_cpu_backend();
  const int64_t m = 37, k = 68, n = 45;  // k: 8 full lane groups and a partial one
  auto xv = random_values(size_t(m * k), 4), wv = random_values(size_t(n * k), 5), bv = random_values(size_t(n), 6);
  Tensor w = be->upload(Tensor::from_f32({n, k}, wv), DType::F32);
  Tensor b = be->upload(Tensor::from_f32({n}, bv), DType::F32);
  Tensor all = be->linear(be->upload(Tensor::from_f32({m, k}, xv), DType::F32), w, &b);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<float> row(xv.begin() + i * k, xv.begin() + (i + 1) * k);
    Tensor alone = be->linear(be->upload(Tensor::from_f32({1, k}, row), DType::F32), w, &b);
    ASSERT_EQ(std::memcmp(alone.f32(), all.f32() + i * n, size_t(n) * sizeof(float)), 0) << "row " << i;
  }
}

TEST(CpuOps, AttentionOfAnItemEqualsItsOutputInAPaddedBatch) {
  // Item 0 alone (S = 300: two query blocks of 256 and 44) and beside a longer item 1 (S = 530, item 0's
  // keys limited to its 300): item 0's query blocks change size, its outputs must not change.
  auto be = make_cpu_backend();
  const int hq = 4, hkv = 2, d = 24;
  const int64_t width = int64_t(hq + 2 * hkv) * d, len0 = 300, len1 = 530;
  auto item0 = random_values(size_t(len0 * width), 7), item1 = random_values(size_t(len1 * width), 8);
  const float scale = 1.0f / std::sqrt(float(d));
  for (bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "non-causal");
    Tensor alone = be->attention(be->upload(Tensor::from_f32({1, len0, width}, item0), DType::F32), hq, hkv, d, scale,
                                 causal, {int(len0)});
    std::vector<float> batch(size_t(2 * len1 * width), 0.0f);
    std::copy(item0.begin(), item0.end(), batch.begin());
    std::copy(item1.begin(), item1.end(), batch.begin() + len1 * width);
    Tensor both = be->attention(be->upload(Tensor::from_f32({2, len1, width}, batch), DType::F32), hq, hkv, d, scale,
                                causal, {int(len0), int(len1)});
    EXPECT_EQ(std::memcmp(alone.f32(), both.f32(), size_t(len0 * hq * d) * sizeof(float)), 0);
  }
}

}  // namespace

// Ring attention's parts: the attention of all keys equals two partial attentions over a split of the
// keys merged by their log-sum-exp, and a block without valid keys merges as nothing.
TEST(CpuBackend, PartialAttentionsMergeToTheWhole) {
  auto be = make_cpu_backend();
  const int h = 2, d = 16;
  const int64_t n = 2, s = 40, width = 3 * h * d;
  Tensor qkv = Tensor::empty({n, s, width}, DType::F32);
  uint64_t state = 7;
  for (int64_t i = 0; i < qkv.numel(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    qkv.f32()[i] = float(double(state >> 11) / double(1ull << 53) * 2.0 - 1.0);
  }
  const std::vector<int> key_len = {40, 29};
  const Tensor whole = be->attention(qkv, h, h, d, 0.25f, false, key_len);
  // Keys [0, 17) and [17, key_len): the second block as its own tensor of rows 17...
  Tensor second = Tensor::empty({n, s - 17, width}, DType::F32);
  for (int64_t i = 0; i < n; ++i)
    std::copy(qkv.f32() + (i * s + 17) * width, qkv.f32() + (i * s + s) * width, second.f32() + i * (s - 17) * width);
  Tensor lse_a, lse_b, lse_none;
  Tensor out = be->attention_with_lse(qkv, qkv, h, d, 0.25f, {17, 17}, lse_a);
  const Tensor b = be->attention_with_lse(qkv, second, h, d, 0.25f, {40 - 17, 29 - 17}, lse_b);
  be->merge_attention_(out, lse_a, b, lse_b);
  EXPECT_LE(zimage::testing::max_abs_diff(out, whole), 1e-6);
  // log-sum-exp of the whole row, checked in double for one query.
  double sum = 0;
  for (int64_t j = 0; j < 29; ++j) {
    double dot = 0;
    for (int e = 0; e < d; ++e)
      dot += double(qkv.f32()[(1 * s + 3) * width + e]) * double(qkv.f32()[(1 * s + j) * width + h * d + e]);
    sum += std::exp(0.25 * dot);
  }
  EXPECT_NEAR(lse_a.f32()[(1 * s + 3) * h + 0], std::log(sum), 1e-5);
  const Tensor none = be->attention_with_lse(qkv, qkv, h, d, 0.25f, {0, 0}, lse_none);
  EXPECT_EQ(lse_none.f32()[0], -INFINITY);
  const Tensor before = out.clone();
  be->merge_attention_(out, lse_a, none, lse_none);
  EXPECT_EQ(out.to_vector(), before.to_vector());
}
