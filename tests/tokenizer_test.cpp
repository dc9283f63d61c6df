#include "text/tokenizer.h"

#include <gtest/gtest.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

using namespace zimage;
using zimage::testing::assets_path;
using zimage::testing::golden_path;
using zimage::testing::temp_path;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The real Qwen3 tokenizer (tests/golden/tiny-zimage/tokenizer holds the same tokenizer.json as assets/),
// loaded once: the tests only read it.
const Tokenizer& qwen() {
  static const Tokenizer t = Tokenizer::load(golden_path("tiny-zimage/tokenizer"));
  return t;
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return json::parse(in);
}

std::string write_file(const std::string& name, const std::string& content) {
  std::string path = temp_path(name);
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

std::vector<int32_t> ids_of(const json& j) { return j.get<std::vector<int32_t>>(); }

std::vector<int64_t> row(const Tensor& t, int64_t b) {
  const int64_t n = t.dim(1);
  const int64_t* p = t.data_as<int64_t>() + b * n;
  return std::vector<int64_t>(p, p + n);
}

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Expects loading `path` to fail with an Error of `kind` whose message holds every fragment.
void expect_load_error(const std::string& path, ErrorKind kind, std::initializer_list<std::string> fragments) {
  SCOPED_TRACE(path);
  zimage::testing::expect_error([&] { Tokenizer::load(path); }, kind, fragments);
}

// --- A small byte-level BPE tokenizer built in the test, to exercise options Qwen's file does not use. ---

std::string byte_char(int b) {  // the GPT-2 byte alphabet, spelled out independently of the engine
  int cp = b;
  if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) {
    int n = 0;
    for (int x = 0; x < b; ++x)
      if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) ++n;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else {
    s.push_back(char(0xC0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  }
  return s;
}

// Vocabulary: the 256 byte tokens (id = byte value) then the merged tokens below, ids 256...
json synthetic_tokenizer(bool array_merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"},   {"he", "ll"}, {"hell", "o"},  {"Ġ", "w"},
      {"o", "r"}, {"Ġw", "or"}, {"l", "d"},   {"Ġwor", "ld"}, {"Ġ", "Ġ"}};
  json jm = json::array();
  int next = 256;
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = next++;
    if (array_merges)
      jm.push_back(json::array({a, b}));
    else
      jm.push_back(a + " " + b);
  }
  auto added = [](int id, const char* content, bool lstrip, bool rstrip, bool single_word, bool normalized) {
    return json{{"id", id},         {"content", content},       {"single_word", single_word}, {"lstrip", lstrip},
                {"rstrip", rstrip}, {"normalized", normalized}, {"special", !normalized}};
  };
  // Added tokens take the ids after the vocabulary: 266...
  return json{
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       json::array({added(next, "<L>", true, false, false, false), added(next + 1, "<R>", false, true, false, false),
                    added(next + 2, "tok", false, false, true, false),
                    added(next + 3, "caf\u00e9", false, false, false, true),
                    added(next + 4, "<pad>", false, false, false, false)})},
      {"normalizer", {{"type", "Sequence"}, {"normalizers", json::array({json{{"type", "NFC"}}})}}},
      {"pre_tokenizer",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", ""},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", jm}}}};
}

std::string write_tokenizer(const std::string& name, const json& j) { return write_file(name, j.dump()); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Loading and lookups
// ------------------------------------------------------------------------------------------------

TEST(Tokenizer, LoadsQwenTokenizer) {
  const Tokenizer& t = qwen();
  EXPECT_EQ(t.vocab_size(), 151669u);  // 151,643 BPE tokens + 26 added tokens
  EXPECT_EQ(t.pad_id(), 151643);       // tokenizer_config.json: pad_token "<|endoftext|>"
  EXPECT_EQ(t.token_id("<|im_start|>"), 151644);
  EXPECT_EQ(t.token_id("<|im_end|>"), 151645);
  EXPECT_EQ(t.token_id("assistant"), 77091);
  EXPECT_EQ(t.token_id("Ċ"), 198);  // "\n" in the byte alphabet
  zimage::testing::expect_error([&] { t.token_id("no such token"); }, ErrorKind::NotFound, {});
}

TEST(Tokenizer, LoadsFromFolderOrFile) {
  const Tokenizer from_file = Tokenizer::load(assets_path("tokenizer.json"));
  EXPECT_EQ(from_file.vocab_size(), qwen().vocab_size());
  const std::string text = "<|im_start|>user\n一只猫 and a dog<|im_end|>";
  EXPECT_EQ(from_file.encode(text), qwen().encode(text));
  EXPECT_EQ(from_file.pad_id(), 151643);  // assets/ has no tokenizer_config.json: the Qwen2 default
}

TEST(Tokenizer, LoadTime) {
  const auto wall0 = std::chrono::steady_clock::now();
  const double cpu0 = thread_cpu_seconds();
  const Tokenizer t = Tokenizer::load(assets_path("tokenizer.json"));
  const double cpu = thread_cpu_seconds() - cpu0;
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  std::printf("[ perf     ] tokenizer.json load: %.3f s CPU, %.3f s wall\n", cpu, wall);
  EXPECT_GT(t.vocab_size(), 0u);
#ifdef NDEBUG
  EXPECT_LT(cpu, 1.0);
#endif
}

// ------------------------------------------------------------------------------------------------
// Golden ids from the reference tokenizer
// ------------------------------------------------------------------------------------------------

TEST(Tokenizer, GoldenEncodeCases) {
  const json cases = read_json(golden_path("tokenizer_cases.json"));
  ASSERT_FALSE(cases.at("encode").empty());
  for (const json& c : cases.at("encode")) {
    const std::string text = c.at("text");
    const auto ids = qwen().encode(text);
    EXPECT_EQ(ids, ids_of(c.at("ids"))) << text;
    EXPECT_EQ(qwen().decode(ids), text);
  }
}

TEST(Tokenizer, GoldenChatCases) {
  const json cases = read_json(golden_path("tokenizer_cases.json"));
  ASSERT_FALSE(cases.at("chat").empty());
  for (const json& c : cases.at("chat")) {
    const std::string prompt = c.at("prompt");
    const std::string templated = zimage_chat_template(prompt);
    EXPECT_EQ(templated, c.at("templated").get<std::string>());
    const auto ids = qwen().encode(templated);
    EXPECT_EQ(ids, ids_of(c.at("ids"))) << prompt;
    EXPECT_EQ(qwen().decode(ids), templated);
  }
}

// Edge cases checked against the reference implementation (HF tokenizers, Rust) when this test was written.
TEST(Tokenizer, ReferenceEdgeCases) {
  struct Case {
    const char* name;
    std::string text;
    std::vector<int32_t> ids;
  };
  const std::vector<Case> cases = {
      {"NFC composes", "e\u0301 cafe\u0301 \u212a\u212b", {963, 51950, 730, 144044}},
      {"unusual whitespace",
       "a\u0085b\u00a0c\u3000d\u2028e\u200bf",
       {64, 126, 227, 65, 4102, 66, 22441, 67, 378, 101, 68, 15692, 69}},
      {"CRLF and indentation",
       "line1\r\nline2\r\n\r\n  indented\n",
       {1056, 16, 319, 1056, 17, 871, 220, 1257, 15864, 198}},
      {"caseless contractions", "x'S y'\u017f z'RE 'll", {87, 13272, 379, 6, 144815, 1147, 94153, 364, 654}},
      {"non-special added tokens",
       "<tool_call>{\"a\": 1}</tool_call><think>\n</think>",
       {151657, 4913, 64, 788, 220, 16, 92, 151658, 151667, 198, 151668}},
      {"partial special token", "<|im_start<|im_end|>|>", {27, 91, 318, 4906, 151645, 91, 29}},
      {"Hangul jamo compose", "\u1100\u1161\u11a8 한", {126317, 61298}},
      {"emoji sequences",
       "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \U0001f44d\U0001f3fd \U0001f1eb\U0001f1f7",
       {145367, 378, 235, 145233, 378, 235, 145665, 378, 235, 145988, 61804, 235, 145375, 11162, 229, 104, 145070}},
      {"leading and trailing spaces", "     leading and trailing     ", {257, 6388, 323, 27748, 414}},
      {"compatibility characters kept",
       "ﬁ ① ½ ² Ⅻ",
       {144300, 220, 48312, 254, 220, 26062, 220, 29456, 220, 70467, 104}},
      {"adjacent special tokens", "<|endoftext|><|endoftext|> <|im_end|> ", {151643, 151643, 220, 151645, 220}},
      {"right-to-left and Thai",
       "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
       {124122, 29825, 124671, 124476, 129634, 129328, 37213, 23271, 125136, 28319}},
  };
  for (const Case& c : cases) EXPECT_EQ(qwen().encode(c.text), c.ids) << c.name;
  // Normalization is not undone: decode gives the NFC form.
  EXPECT_EQ(qwen().decode(qwen().encode("cafe\u0301 \u212a")), "caf\u00e9 K");
}

// The pipeline's own token tensors: tokens.input_ids / tokens.attention_mask of every golden case.
TEST(Tokenizer, GoldenPipelineCases) {
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(golden_path("cases"))) {
    if (!entry.is_directory()) continue;
    SCOPED_TRACE(entry.path().filename().string());
    const json c = read_json((entry.path() / "case.json").string());
    std::vector<std::string> prompts;
    if (c.at("prompt").is_string())
      prompts.push_back(c.at("prompt"));
    else
      prompts = c.at("prompt").get<std::vector<std::string>>();
    const int64_t max_len = c.at("max_sequence_length");
    auto file = SafetensorsFile::open((entry.path() / "tensors.safetensors").string());

    const TokenizedBatch batch = tokenize_prompts(qwen(), prompts, max_len);
    const Tensor ref_ids = file->get("tokens.input_ids");
    const Tensor ref_mask = file->get("tokens.attention_mask");
    ASSERT_EQ(ref_ids.shape(), (Shape{int64_t(prompts.size()), max_len}));
    ASSERT_EQ(batch.input_ids.shape(), ref_ids.shape());
    ASSERT_EQ(batch.attention_mask.shape(), ref_mask.shape());
    ASSERT_EQ(batch.input_ids.dtype(), DType::I64);
    ASSERT_EQ(batch.attention_mask.dtype(), DType::I64);
    for (int64_t b = 0; b < int64_t(prompts.size()); ++b) {
      EXPECT_EQ(row(batch.input_ids, b), row(ref_ids, b)) << "prompt " << b;
      EXPECT_EQ(row(batch.attention_mask, b), row(ref_mask, b)) << "prompt " << b;
      EXPECT_FALSE(batch.truncated[size_t(b)]);
      if (c.contains("templated_prompt")) {
        EXPECT_EQ(zimage_chat_template(prompts[size_t(b)]), c["templated_prompt"][size_t(b)].get<std::string>());
      }
      // The pipeline keeps one embedding per real token: the lengths must agree with prompt_embeds.
      const std::string embeds = "prompt_embeds." + std::to_string(b);
      if (file->has(embeds)) {
        EXPECT_EQ(batch.lengths[size_t(b)], file->get(embeds).dim(0));
      }
    }
    // CFG cases store no negative token tensors, only the negative embeddings, one row per real token.
    if (c.contains("negative_prompt") && c["negative_prompt"].is_string()) {
      const TokenizedBatch neg = tokenize_prompts(qwen(), {c["negative_prompt"].get<std::string>()}, max_len);
      ASSERT_TRUE(file->has("negative_prompt_embeds.0"));
      EXPECT_EQ(neg.lengths[0], file->get("negative_prompt_embeds.0").dim(0));
      for (int64_t i = 0; i < max_len; ++i)
        EXPECT_EQ(neg.attention_mask.data_as<int64_t>()[i], i < neg.lengths[0] ? 1 : 0);
    }
    ++checked;
  }
  EXPECT_GE(checked, 4);
}

// ------------------------------------------------------------------------------------------------
// Batching and truncation
// ------------------------------------------------------------------------------------------------

TEST(Tokenizer, TruncationIsFlagged) {
  const std::string long_prompt =
      "a very long prompt about a mountain lake at sunrise with mist, pine trees, a wooden cabin, "
      "a canoe on the shore and snow on the distant peaks";
  const auto full = qwen().encode(zimage_chat_template(long_prompt));
  ASSERT_GT(full.size(), 16u);
  const TokenizedBatch b = tokenize_prompts(qwen(), {long_prompt, "a red apple"}, 16);
  ASSERT_EQ(b.input_ids.shape(), (Shape{2, 16}));
  EXPECT_EQ(b.truncated, (std::vector<bool>{true, false}));
  EXPECT_EQ(b.lengths[0], 16);
  EXPECT_EQ(b.lengths[1], 11);
  for (int64_t i = 0; i < 16; ++i) {
    EXPECT_EQ(b.input_ids.data_as<int64_t>()[i], full[size_t(i)]);  // the first tokens are kept
    EXPECT_EQ(b.attention_mask.data_as<int64_t>()[i], 1);
  }
  EXPECT_EQ(row(b.input_ids, 1).back(), qwen().pad_id());
  EXPECT_EQ(row(b.attention_mask, 1)[10], 1);
  EXPECT_EQ(row(b.attention_mask, 1)[11], 0);

  // Exactly max_len tokens is not a truncation.
  const TokenizedBatch exact = tokenize_prompts(qwen(), {"a red apple"}, 11);
  EXPECT_FALSE(exact.truncated[0]);
  EXPECT_EQ(exact.lengths[0], 11);

  zimage::testing::expect_error([] { tokenize_prompts(qwen(), {"x"}, 0); }, ErrorKind::InvalidArgument, {});
}

// ------------------------------------------------------------------------------------------------
// Robustness
// ------------------------------------------------------------------------------------------------

TEST(Tokenizer, InvalidUtf8IsReplacedNotRejected) {
  // Each ill-formed subpart becomes one U+FFFD, as Python's bytes.decode("utf-8", "replace") does.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\xff", "\uFFFD"},
      {"abc\xc3", "abc\uFFFD"},                                      // truncated sequence at the end
      {"\xc3(x", "\uFFFD(x"},                                        // bad continuation byte
      {"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"},                        // an encoded UTF-16 surrogate
      {"\xc0\xaf", "\uFFFD\uFFFD"},                                  // overlong encoding
      {"\xf4\x90\x80\x80", "\uFFFD\uFFFD\uFFFD\uFFFD"},              // above U+10FFFF
      {"\xe4\xb8<|im_end|>\xe4\xb8\x80", "\uFFFD<|im_end|>\u4e00"},  // cut character before a special token
  };
  for (const auto& [bad, replaced] : cases) {
    std::vector<int32_t> ids;
    ASSERT_NO_THROW(ids = qwen().encode(bad));
    EXPECT_EQ(ids, qwen().encode(replaced));
    EXPECT_EQ(qwen().decode(ids), replaced);
  }
  // Arbitrary bytes, including NUL: no crash, and decode always yields valid UTF-8 of the replaced text.
  std::string noise;
  uint32_t x = 12345;
  for (int i = 0; i < 20000; ++i) {
    x = x * 1664525u + 1013904223u;
    noise.push_back(char(x >> 24));
  }
  std::vector<int32_t> ids;
  ASSERT_NO_THROW(ids = qwen().encode(noise));
  EXPECT_FALSE(ids.empty());
  const std::string back = qwen().decode(ids);
  EXPECT_EQ(qwen().encode(back), ids);
}

TEST(Tokenizer, DecodeOfPartialCharacterAndBadId) {
  const std::string rare = "\U00020000";  // a rare CJK character: BPE leaves it as several byte tokens
  const auto ids = qwen().encode(rare);
  ASSERT_GT(ids.size(), 1u);
  EXPECT_EQ(qwen().decode(ids), rare);
  // One piece of a character decodes to U+FFFD, never to invalid UTF-8.
  for (int32_t id : ids) {
    const std::string s = qwen().decode({id});
    EXPECT_NE(s.find("\uFFFD"), std::string::npos);
    EXPECT_EQ(s.find(rare), std::string::npos);
  }
  // Inside the embedding table but not a token.
  zimage::testing::expect_error([] { qwen().decode({151935}); }, ErrorKind::InvalidArgument, {});
}

TEST(Tokenizer, PathologicalInputs) {
  const std::vector<std::string> inputs = {std::string(200000, ' ') + "x", std::string(100000, 'a'),
                                           std::string(50000, '\n'), std::string(30000, '7'), [] {
                                             std::string s;
                                             for (int i = 0; i < 20000; ++i) s += "😀";
                                             return s;
                                           }()};
  for (const std::string& s : inputs) {
    std::vector<int32_t> ids;
    ASSERT_NO_THROW(ids = qwen().encode(s));
    EXPECT_EQ(qwen().decode(ids), s);
  }
}

TEST(Tokenizer, ConcurrentEncodeAgrees) {
  const json cases = read_json(golden_path("tokenizer_cases.json"));
  std::vector<std::string> texts;
  for (const json& c : cases.at("encode")) texts.push_back(c.at("text"));
  std::vector<std::vector<int32_t>> expected;
  for (const auto& t : texts) expected.push_back(qwen().encode(t));
  const Tokenizer fresh =
      Tokenizer::load(golden_path("tiny-zimage/tokenizer"));  // empty cache: threads race to fill it
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 50; ++rep)
        for (size_t i = 0; i < texts.size(); ++i)
          if (fresh.encode(texts[(i + size_t(k)) % texts.size()]) != expected[(i + size_t(k)) % texts.size()])
            ++failures[size_t(k)];
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures, std::vector<int>(4, 0));
}

// ------------------------------------------------------------------------------------------------
// Declarations of tokenizer.json beyond Qwen's: checked on a small tokenizer against ids from the
// reference implementation.
// ------------------------------------------------------------------------------------------------

TEST(Tokenizer, MergesAsStringsOrPairs) {
  const Tokenizer a = Tokenizer::load(write_tokenizer("syn_pairs.json", synthetic_tokenizer(true)));
  const Tokenizer b = Tokenizer::load(write_tokenizer("syn_strings.json", synthetic_tokenizer(false)));
  const std::string text = "hello world hello  world";
  EXPECT_EQ(a.encode(text), b.encode(text));
  EXPECT_EQ(a.encode("hello"), (std::vector<int32_t>{32, 259}));  // the ByteLevel prefix space, then "hello"
}

TEST(Tokenizer, QwenMergesAsStrings) {
  // Qwen's file stores merges as pairs; the same file with "a b" strings must tokenize identically.
  json j = read_json(assets_path("tokenizer.json"));
  for (json& m : j["model"]["merges"]) m = m[0].get<std::string>() + " " + m[1].get<std::string>();
  const Tokenizer t = Tokenizer::load(write_tokenizer("qwen_string_merges.json", j));
  const json cases = read_json(golden_path("tokenizer_cases.json"));
  for (const json& c : cases.at("encode")) EXPECT_EQ(t.encode(c.at("text").get<std::string>()), ids_of(c.at("ids")));
}

TEST(Tokenizer, AddedTokenOptionsAndByteLevelRegex) {
  const Tokenizer t = Tokenizer::load(write_tokenizer("syn_options.json", synthetic_tokenizer(true)));
  EXPECT_THROW(t.pad_id(), Error);  // no tokenizer_config.json and no <|endoftext|>
  struct Case {
    std::string text;
    std::vector<int32_t> ids;
  };
  // lstrip swallows the spaces before <L>, rstrip those after <R>; "tok" only counts as a whole word; the
  // normalized token "café" also matches its decomposed spelling; ByteLevel adds a prefix space per piece.
  const std::vector<Case> cases = {
      {"hello  <L>world", {32, 259, 266, 264}},
      {"hello<R>   world", {32, 259, 267, 264}},
      {"tok tokens tok", {268, 32, 116, 111, 107, 101, 110, 115, 32, 268}},
      {"a cafe\u0301 b", {32, 97, 32, 269, 32, 98}},
      {"hello world's 12 x\n\n y", {32, 259, 264, 39, 115, 32, 49, 50, 32, 120, 10, 10, 32, 121}},
      {"hello world hello  world", {32, 259, 264, 32, 259, 32, 264}},
      {"xtok tok_ tok1 (tok)",
       {32, 120, 116, 111, 107, 32, 116, 111, 107, 95, 32, 116, 111, 107, 49, 32, 40, 268, 32, 41}},
      {"<L><L>  <R>  <R>x", {266, 266, 265, 267, 267, 32, 120}},
      {"caf\u00e9tok", {269, 32, 116, 111, 107}},
  };
  for (const Case& c : cases) EXPECT_EQ(t.encode(c.text), c.ids) << c.text;
}

TEST(Tokenizer, SplitBehaviors) {
  // One Split step then a plain ByteLevel step; ids from the reference implementation.
  struct Case {
    json pattern;
    const char* behavior;
    bool invert;
    std::vector<int32_t> ids;
  };
  const std::vector<Case> cases = {
      {{{"Regex", " "}}, "Removed", false, {97, 98, 45, 99, 100, 45,  45,  101, 102, 49,
                                            50, 51, 52, 45, 53,  120, 259, 119, 261, 263}},
      {{{"String", "-"}}, "MergedWithPrevious", false, {97, 98, 45, 99, 100, 45, 45,  101, 102, 32, 49,
                                                        50, 32, 51, 52, 45,  53, 120, 32,  259, 32, 264}},
      {{{"Regex", "[a-z]+"}}, "Isolated", true, {97, 98, 45, 99, 100, 45,  45, 101, 102, 32,  49,  50,
                                                 32, 51, 52, 45, 53,  120, 32, 259, 265, 119, 261, 263}},
  };
  for (const Case& c : cases) {
    json j = synthetic_tokenizer(true);
    j["added_tokens"] = json::array();
    j["pre_tokenizer"] = {
        {"type", "Sequence"},
        {"pretokenizers",
         json::array({json{{"type", "Split"}, {"pattern", c.pattern}, {"behavior", c.behavior}, {"invert", c.invert}},
                      json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}};
    const Tokenizer t = Tokenizer::load(write_tokenizer(std::string("split_") + c.behavior + ".json", j));
    EXPECT_EQ(t.encode("ab-cd--ef 12 34-5x hello  world"), c.ids) << c.behavior;
  }
}

TEST(Tokenizer, AddedTokenIdsFollowTheReference) {
  // The reference ignores a declared id that does not follow the vocabulary (it warns); so does the engine.
  json j = synthetic_tokenizer(true);
  for (json& a : j["added_tokens"]) a["id"] = a["id"].get<int>() + 100;
  const Tokenizer t = Tokenizer::load(write_tokenizer("shifted_ids.json", j));
  EXPECT_EQ(t.token_id("<L>"), 266);
  EXPECT_EQ(t.encode("<pad>"), (std::vector<int32_t>{270}));
  EXPECT_EQ(t.decode({270, 266}), "<pad><L>");
}

TEST(Tokenizer, MalformedFilesGiveFormatErrors) {
  expect_load_error(temp_path("does_not_exist.json"), ErrorKind::NotFound, {"does_not_exist.json"});
  expect_load_error(write_file("bad1.json", "{\"model\": [1, 2"), ErrorKind::Format, {"bad1.json", "not valid JSON"});
  expect_load_error(write_file("bad2.json", "[1, 2, 3]"), ErrorKind::Format, {"bad2.json", "not a JSON object"});

  auto mutated = [](const std::string& name, const std::function<void(json&)>& change) {
    json j = synthetic_tokenizer(true);
    change(j);
    return write_tokenizer(name, j);
  };
  expect_load_error(mutated("bad3.json", [](json& j) { j.erase("model"); }), ErrorKind::Format,
                    {"bad3.json", "\"model\""});
  expect_load_error(mutated("bad4.json", [](json& j) { j["model"]["type"] = "WordPiece"; }), ErrorKind::Format,
                    {"bad4.json", "WordPiece"});
  expect_load_error(mutated("bad5.json",
                            [](json& j) {
                              j["normalizer"] = {{"type", "Lowercase"}};
                            }),
                    ErrorKind::Format, {"bad5.json", "Lowercase"});
  expect_load_error(mutated("bad6.json",
                            [](json& j) {
                              j["pre_tokenizer"] = {{"type", "Whitespace"}};
                            }),
                    ErrorKind::Format, {"bad6.json", "Whitespace"});
  expect_load_error(mutated("bad7.json",
                            [](json& j) {
                              j["model"]["merges"].push_back({"x", "nope"});
                            }),
                    ErrorKind::Format, {"bad7.json", "model.merges[10]", "nope"});
  expect_load_error(mutated("bad8.json", [](json& j) { j["model"]["vocab"]["zz"] = "seven"; }), ErrorKind::Format,
                    {"bad8.json", "model.vocab[\"zz\"]"});
  expect_load_error(mutated("bad9.json", [](json& j) { j["model"]["merges"][0] = "h e x"; }), ErrorKind::Format,
                    {"bad9.json", "model.merges[0]"});
  expect_load_error(mutated("bad10.json",
                            [](json& j) {
                              j["pre_tokenizer"] = {{"type", "Split"},
                                                    {"pattern", {{"Regex", "(unclosed"}}},
                                                    {"behavior", "Isolated"},
                                                    {"invert", false}};
                            }),
                    ErrorKind::Format, {"bad10.json", "pattern"});
  expect_load_error(mutated("bad11.json", [](json& j) { j["model"]["dropout"] = 0.1; }), ErrorKind::Format,
                    {"bad11.json", "dropout"});
  expect_load_error(mutated("bad12.json",
                            [](json& j) {
                              j["decoder"] = {{"type", "WordPiece"}};
                            }),
                    ErrorKind::Format, {"bad12.json", "decoder"});
  expect_load_error(mutated("bad13.json",
                            [](json& j) {
                              j["post_processor"] = {{"type", "TemplateProcessing"}};
                            }),
                    ErrorKind::Format, {"bad13.json", "TemplateProcessing"});
  expect_load_error(mutated("bad14.json", [](json& j) { j["model"]["vocab"].erase("Ġ"); }), ErrorKind::Format,
                    {"bad14.json", "byte"});
  expect_load_error(mutated("bad15.json", [](json& j) { j["added_tokens"][0]["id"] = "five"; }), ErrorKind::Format,
                    {"bad15.json", "added_tokens[0].id"});
  expect_load_error(mutated("bad16.json", [](json& j) { j["pre_tokenizer"] = nullptr; }), ErrorKind::Format,
                    {"bad16.json", "ByteLevel"});

  // A tokenizer_config.json naming an unknown pad token.
  const fs::path dir = temp_path("cfg_dir");
  fs::create_directories(dir);
  std::ofstream((dir / "tokenizer.json").string()) << synthetic_tokenizer(true).dump();
  std::ofstream((dir / "tokenizer_config.json").string()) << R"({"pad_token": "<nope>"})";
  expect_load_error(dir.string(), ErrorKind::Format, {"tokenizer_config.json", "<nope>"});
  std::ofstream((dir / "tokenizer_config.json").string()) << R"({"pad_token": {"content": "<pad>"}})";
  EXPECT_EQ(Tokenizer::load(dir.string()).pad_id(), 270);
}

// The in-memory entry point the fuzz target drives is the code behind load().
TEST(Tokenizer, FromJsonIsWhatLoadReads) {
  const json j = synthetic_tokenizer(true);
  const Tokenizer mem = Tokenizer::from_json(j.dump(), "mem.json", R"({"pad_token": "<pad>"})", "mem_config.json");
  EXPECT_EQ(mem.pad_id(), 270);
  const Tokenizer file = Tokenizer::load(write_tokenizer("from_json.json", j));
  for (const char* text : {"hello world", " <L>  tok café <R> x", "héllo\xff"})
    EXPECT_EQ(mem.encode(text), file.encode(text)) << text;
  try {
    Tokenizer::from_json(j.dump(), "mem.json", "[1]", "mem_config.json");
    ADD_FAILURE() << "accepted a tokenizer_config.json that is not an object";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mem_config.json"), std::string::npos) << e.what();
  }
}

// Limits on what a stranger's file can make the loader do: the id tables are as long as the largest id,
// and nesting is bounded before the tree is copied.
TEST(Tokenizer, HostileFilesHitLimitsNotMemory) {
  json j = synthetic_tokenizer(true);
  j["model"]["vocab"]["zz"] = 2147483647;
  expect_load_error(write_tokenizer("huge_id.json", j), ErrorKind::Format,
                    {"model.vocab[\"zz\"] = 2147483647 is above the limit of 2097151"});
  j = synthetic_tokenizer(true);
  json deep = json::array();
  for (int i = 0; i < 100; ++i) deep = json::array({deep});
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", deep}};
  expect_load_error(write_tokenizer("deep.json", j), ErrorKind::Format, {"deep.json", "nests deeper than 64 levels"});
}

// Where prompts come in (server, CLI, pipeline), their size and content are checked before encoding.
TEST(Tokenizer, PromptLimits) {
  EXPECT_NO_THROW(check_prompt(std::string(kMaxPromptBytes, 'a'), "prompt"));
  auto expect_invalid = [](const std::function<void()>& f, const std::string& fragment) {
    zimage::testing::expect_error(f, ErrorKind::InvalidArgument, {fragment});
  };
  expect_invalid([] { check_prompt(std::string(kMaxPromptBytes + 1, 'a'), "prompt"); },
                 "prompt is 65537 bytes, above the limit of 65536 bytes");
  expect_invalid([] { check_prompt(std::string("a\0b", 3), "negative_prompt"); }, "negative_prompt contains a NUL");
  expect_invalid([] { tokenize_prompts(qwen(), {"ok", std::string(100000, 'x')}, 16); }, "above the limit");
}

// ------------------------------------------------------------------------------------------------
// Throughput
// ------------------------------------------------------------------------------------------------

TEST(Tokenizer, Throughput) {
  // ~2 MB of mixed English, Chinese, emoji, numbers and punctuation. A fifth of the words are random
  // letters, so the word cache does not hide the cost of BPE.
  const std::vector<std::string> words = {"a",
                                          "cat",
                                          "holding",
                                          "sign",
                                          "that",
                                          "says",
                                          "hello",
                                          "world",
                                          "futuristic",
                                          "cyberpunk",
                                          "city",
                                          "night,",
                                          "neon",
                                          "lights",
                                          "reflecting",
                                          "on",
                                          "wet",
                                          "streets.",
                                          "portrait",
                                          "of",
                                          "an",
                                          "old",
                                          "fisherman",
                                          "with",
                                          "dramatic",
                                          "lighting",
                                          "photorealistic",
                                          "8k",
                                          "detailed",
                                          "一只可爱的小猫",
                                          "坐在窗台上",
                                          "阳光明媚",
                                          "山水画",
                                          "高清",
                                          "细节丰富",
                                          "😀",
                                          "🎨🚀",
                                          "👍🏽",
                                          "3.14159",
                                          "2026",
                                          "(masterpiece:1.2)",
                                          "--ar",
                                          "16:9",
                                          "don't",
                                          "it's",
                                          "\n",
                                          "café",
                                          "naïve"};
  std::string text;
  uint64_t x = 42;
  auto next = [&x] {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    return uint32_t(x >> 33);
  };
  while (text.size() < 2'000'000) {
    if (next() % 5 == 0) {
      const uint32_t len = 3 + next() % 10;
      for (uint32_t i = 0; i < len; ++i) text.push_back(char('a' + next() % 26));
    } else {
      text += words[next() % words.size()];
    }
    text.push_back(' ');
  }
  const Tokenizer t = Tokenizer::load(golden_path("tiny-zimage/tokenizer"));  // a cold cache
  const double mb = double(text.size()) / 1e6;

  auto wall0 = std::chrono::steady_clock::now();
  double cpu0 = thread_cpu_seconds();
  const auto ids = t.encode(text);
  double cpu = thread_cpu_seconds() - cpu0;
  double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  std::printf("[ perf     ] encode %.2f MB as one text: %.2f MB/s (CPU time), %.2f MB/s (wall), %zu tokens\n", mb,
              mb / cpu, mb / wall, ids.size());
  EXPECT_EQ(t.decode(ids), text);

  // The same text as ~200-byte prompts (the pipeline's case), warm cache.
  cpu0 = thread_cpu_seconds();
  size_t n_ids = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = std::min(text.size(), pos + 200);
    while (end < text.size() && text[end] != ' ') ++end;
    n_ids += t.encode(std::string_view(text).substr(pos, end - pos)).size();
    pos = end;
  }
  const double cpu_prompts = thread_cpu_seconds() - cpu0;
  std::printf("[ perf     ] encode as 200-byte prompts: %.2f MB/s (CPU time), %zu tokens\n", mb / cpu_prompts, n_ids);
#ifdef NDEBUG
  EXPECT_GE(mb / cpu, 1.0);
  EXPECT_GE(mb / cpu_prompts, 1.0);
#endif
}
