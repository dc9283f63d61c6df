// Rotary position tables, computed once per request on the host and uploaded: cos and sin [rows, D/2]
// for the positions of every row of a (flattened) batch.
#pragma once

#include <array>
#include <vector>

#include "core/tensor.h"

namespace zimage {

struct RopeTables {
  Tensor cos, sin;  // host float32 [rows, D/2]
};

// Qwen3: 1D positions, frequencies theta^(-2m/D) for m < D/2 (GPT-NeoX half-split rotation).
RopeTables rope_tables_1d(const std::vector<int64_t>& positions, int head_dim, double theta);

// Z-Image DiT: 3 axes (frame, height, width) with axes_dims d_a; axis a's D_a/2 frequencies
// theta^(-2m/d_a) applied to that axis' position id, axes concatenated along the head dim.
RopeTables rope_tables_3d(const std::vector<std::array<int64_t, 3>>& positions, const std::vector<int64_t>& axes_dims,
                          double theta);

}  // namespace zimage
