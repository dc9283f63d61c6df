// Input: a tokenizer.json, optionally followed by a NUL byte and a tokenizer_config.json (JSON text
// cannot hold a raw NUL, so the split is unambiguous). Loaded by Tokenizer::from_json, the code behind
// Tokenizer::load; a tokenizer that loads then encodes the input itself (whatever it is: the
// normalizers, pre-tokenizer regexes, added tokens and merges it declares all run), and every id it
// returns must decode.
#include <cstdint>
#include <string_view>

#include "fuzz_common.h"
#include "text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace zimage;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string_view tokenizer_json = input.substr(0, nul);
  const std::string_view config_json = nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);
  fuzz::expect_clean_errors([&] {
    const Tokenizer t =
        Tokenizer::from_json(tokenizer_json, "fuzz/tokenizer.json", config_json, "fuzz/tokenizer_config.json");
    for (std::string_view text : {input, std::string_view("Hello, wörld! 你好 <|im_start|> 123  \n")}) {
      const std::vector<int32_t> ids = t.encode(text);
      for (int32_t id : ids) FUZZ_CHECK(id >= 0);
      try {
        t.decode(ids);
      } catch (const Error& e) {
        std::fprintf(stderr, "fuzz: decode refused ids that encode returned: %s\n", e.what());
        std::abort();
      }
    }
  });
  return 0;
}
