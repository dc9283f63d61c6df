// Byte-level BPE tokenizer (the Qwen2/Qwen3 family) read from a Hugging Face `tokenizer.json`, and the
// Z-Image prompt template and batching that turn prompts into text-encoder inputs.
//
// Encoding follows the `tokenizers` library step by step, so ids match the reference exactly:
//   1. added tokens (<|im_start|>, <|endoftext|>, ...) are cut out of the raw text and emitted as their ids;
//   2. each remaining stretch is normalized as the file declares (Qwen: NFC);
//   3. the pre-tokenizer splits it into words (Qwen: one Split regex, then ByteLevel);
//   4. each word's bytes are mapped to the GPT-2 byte alphabet and merged by BPE rank.
// Invalid UTF-8 in the input is replaced, one U+FFFD per maximal ill-formed subpart (the policy of
// Python's `bytes.decode("utf-8", "replace")`), before anything else: that is what the reference
// tokenizes when a caller hands it such bytes decoded as a Python str, and it keeps the regex engine on
// valid UTF-8. decode(encode(x)) == x holds for every valid UTF-8 x that is already in the normal form
// the file declares (NFC for Qwen: almost all text as typed); otherwise decode returns the normalized x.
//
// A Tokenizer is immutable after load() apart from an internal word cache, and safe to use from several
// threads at once. Copies share the loaded tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"

namespace zimage {

class Tokenizer {
 public:
  // `tokenizer_dir_or_json`: a folder holding tokenizer.json (and optionally tokenizer_config.json), or
  // the tokenizer.json file itself (tokenizer_config.json is then looked for beside it). The pad token
  // is tokenizer_config.json's "pad_token"; without one, "<|endoftext|>" when the vocabulary has it
  // (the default of transformers' Qwen2Tokenizer). Throws NotFound for a missing file, Format for a
  // malformed one or one declaring a component this engine does not implement.
  static Tokenizer load(const std::string& tokenizer_dir_or_json);
  // The same from the files' contents: `source` and `config_source` name them in messages; an empty
  // `config_json` stands for no tokenizer_config.json.
  static Tokenizer from_json(std::string_view tokenizer_json, const std::string& source,
                             std::string_view config_json = {}, const std::string& config_source = {});

  // Ids of `text`; no special tokens are added, but added tokens written in the text are recognised.
  std::vector<int32_t> encode(std::string_view text) const;
  // Text of `ids` (added tokens included, as their content). Byte sequences that do not form valid
  // UTF-8 (a multi-byte character split across a cut) come out as U+FFFD, as the reference does.
  // Throws InvalidArgument for an id outside the vocabulary.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t pad_id() const;                          // throws NotFound when no pad token is known
  int32_t token_id(std::string_view token) const;  // vocabulary or added token; throws NotFound
  // Number of ids in use: the BPE vocabulary plus the added tokens (151,669 for Qwen3, the reference's
  // len(tokenizer)); the text encoder's embedding table may be larger (151,936), its tail never emitted.
  size_t vocab_size() const;
  const std::string& source() const;  // the tokenizer.json path, for messages

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// The Qwen3 chat template as the Z-Image pipeline applies it (one user turn, generation prompt added,
// thinking enabled, which adds nothing): "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n".
std::string zimage_chat_template(std::string_view prompt);

struct TokenizedBatch {
  Tensor input_ids;              // int64 [B, max_len], right-padded with pad_id
  Tensor attention_mask;         // int64 [B, max_len], 1 for real tokens, 0 for padding
  std::vector<int64_t> lengths;  // real tokens per prompt
  std::vector<bool> truncated;   // true where the templated prompt had more than max_len tokens
};

// The longest prompt accepted, in bytes. The text encoder reads at most max_sequence_length tokens
// (4096 at most), which 64 KiB holds several times over; a longer prompt would only cost encoding time.
constexpr size_t kMaxPromptBytes = size_t(64) << 10;

// Checks a prompt where it comes in (a request, a flag, a file): at most kMaxPromptBytes, and no NUL
// character, which the PNG text chunks recording the prompt cannot hold. Error(InvalidArgument)
// naming `what` ("prompt", "negative_prompt") otherwise.
void check_prompt(std::string_view prompt, const std::string& what);

// Templates each prompt, encodes it, keeps its first max_len tokens and right-pads to max_len: what the
// diffusers Z-Image pipeline gets from the tokenizer with padding="max_length", truncation=True.
// Throws InvalidArgument when max_len < 1 or a prompt fails check_prompt.
TokenizedBatch tokenize_prompts(const Tokenizer& tokenizer, const std::vector<std::string>& prompts, int64_t max_len);

}  // namespace zimage
