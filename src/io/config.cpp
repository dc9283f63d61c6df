#include "io/config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "io/untrusted_json.h"

namespace zimage {

Config Config::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(ErrorKind::NotFound, path + ": config file is missing or unreadable");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

Config Config::parse(const std::string& text, const std::string& where) {
  nlohmann::json j = parse_untrusted_json(text, where);
  if (!j.is_object()) throw Error(ErrorKind::Format, where + ": expected a JSON object");
  return Config(std::move(j), where);
}

const nlohmann::json& Config::at(const std::string& key) const {
  if (!has(key)) throw Error(ErrorKind::NotFound, where_ + ": missing config key '" + key + "'");
  return j_[key];
}

static Error type_error(const std::string& where, const std::string& key, const char* what) {
  return Error(ErrorKind::Format, where + ": config key '" + key + "' must be " + what);
}

int64_t Config::integer(const std::string& key) const {
  const auto& v = at(key);
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw type_error(where_, key, "an integer below 2^63");
  if (v.is_number_integer()) return v.get<int64_t>();
  // Python writes some integers as floats (64.0). The range check comes first: converting a double
  // outside int64's range is undefined behaviour.
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d >= -0x1p63 && d < 0x1p63 && d == std::trunc(d)) return int64_t(d);
  }
  throw type_error(where_, key, "an integer");
}

int64_t Config::integer_in(const std::string& key, int64_t lo, int64_t hi) const {
  const int64_t v = integer(key);
  if (v < lo || v > hi)
    throw Error(ErrorKind::Format, where_ + ": config key '" + key + "' is " + std::to_string(v) + ", outside " +
                                       std::to_string(lo) + " to " + std::to_string(hi));
  return v;
}

double Config::number(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_number()) throw type_error(where_, key, "a number");
  return v.get<double>();
}

bool Config::boolean(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_boolean()) throw type_error(where_, key, "true or false");
  return v.get<bool>();
}

std::string Config::string(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_string()) throw type_error(where_, key, "a string");
  return v.get<std::string>();
}

std::vector<int64_t> Config::integers(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_array()) throw type_error(where_, key, "a list of integers");
  std::vector<int64_t> out;
  for (const auto& e : v) {
    if (!e.is_number_integer() ||
        (e.is_number_unsigned() && e.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())))
      throw type_error(where_, key, "a list of integers");
    out.push_back(e.get<int64_t>());
  }
  return out;
}

Config Config::child(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_object()) throw type_error(where_, key, "an object");
  return Config(v, where_ + ":" + key);
}

}  // namespace zimage
