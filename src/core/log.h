// Minimal leveled logging to stderr. The level comes from ZIMAGE_LOG (error|warn|info|debug), default info.
#pragma once

#include <string>

namespace zimage {

enum class LogLevel { Error = 0, Warn = 1, Info = 2, Debug = 3 };

LogLevel log_level();
void set_log_level(LogLevel level);
void log(LogLevel level, const std::string& message);

inline void log_warn(const std::string& m) { log(LogLevel::Warn, m); }
inline void log_info(const std::string& m) { log(LogLevel::Info, m); }
inline void log_debug(const std::string& m) { log(LogLevel::Debug, m); }

}  // namespace zimage
