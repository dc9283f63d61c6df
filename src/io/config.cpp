#include "io/config.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace zimage {

Config Config::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error(ErrorKind::NotFound, path + ": config file is missing or unreadable");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

Config Config::parse(const std::string& text, const std::string& where) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded()) throw Error(ErrorKind::Format, where + ": not valid JSON");
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
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() && v.get<double>() == double(int64_t(v.get<double>()))) return int64_t(v.get<double>());
  throw type_error(where_, key, "an integer");
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
    if (!e.is_number_integer()) throw type_error(where_, key, "a list of integers");
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
