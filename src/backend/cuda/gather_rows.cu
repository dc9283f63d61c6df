// Row gather: out[i] = src[idx[i]], idx[i] = -1 -> a zero row. Builds padded sequences, concatenations
// and embedding lookups in one pass (CPU reference: CpuBackend::gather_rows).
//
// A pure copy: reads rows*row_bytes (+ 4*rows for idx) and writes rows*row_bytes bytes; memory bound,
// chasing ~4.2 TB/s on H200. Rows are 128 bytes (64 bf16) to 7680 bytes (3840 bf16) in the engine.
#include <cstdint>

#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row

// src, out: rows of `units` copy units (16, 8, 4 or 2 bytes, the widest that the row size and the
// pointers' alignment allow). Warp threadIdx.y of block b copies row b*8 + threadIdx.y, lane by lane.
template <typename Unit>
__global__ void gather_rows_kernel(const Unit* __restrict__ src, const int32_t* __restrict__ idx,
                                   Unit* __restrict__ out, int64_t rows, int64_t units) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int32_t s = idx[row];
  Unit* dst = out + row * units;
  if (s < 0) {
    const Unit zero{};
    for (int64_t u = threadIdx.x; u < units; u += kWarp) dst[u] = zero;
    return;
  }
  const Unit* from = src + int64_t(s) * units;
#pragma unroll 4
  for (int64_t u = threadIdx.x; u < units; u += kWarp) dst[u] = from[u];
}

template <typename Unit>
void launch(const void* src, const int32_t* idx, void* out, int64_t rows, int64_t row_bytes, cudaStream_t stream) {
  const dim3 block(kWarp, kRowsPerBlock);
  gather_rows_kernel<Unit><<<grid_for(rows, kRowsPerBlock), block, 0, stream>>>(
      static_cast<const Unit*>(src), idx, static_cast<Unit*>(out), rows, row_bytes / int64_t(sizeof(Unit)));
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace

void gather_rows(const void* src, const int32_t* idx, void* out, int64_t rows, int64_t row_bytes, cudaStream_t stream) {
  if (rows <= 0 || row_bytes <= 0) return;
  ZI_ASSERT(row_bytes % 2 == 0);
  // The copy unit must divide the row size and the alignment of both base pointers (then every row
  // start is aligned too).
  const uintptr_t a = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out) | uintptr_t(row_bytes);
  if (a % 16 == 0)
    launch<uint4>(src, idx, out, rows, row_bytes, stream);
  else if (a % 8 == 0)
    launch<uint2>(src, idx, out, rows, row_bytes, stream);
  else if (a % 4 == 0)
    launch<uint32_t>(src, idx, out, rows, row_bytes, stream);
  else
    launch<uint16_t>(src, idx, out, rows, row_bytes, stream);
}

}  // namespace zimage::cuda
