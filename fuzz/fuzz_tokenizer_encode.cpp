// Input: arbitrary bytes (invalid UTF-8 included) as a prompt, through the real Qwen3 tokenizer of
// assets/ loaded once. Properties, beyond not crashing:
//   - decode(encode(x)) is a fixed point: encoding it again gives back the same text (the header of
//     tokenizer.h: decode(encode(x)) == x for valid UTF-8 already in NFC; invalid bytes become U+FFFD);
//   - for ASCII x (invariant under NFC), decode(encode(x)) == x exactly;
//   - tokenize_prompts keeps the first max_len ids of the templated prompt and pads the rest.
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_common.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  static const Tokenizer t = Tokenizer::load(ZIMAGE_ASSETS_DIR "/tokenizer.json");
  const std::string_view x(reinterpret_cast<const char*>(data), size);
  fuzz::expect_clean_errors([&] {
    const std::vector<int32_t> ids = t.encode(x);
    const std::string y = t.decode(ids);
    FUZZ_CHECK(t.decode(t.encode(y)) == y);
    if (std::all_of(x.begin(), x.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; }))
      FUZZ_CHECK(y == x);

    const int64_t max_len = 32;
    const TokenizedBatch batch = tokenize_prompts(t, {std::string(x)}, max_len);  // may refuse x: NUL, too long
    const std::vector<int32_t> full = t.encode(zimage_chat_template(x));
    const int64_t n = std::min<int64_t>(int64_t(full.size()), max_len);
    FUZZ_CHECK(batch.lengths[0] == n && batch.truncated[0] == (int64_t(full.size()) > max_len));
    const int64_t* row = batch.input_ids.data_as<int64_t>();
    for (int64_t i = 0; i < max_len; ++i) FUZZ_CHECK(row[i] == (i < n ? full[size_t(i)] : t.pad_id()));
  });
  return 0;
}
