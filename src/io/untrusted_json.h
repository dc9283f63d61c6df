// JSON read from strangers: model configs, safetensors headers, checkpoint indexes, tokenizer files,
// request bodies. nlohmann's parser is iterative and safe at any depth, but copying, printing and
// comparing a value recurse: a document nested a million levels deep (a few MB of '[') would overflow
// the stack later, far from where it was read. So nesting is bounded when the text comes in.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace zimage {

// Real files nest a handful of levels (a tokenizer.json: 5).
constexpr int kMaxJsonDepth = 64;

// Parses `text`. Invalid JSON or nesting deeper than kMaxJsonDepth is an Error(Format):
// "<where> is not valid JSON: <the parser's message>" or "<where> nests deeper than 64 levels".
nlohmann::json parse_untrusted_json(std::string_view text, const std::string& where);

}  // namespace zimage
