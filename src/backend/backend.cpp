#include "backend/backend.h"

#include <chrono>
#include <cstring>

#include "core/error.h"

namespace zimage {

Tensor Backend::upload_rows(const std::vector<Tensor>& parts, DType dtype) {
  ZI_ASSERT(!parts.empty());
  const int64_t k = parts[0].dim(-1);
  int64_t rows = 0;
  bool same = true;  // stack in the parts' dtype when they agree (no precision change), else in float32
  for (const auto& p : parts) {
    ZI_ASSERT(p.device() == Device::Host && p.ndim() == 2 && p.dim(1) == k);
    rows += p.dim(0);
    same = same && p.dtype() == parts[0].dtype();
  }
  Tensor packed = Tensor::empty({rows, k}, same ? parts[0].dtype() : DType::F32);
  char* dst = static_cast<char*>(packed.data());
  for (const auto& p : parts) {
    Tensor src = same ? (p.is_contiguous() ? p : p.clone()) : p.to_f32();
    std::memcpy(dst, src.data(), src.nbytes());
    dst += src.nbytes();
  }
  return upload(packed, dtype);
}

// Host-clock marks: right for backends whose ops complete before they return (the CPU backend).
Backend::Mark Backend::mark() { return std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now()); }

double Backend::elapsed_ms(const Mark& from, const Mark& to) {
  using TP = std::chrono::steady_clock::time_point;
  return std::chrono::duration<double, std::milli>(*static_cast<TP*>(to.get()) - *static_cast<TP*>(from.get())).count();
}

}  // namespace zimage
