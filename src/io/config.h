// A component's config.json with typed, checked accessors: a missing or mistyped key is an Error
// that names the file and the key. All model sizes come from here; nothing about them is hard-coded.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace zimage {

class Config {
 public:
  Config() = default;
  Config(nlohmann::json j, std::string where) : j_(std::move(j)), where_(std::move(where)) {}
  static Config load(const std::string& path);  // NotFound / Format errors name the file
  static Config parse(const std::string& text, const std::string& where);

  bool has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }
  int64_t integer(const std::string& key) const;
  double number(const std::string& key) const;
  bool boolean(const std::string& key) const;
  std::string string(const std::string& key) const;
  std::vector<int64_t> integers(const std::string& key) const;
  // integer(key) within [lo, hi]: model sizes read from a stranger's file are bounded before anything
  // is computed or allocated from them. Outside the range is a Format error naming it.
  int64_t integer_in(const std::string& key, int64_t lo, int64_t hi) const;
  int64_t integer_or(const std::string& key, int64_t fallback) const { return has(key) ? integer(key) : fallback; }
  int64_t integer_in_or(const std::string& key, int64_t fallback, int64_t lo, int64_t hi) const {
    return has(key) ? integer_in(key, lo, hi) : fallback;
  }
  double number_or(const std::string& key, double fallback) const { return has(key) ? number(key) : fallback; }
  bool boolean_or(const std::string& key, bool fallback) const { return has(key) ? boolean(key) : fallback; }
  Config child(const std::string& key) const;  // a nested object

  const nlohmann::json& json() const { return j_; }
  const std::string& where() const { return where_; }

 private:
  const nlohmann::json& at(const std::string& key) const;
  nlohmann::json j_ = nlohmann::json::object();
  std::string where_;
};

}  // namespace zimage
