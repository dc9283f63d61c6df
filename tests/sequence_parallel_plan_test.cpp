#include "parallel/sequence_parallel_plan.h"

#include <gtest/gtest.h>

#include <numeric>

#include "core/error.h"

using namespace zimage;

namespace {

constexpr int64_t kHeads = 30;  // Z-Image-Turbo

struct Case {
  int width, height, degree;
  ShardAxis axis;
  std::vector<int64_t> sizes;    // patch rows/columns per rank
  std::vector<int64_t> offsets;  // first row/column per rank
  int64_t local_len;             // L
  std::vector<int64_t> padding;  // pad tokens per rank
};

// Sizes are width x height in pixels (720x1280 is portrait); the patch grid is (height/16) x (width/16)
// (VAE /8, patch 2). N = grid_h * grid_w; one GPU pads to round_up(N, 32), P = that - N.
// For each axis: A patches along it split U ways (the first A % U ranks one more), L = round_up(max
// band * other, 32), pad = U*L - N. The smaller pad wins; ties go to the longer axis, then H.
const std::vector<Case> kCases = {
    // 1024^2: grid 64x64, N = 4096, P = 0. Square: both axes give the same numbers, tie -> H.
    // U=2: 32,32 -> 32*64 = 2048 = L (already a multiple of 32), pad 0.
    {1024, 1024, 2, ShardAxis::H, {32, 32}, {0, 32}, 2048, {0, 0}},
    // U=3: 64 = 22+21+21 -> max 22*64 = 1408 = 44*32 = L, pad 3*1408 - 4096 = 128; ranks 0, 64, 64.
    {1024, 1024, 3, ShardAxis::H, {22, 21, 21}, {0, 22, 43}, 1408, {0, 64, 64}},
    // U=5: 64 = 13*4 + 12 -> 13*64 = 832 = L, pad 4160 - 4096 = 64, all on the last rank (12*64 = 768).
    {1024, 1024, 5, ShardAxis::H, {13, 13, 13, 13, 12}, {0, 13, 26, 39, 52}, 832, {0, 0, 0, 0, 64}},
    // U=6: 64 = 11*4 + 10*2 -> 11*64 = 704 = L, pad 4224 - 4096 = 128 (10*64 = 640: 64 each on ranks 4, 5).
    {1024, 1024, 6, ShardAxis::H, {11, 11, 11, 11, 10, 10}, {0, 11, 22, 33, 44, 54}, 704, {0, 0, 0, 0, 64, 64}},

    // 720x1280 (portrait): grid 80 rows x 45 columns, N = 3600, one GPU 3616 (P = 16).
    // U=2: H 40,40 -> 1800 -> L 1824, pad 48; W 23,22 -> 23*80 = 1840 -> 1856, pad 112. H.
    {720, 1280, 2, ShardAxis::H, {40, 40}, {0, 40}, 1824, {24, 24}},
    // U=3: H 27,27,26 -> 27*45 = 1215 -> 1216, pad 3648 - 3600 = 48; W 15,15,15 -> 15*80 = 1200 -> 1216,
    // pad 48. Tie -> the longer axis, H (80 rows). Ranks: 1216-1215 = 1, 1, 1216-26*45 = 46.
    {720, 1280, 3, ShardAxis::H, {27, 27, 26}, {0, 27, 54}, 1216, {1, 1, 46}},
    // U=5: H 16 each -> 720 -> 736, pad 80; W 9 each -> 720 -> 736, pad 80. Tie -> H.
    {720, 1280, 5, ShardAxis::H, {16, 16, 16, 16, 16}, {0, 16, 32, 48, 64}, 736, {16, 16, 16, 16, 16}},
    // U=6: H 14,14,13,13,13,13 -> 630 -> 640, pad 240; W 8,8,8,7,7,7 -> 640 -> 640, pad 240. Tie -> H.
    // Ranks: 640-630 = 10, 10, 640-585 = 55 x4.
    {720, 1280, 6, ShardAxis::H, {14, 14, 13, 13, 13, 13}, {0, 14, 28, 41, 54, 67}, 640, {10, 10, 55, 55, 55, 55}},

    // 1280x720 (landscape): grid 45 rows x 80 columns, the transpose of the above: every choice flips to W.
    // U=2: W 40,40 -> 1800 -> 1824, pad 48; H 23,22 -> 23*80 = 1840 -> 1856, pad 112. W.
    {1280, 720, 2, ShardAxis::W, {40, 40}, {0, 40}, 1824, {24, 24}},
    // U=3: tie at pad 48 -> the longer axis, W (80 columns).
    {1280, 720, 3, ShardAxis::W, {27, 27, 26}, {0, 27, 54}, 1216, {1, 1, 46}},
    // U=5: tie at 80 -> W.
    {1280, 720, 5, ShardAxis::W, {16, 16, 16, 16, 16}, {0, 16, 32, 48, 64}, 736, {16, 16, 16, 16, 16}},
    // U=6: tie at 240 -> W.
    {1280, 720, 6, ShardAxis::W, {14, 14, 13, 13, 13, 13}, {0, 14, 28, 41, 54, 67}, 640, {10, 10, 55, 55, 55, 55}},

    // 720x720: grid 45x45, N = 2025, one GPU 2048 (P = 23). Square: tie -> H.
    // U=2: 23,22 -> 23*45 = 1035 -> 1056, pad 2112 - 2025 = 87; ranks 21, 1056-990 = 66.
    {720, 720, 2, ShardAxis::H, {23, 22}, {0, 23}, 1056, {21, 66}},
    // U=3: 15 each -> 675 -> 704, pad 2112 - 2025 = 87; 29 each.
    {720, 720, 3, ShardAxis::H, {15, 15, 15}, {0, 15, 30}, 704, {29, 29, 29}},
    // U=5: 9 each -> 405 -> 416, pad 2080 - 2025 = 55; 11 each.
    {720, 720, 5, ShardAxis::H, {9, 9, 9, 9, 9}, {0, 9, 18, 27, 36}, 416, {11, 11, 11, 11, 11}},
    // U=6: 8,8,8,7,7,7 -> 360 -> 384, pad 2304 - 2025 = 279; 24 x3, 384-315 = 69 x3.
    {720, 720, 6, ShardAxis::H, {8, 8, 8, 7, 7, 7}, {0, 8, 16, 24, 31, 38}, 384, {24, 24, 24, 69, 69, 69}},

    // 1360x768: grid 48 rows x 85 columns, N = 4080, one GPU 4096 (P = 16).
    // U=2: H 24,24 -> 2040 -> 2048, pad 16; W 43,42 -> 43*48 = 2064 -> 2080, pad 80. H (the shorter axis
    // wins on padding).
    {1360, 768, 2, ShardAxis::H, {24, 24}, {0, 24}, 2048, {8, 8}},
    // U=3: H 16 each -> 1360 -> 1376, pad 48; W 29,28,28 -> 29*48 = 1392 -> 1408, pad 144. H.
    {1360, 768, 3, ShardAxis::H, {16, 16, 16}, {0, 16, 32}, 1376, {16, 16, 16}},
    // U=5: H 10,10,10,9,9 -> 850 -> 864, pad 240; W 17 each -> 816 -> 832, pad 80. W.
    {1360, 768, 5, ShardAxis::W, {17, 17, 17, 17, 17}, {0, 17, 34, 51, 68}, 832, {16, 16, 16, 16, 16}},
    // U=6: H 8 each -> 680 -> 704, pad 144; W 15,14,14,14,14,14 -> 15*48 = 720 -> 736, pad 336. H.
    {1360, 768, 6, ShardAxis::H, {8, 8, 8, 8, 8, 8}, {0, 8, 16, 24, 32, 40}, 704, {24, 24, 24, 24, 24, 24}},

    // 2048^2: grid 128x128, N = 16384, P = 0. Square: tie -> H.
    // U=2: 64,64 -> 8192 = L, pad 0.
    {2048, 2048, 2, ShardAxis::H, {64, 64}, {0, 64}, 8192, {0, 0}},
    // U=3: 43,43,42 -> 43*128 = 5504 = L, pad 16512 - 16384 = 128 (42*128 = 5376 on the last rank).
    {2048, 2048, 3, ShardAxis::H, {43, 43, 42}, {0, 43, 86}, 5504, {0, 0, 128}},
    // U=5: 26,26,26,25,25 -> 3328 = L, pad 16640 - 16384 = 256 (25*128 = 3200: 128 on ranks 3, 4).
    {2048, 2048, 5, ShardAxis::H, {26, 26, 26, 25, 25}, {0, 26, 52, 78, 103}, 3328, {0, 0, 0, 128, 128}},
    // U=6: 22,22,21,21,21,21 -> 2816 = L, pad 16896 - 16384 = 512 (21*128 = 2688: 128 on ranks 2-5).
    {2048, 2048, 6, ShardAxis::H, {22, 22, 21, 21, 21, 21}, {0, 22, 44, 65, 86, 107}, 2816, {0, 0, 128, 128, 128, 128}},

    // 832x1216 (portrait): grid 76 rows x 52 columns, N = 3952, one GPU 3968 (P = 16).
    // U=2: H 38,38 -> 1976 -> 1984, pad 16; W 26,26 -> 1976 -> 1984, pad 16. Tie -> longer axis H.
    {832, 1216, 2, ShardAxis::H, {38, 38}, {0, 38}, 1984, {8, 8}},
    // U=3: H 26,25,25 -> 1352 -> 1376, pad 4128 - 3952 = 176; W 18,17,17 -> 18*76 = 1368 -> 1376, pad 176.
    // Tie -> H. Ranks 24, 1376-1300 = 76, 76.
    {832, 1216, 3, ShardAxis::H, {26, 25, 25}, {0, 26, 51}, 1376, {24, 76, 76}},
    // U=5: H 16,15,15,15,15 -> 832 = L, pad 4160 - 3952 = 208; W 11,11,10,10,10 -> 836 -> 864, pad 368. H.
    {832, 1216, 5, ShardAxis::H, {16, 15, 15, 15, 15}, {0, 16, 31, 46, 61}, 832, {0, 52, 52, 52, 52}},
    // U=6: H 13,13,13,13,12,12 -> 676 -> 704, pad 4224 - 3952 = 272; W 9,9,9,9,8,8 -> 684 -> 704, pad 272.
    // Tie -> H. Ranks 28 x4, 704-624 = 80 x2.
    {832, 1216, 6, ShardAxis::H, {13, 13, 13, 13, 12, 12}, {0, 13, 26, 39, 52, 64}, 704, {28, 28, 28, 28, 80, 80}},
};

}  // namespace

TEST(SequenceParallelPlan, ResolutionsAndDegrees) {
  for (const Case& c : kCases) {
    const int64_t gh = c.height / 16, gw = c.width / 16, n = gh * gw;
    SCOPED_TRACE(std::to_string(c.width) + "x" + std::to_string(c.height) + " U=" + std::to_string(c.degree));
    SequenceParallelPlan p = plan_sequence_parallel(gh, gw, c.degree, kHeads);
    EXPECT_EQ(p.axis, c.axis);
    EXPECT_EQ(p.local_len, c.local_len);
    EXPECT_EQ(p.image_tokens, n);
    EXPECT_EQ(p.total_padding, c.degree * c.local_len - n);
    EXPECT_EQ(p.attended_padding, (n + 31) / 32 * 32 - n);
    EXPECT_GE(p.total_padding, p.attended_padding);  // enough pad tokens for exactness
    ASSERT_EQ(p.ranks.size(), size_t(c.degree));
    const int64_t other = c.axis == ShardAxis::H ? gw : gh;
    for (size_t r = 0; r < p.ranks.size(); ++r) {
      const RankShard& s = p.ranks[r];
      EXPECT_EQ(s.size, c.sizes[r]) << "rank " << r;
      EXPECT_EQ(s.offset, c.offsets[r]) << "rank " << r;
      EXPECT_EQ(s.tokens, c.sizes[r] * other) << "rank " << r;
      EXPECT_EQ(s.padding, c.padding[r]) << "rank " << r;
      // RoPE offsets: the rank's band keeps its native rows and columns.
      if (c.axis == ShardAxis::H) {
        EXPECT_EQ(s.h0, c.offsets[r]);
        EXPECT_EQ(s.w0, 0);
        EXPECT_EQ(s.h_len, c.sizes[r]);
        EXPECT_EQ(s.w_len, gw);
      } else {
        EXPECT_EQ(s.h0, 0);
        EXPECT_EQ(s.w0, c.offsets[r]);
        EXPECT_EQ(s.h_len, gh);
        EXPECT_EQ(s.w_len, c.sizes[r]);
      }
    }
    EXPECT_EQ(std::accumulate(c.sizes.begin(), c.sizes.end(), int64_t(0)), c.axis == ShardAxis::H ? gh : gw);
  }
}

// Rank r's local token k maps to the native grid position of its band, row-major over the band, and
// every grid token has exactly one owner.
TEST(SequenceParallelPlan, TokensKeepNativePositions) {
  // 1280x720 on 3 GPUs: W bands of 27, 27, 26 columns over 45 rows.
  SequenceParallelPlan p = plan_sequence_parallel(45, 80, 3, kHeads);
  ASSERT_EQ(p.axis, ShardAxis::W);
  EXPECT_EQ(p.global_token(0, 0), 0);
  EXPECT_EQ(p.global_token(0, 26), 26);                     // row 0, column 26
  EXPECT_EQ(p.global_token(0, 27), 80);                     // row 1, column 0
  EXPECT_EQ(p.global_token(1, 0), 27);                      // row 0, column 27
  EXPECT_EQ(p.global_token(2, 25), 79);                     // row 0, column 54 + 25
  EXPECT_EQ(p.global_token(2, 26 * 45 - 1), 44 * 80 + 79);  // the last token
  auto owners = p.token_owners();
  ASSERT_EQ(owners.size(), size_t(3600));
  for (int64_t g = 0; g < 3600; ++g) EXPECT_EQ(p.global_token(owners[size_t(g)].first, owners[size_t(g)].second), g);
  EXPECT_EQ(owners[80].first, 0);
  EXPECT_EQ(owners[80].second, 27);
}

TEST(SequenceParallelPlan, DegreeMustDivideHeads) {
  for (int u : {4, 7, 8}) {
    try {
      plan_sequence_parallel(64, 64, u, kHeads);
      FAIL() << "degree " << u << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
      EXPECT_EQ(std::string(e.what()), "Ulysses degree " + std::to_string(u) +
                                           " does not divide the model's 30 attention heads: each GPU attends "
                                           "heads / degree of them (use one of 1, 2, 3, 5, 6, 10, 15, 30)");
    }
  }
}

TEST(SequenceParallelPlan, TooSmallToSplit) {
  // 2x3 patches (32x48 pixels) cannot give 5 GPUs a row or column each; 3 GPUs get a column each.
  EXPECT_THROW(plan_sequence_parallel(2, 3, 5, kHeads), Error);
  SequenceParallelPlan p = plan_sequence_parallel(2, 3, 3, kHeads);
  EXPECT_EQ(p.axis, ShardAxis::W);
  EXPECT_EQ(p.local_len, 32);
}

TEST(SequenceParallelPlan, OneRankIsTheWholeImage) {
  SequenceParallelPlan p = plan_sequence_parallel(45, 45, 1, kHeads);
  EXPECT_EQ(p.local_len, 2048);
  EXPECT_EQ(p.total_padding, 23);
  EXPECT_EQ(p.attended_padding, 23);
}
