#include "model/rope.h"

#include <cmath>

#include "core/error.h"

namespace zimage {

RopeTables rope_tables_1d(const std::vector<int64_t>& positions, int head_dim, double theta) {
  int half = head_dim / 2;
  int64_t rows = int64_t(positions.size());
  RopeTables t{Tensor::empty({rows, half}, DType::F32), Tensor::empty({rows, half}, DType::F32)};
  // As transformers computes it: inv_freq in float32, angle = float32(position * inv_freq).
  std::vector<float> inv(static_cast<size_t>(half));
  for (int m = 0; m < half; ++m) inv[size_t(m)] = float(1.0 / std::pow(theta, double(2 * m) / head_dim));
  for (int64_t r = 0; r < rows; ++r)
    for (int m = 0; m < half; ++m) {
      float angle = float(positions[size_t(r)]) * inv[size_t(m)];
      t.cos.f32()[r * half + m] = std::cos(angle);
      t.sin.f32()[r * half + m] = std::sin(angle);
    }
  return t;
}

RopeTables rope_tables_3d(const std::vector<std::array<int64_t, 3>>& positions, const std::vector<int64_t>& axes_dims,
                          double theta) {
  ZI_ASSERT(axes_dims.size() == 3);
  int64_t half = 0;
  for (int64_t d : axes_dims) half += d / 2;
  int64_t rows = int64_t(positions.size());
  RopeTables t{Tensor::empty({rows, half}, DType::F32), Tensor::empty({rows, half}, DType::F32)};
  // diffusers' RopeEmbedder: freqs = 1 / theta^(arange(0, d, 2) / d) in float64, angles = outer(pos, freqs)
  // rounded to float32, then complex64 polar(1, angle): cos/sin of the float32 angle.
  for (int64_t r = 0; r < rows; ++r) {
    int64_t col = 0;
    for (size_t a = 0; a < 3; ++a) {
      int64_t d = axes_dims[a];
      for (int64_t m = 0; m < d / 2; ++m, ++col) {
        double freq = 1.0 / std::pow(theta, double(2 * m) / double(d));
        float angle = float(double(positions[size_t(r)][a]) * freq);
        t.cos.f32()[r * half + col] = float(std::cos(double(angle)));
        t.sin.f32()[r * half + col] = float(std::sin(double(angle)));
      }
    }
  }
  return t;
}

}  // namespace zimage
