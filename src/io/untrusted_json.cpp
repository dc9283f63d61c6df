#include "io/untrusted_json.h"

#include <algorithm>

#include "core/error.h"

namespace zimage {

namespace {

// The deepest nesting of [ and { outside strings, stopping once past `limit`. Exact for valid JSON;
// for invalid JSON the parser's error comes next anyway.
int nesting_depth(std::string_view text, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size() && deepest <= limit; ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;  // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

}  // namespace

nlohmann::json parse_untrusted_json(std::string_view text, const std::string& where) {
  if (nesting_depth(text, kMaxJsonDepth) > kMaxJsonDepth)
    throw Error(ErrorKind::Format, where + " nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::Format, where + " is not valid JSON: " + e.what());
  }
}

}  // namespace zimage
