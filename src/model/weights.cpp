#include "model/weights.h"

#include <cmath>

#include "core/error.h"
#include "core/parallel.h"

namespace zimage {

Tensor CheckpointWeights::get(const std::string& name, const Shape& shape) const {
  const std::string stored = prefix_ + name;
  if (!ckpt_.has(stored)) throw Error(ErrorKind::NotFound, ckpt_.description() + ": missing tensor '" + stored + "'");
  Tensor t = ckpt_.get(stored);
  if (t.shape() != shape)
    throw Error(ErrorKind::Format, ckpt_.description() + ": tensor '" + stored + "' has shape " + shape_str(t.shape()) +
                                       ", the config implies " + shape_str(shape));
  return t;
}

namespace {

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Tensor SyntheticWeights::get(const std::string& name, const Shape& shape) const {
  Tensor t = Tensor::empty(shape, DType::BF16);
  auto* out = t.data_as<uint16_t>();
  int64_t n = t.numel();
  bool is_vector = shape.size() == 1;
  bool norm_weight = is_vector && ends_with(name, "weight");
  if (norm_weight) {  // RMSNorm / GroupNorm / q-k norm scales
    for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(1.0f);
    return t;
  }
  float stddev;
  if (is_vector) stddev = 0.02f;  // biases
  else if (name.find("pad_token") != std::string::npos || name.find("embed_tokens") != std::string::npos)
    stddev = 1.0f;
  else stddev = 1.0f / std::sqrt(float(n / shape[0]));  // fan_in = product of the non-output dims
  uint64_t base = fnv1a(name) ^ (seed_ * 0x9e3779b97f4a7c15ull);
  // Chunks of 4096 values each get their own counter-derived stream, so generation is parallel
  // and still independent of the thread count.
  const int64_t kChunk = 4096;
  parallel_for((n + kChunk - 1) / kChunk, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      uint64_t state = base + uint64_t(c) * 0x632be59bd9b4e019ull;
      int64_t e = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < e; i += 2) {
        // Box-Muller on two 24-bit uniforms in (0, 1].
        double u1 = (double(splitmix64(state) >> 40) + 1.0) / 16777216.0;
        double u2 = double(splitmix64(state) >> 40) / 16777216.0;
        double r = std::sqrt(-2.0 * std::log(u1)) * stddev;
        out[i] = f32_to_bf16(float(r * std::cos(6.283185307179586 * u2)));
        if (i + 1 < e) out[i + 1] = f32_to_bf16(float(r * std::sin(6.283185307179586 * u2)));
      }
    }
  });
  return t;
}

}  // namespace zimage
