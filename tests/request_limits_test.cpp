// The request checks the CLI runs before loading a model and the pipeline runs again (request_limits.h).
#include "pipeline/request_limits.h"

#include <gtest/gtest.h>

#include "test_util.h"

using namespace zimage;
using zimage::testing::expect_error;

namespace {

GenerateRequest one_prompt() {
  GenerateRequest r;
  r.prompts = {"a red fox"};
  r.height = r.width = 64;
  return r;
}

}  // namespace

TEST(RequestLimits, SizeMultipleComesFromTheConfigs) {
  EXPECT_EQ(size_multiple(open_model("synthetic:tiny")), 16);  // VAE 8x, DiT patch 2
}

// The hint's neighbours are 64-bit: INT_MAX's upper neighbour is 2^31, not -2^31.
TEST(RequestLimits, NearestValidSizeDoesNotOverflow) {
  EXPECT_EQ(not_a_multiple_message("height", 2147483647, 16),
            "height 2147483647 is not a multiple of 16 (nearest valid: 2147483632 or 2147483648)");
  EXPECT_EQ(not_a_multiple_message("width", 8, 16), "width 8 is not a multiple of 16 (nearest valid: 16)");
  expect_error([] { check_image_size(16, int64_t(1) << 62, 16, int64_t(2048) * 2048); }, ErrorKind::InvalidArgument,
               {"above the maximum of 4194304"});
  expect_error([] { check_image_size(int64_t(1) << 40, int64_t(1) << 40, 16, int64_t(2048) * 2048); },
               ErrorKind::InvalidArgument, {"too many pixels"});
  check_image_size(2048, 2048, 16, int64_t(2048) * 2048);  // the limit itself is allowed
}

TEST(RequestLimits, SeedsAreZeroTo2To63Minus1) {
  ModelSource m = open_model("synthetic:tiny");
  GenerateRequest r = one_prompt();
  r.seed = kMaxSeed;
  EXPECT_EQ(resolve_request(r, m, {}).seed, kMaxSeed);
  r.seed = kMaxSeed + 1;
  expect_error([&] { resolve_request(r, m, {}); }, ErrorKind::InvalidArgument,
               {"seed 9223372036854775808 is above the largest seed, 9223372036854775807"});
  r.seed = 0;
  r.noise_groups = {{1, ~uint64_t(0)}};
  expect_error([&] { resolve_request(r, m, {}); }, ErrorKind::InvalidArgument, {"seed 18446744073709551615"});
  EXPECT_EQ(parse_seed("9223372036854775807"), kMaxSeed);
  EXPECT_EQ(parse_seed("010"), 10u);  // decimal, not octal
  expect_error([] { parse_seed("-1", "--seed"); }, ErrorKind::InvalidArgument, {"--seed '-1' is negative"});
  for (const char* big : {"9223372036854775808", "18446744073709551616", "99999999999999999999999"})
    expect_error([&] { parse_seed(big); }, ErrorKind::InvalidArgument, {"is above the largest seed"});
  for (const char* bad : {"", "0x10", "1e3", "42 ", "+1", "4 2"})
    expect_error([&] { parse_seed(bad); }, ErrorKind::InvalidArgument, {"is not a whole number"});
}

TEST(RequestLimits, NegativePromptsOneForAllOrOnePerPrompt) {
  ModelSource m = open_model("synthetic:tiny");
  GenerateRequest r = one_prompt();
  r.prompts = {"a", "b"};
  r.negative_prompts = {"x"};
  EXPECT_EQ(resolve_request(r, m, {}).negative_prompts, (std::vector<std::string>{"x", "x"}));
  r.negative_prompts = {"x", "y"};
  EXPECT_EQ(resolve_request(r, m, {}).negative_prompts, (std::vector<std::string>{"x", "y"}));
  r.negative_prompts = {"x", "y", "z"};
  expect_error([&] { resolve_request(r, m, {}); }, ErrorKind::InvalidArgument,
               {"got 3 negative prompts for 2 prompts"});
}

TEST(RequestLimits, Utf8IsCheckedByTheStandardsTable) {
  EXPECT_FALSE(invalid_utf8_at("plain ascii, ünïcödé, 漢字, 🦊"));
  EXPECT_EQ(invalid_utf8_at("ab\xff"), 2u);
  EXPECT_EQ(invalid_utf8_at("\xc0\x80"), 0u);          // overlong NUL
  EXPECT_EQ(invalid_utf8_at("x\xed\xa0\x80"), 1u);     // a UTF-16 surrogate
  EXPECT_EQ(invalid_utf8_at("\xf4\x90\x80\x80"), 0u);  // above U+10FFFF
  EXPECT_EQ(invalid_utf8_at("ok\xe6\xbc"), 2u);        // cut short
}

TEST(RequestLimits, MessagesEscapeBadBytesAndControls) {
  EXPECT_EQ(escape_for_message("a\xff"
                               "b\x1b[31m\n漢"),
            "a\\xffb\\x1b[31m\\n漢");
  EXPECT_EQ(escape_for_message("\xc2\x9b"), "\\xc2\\x9b");  // C1 control CSI
  ModelSource m = open_model("synthetic:tiny");
  GenerateRequest r = one_prompt();
  r.prompts = {"fine", "a \xff\xfe cat"};
  try {
    resolve_request(r, m, {});
    FAIL() << "accepted a prompt that is not UTF-8";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("prompt 2 is not valid UTF-8: byte 0xff at offset 2 (\"a \\xff\\xfe cat\")"), std::string::npos)
        << what;
    EXPECT_EQ(what.find('\xff'), std::string::npos);
  }
}
