#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace zimage {

static LogLevel level_from_env() {
  const char* e = std::getenv("ZIMAGE_LOG");
  if (!e) return LogLevel::Info;
  if (!std::strcmp(e, "error")) return LogLevel::Error;
  if (!std::strcmp(e, "warn")) return LogLevel::Warn;
  if (!std::strcmp(e, "debug")) return LogLevel::Debug;
  return LogLevel::Info;
}

static std::atomic<int> g_level{int(level_from_env())};

LogLevel log_level() { return LogLevel(g_level.load()); }
void set_log_level(LogLevel level) { g_level.store(int(level)); }

void log(LogLevel level, const std::string& message) {
  if (int(level) > g_level.load()) return;
  static std::mutex mu;
  static const char* tags[] = {"error", "warning", "info", "debug"};
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "zimage: %s: %s\n", tags[int(level)], message.c_str());
}

}  // namespace zimage
