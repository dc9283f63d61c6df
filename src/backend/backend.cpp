#include "backend/backend.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstring>

#include "core/error.h"
#include "core/parallel.h"
#include "io/gguf.h"

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

// Rows in parallel (each value is computed on its own, so the result does not depend on the split).
Tensor dequantize_on_host(const StoredWeight& w) {
  ZI_ASSERT(w.data.device() == Device::Host && w.data.is_contiguous());
  Tensor out = Tensor::empty(w.shape, DType::F32);
  // Rows as the scale counts them (FP8: dim 0) or as the blocks are stored (GGUF: [rows, row bytes]).
  const int64_t rows = w.blocks() ? w.data.dim(0) : w.shape.empty() ? 1 : w.shape[0];
  const int64_t cols = rows ? out.numel() / rows : 0;
  constexpr int64_t kGrain = int64_t(1) << 16;  // values per task
  const int64_t row_grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  if (w.blocks()) {
    int64_t be = 0, bb = 0;
    ZI_ASSERT(ggml_block_layout(w.ggml_type, &be, &bb) && int64_t(w.data.nbytes()) == out.numel() / be * bb);
    const int64_t row_bytes = w.data.dim(1);
    parallel_for(rows, row_grain, [&](int64_t lo, int64_t hi) {
      ggml_dequantize(w.ggml_type, w.data.data_as<const uint8_t>() + lo * row_bytes, out.f32() + lo * cols,
                      (hi - lo) * cols);
    });
    return out;
  }
  ZI_ASSERT(w.data.shape() == w.shape);
  const Tensor scale = !w.scale.defined() || w.scale.dtype() == DType::F32 ? w.scale : w.scale.to_f32();
  ZI_ASSERT(!scale.defined() || scale.numel() == 1 || scale.numel() == rows);
  const size_t elem = dtype_size(w.data.dtype());
  parallel_for(rows, row_grain, [&](int64_t lo, int64_t hi) {
    float* v = out.f32() + lo * cols;
    convert_to_f32(w.data.dtype(), static_cast<const char*>(w.data.data()) + size_t(lo * cols) * elem, v,
                   size_t((hi - lo) * cols));
    if (!scale.defined()) return;
    for (int64_t r = lo; r < hi; ++r, v += cols) {
      const float s = scale.f32()[scale.numel() == 1 ? 0 : r];
      for (int64_t c = 0; c < cols; ++c) v[c] = v[c] * s;
    }
  });
  return out;
}

float quantize_fp8_row(const float* x, int64_t k, uint8_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
  for (int64_t i = 0; i < k; ++i) q[i] = f32_to_f8e4m3(x[i] / s);
  return s;
}

StoredWeight quantize_fp8_weight(const Tensor& values) {
  ZI_ASSERT(values.ndim() == 2 && values.dtype() == DType::F32 && values.is_contiguous());
  const int64_t rows = values.dim(0), cols = values.dim(1);
  StoredWeight w;
  w.shape = values.shape();
  w.data = Tensor::empty(w.shape, DType::F8E4M3);
  w.scale = Tensor::empty({rows}, DType::F32);
  parallel_for(rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      w.scale.f32()[r] = quantize_fp8_row(values.f32() + r * cols, cols, w.data.data_as<uint8_t>() + r * cols);
  });
  return w;
}

Tensor Backend::gather_rows(const Tensor& src, const std::vector<int32_t>& idx) {
  const int64_t rows = src.numel() / src.dim(-1);
  for (int32_t i : idx) ZI_ASSERT(i >= -1 && i < rows);
  return gather_rows(src, upload_i32(idx));
}

Tensor Backend::upload_i32(const std::vector<int32_t>& values) {
  Tensor host = Tensor::empty({int64_t(values.size())}, DType::I32);
  if (!values.empty()) std::memcpy(host.data(), values.data(), values.size() * sizeof(int32_t));
  return upload(host, DType::I32);
}

namespace {
// A graph that runs its function on every call: the backends without recorded graphs.
class EagerGraph final : public Backend::Graph {
 public:
  explicit EagerGraph(Backend::GraphFn fn) : fn_(std::move(fn)) {}
  Tensor operator()(const std::vector<Tensor>& inputs) override { return fn_(inputs); }

 private:
  Backend::GraphFn fn_;
};
}  // namespace

std::unique_ptr<Backend::Graph> Backend::make_graph(GraphFn fn) { return std::make_unique<EagerGraph>(std::move(fn)); }

Backend::Graph& GraphCache::get(const std::vector<int64_t>& key,
                                const std::function<std::unique_ptr<Backend::Graph>()>& make) {
  auto it = std::find_if(entries_.begin(), entries_.end(), [&](const auto& e) { return e.first == key; });
  if (it != entries_.end()) {
    entries_.splice(entries_.begin(), entries_, it);
  } else {
    if (entries_.size() == capacity_) entries_.pop_back();
    entries_.emplace_front(key, make());
  }
  return *entries_.front().second;
}

// Host-clock marks: right for backends whose ops complete before they return (the CPU backend).
Backend::Mark Backend::mark() { return std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now()); }

double Backend::elapsed_ms(const Mark& from, const Mark& to) {
  using TP = std::chrono::steady_clock::time_point;
  return std::chrono::duration<double, std::milli>(*static_cast<TP*>(to.get()) - *static_cast<TP*>(from.get())).count();
}

}  // namespace zimage
