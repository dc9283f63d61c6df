#include "backend/backend.h"

#include <chrono>

namespace zimage {

// Host-clock marks: right for backends whose ops complete before they return (the CPU backend).
Backend::Mark Backend::mark() { return std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now()); }

double Backend::elapsed_ms(const Mark& from, const Mark& to) {
  using TP = std::chrono::steady_clock::time_point;
  return std::chrono::duration<double, std::milli>(*static_cast<TP*>(to.get()) - *static_cast<TP*>(from.get())).count();
}

}  // namespace zimage
