// Image layout kernels (bf16, pure copies): NCHW <-> NHWC transposes and the VAE's nearest-neighbour 2x
// upsample in NHWC. CPU references: CpuBackend::nchw_to_nhwc, nhwc_to_nchw, upsample_nearest2x.
//
// Memory bound, chasing ~4.2 TB/s on H200; bytes moved are stated above each kernel. Elements are moved
// as raw 16-bit words (no conversion), so the copies are bit exact.
#include <cstdint>

#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ int64_t thread_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }

// ---- batched transpose: x [batch, R, C] -> y [batch, C, R], y[b][c][r] = x[b][r][c] ----
// nchw_to_nhwc is R = c, C = h*w; nhwc_to_nchw is R = h*w, C = c.
// Reads 2*batch*R*C + writes 2*batch*R*C bytes; memory bound.

// Tiled: a 32x32 tile is read with coalesced rows of x and written with coalesced rows of y through
// shared memory; the +1 column of padding keeps the column reads free of bank conflicts (row stride 66
// bytes puts the 32 lanes in 32 distinct banks). Block 32x8 threads, each moving 4 elements per phase;
// one block per tile, tiles numbered (b, tile row, tile col) over a 1-D grid.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

__global__ void transpose_tiled_kernel(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t r_dim,
                                       int64_t c_dim, int64_t tiles_r, int64_t tiles_c) {
  __shared__ uint16_t tile[kTile][kTile + 1];
  const int64_t t = blockIdx.x;
  const int64_t b = t / (tiles_r * tiles_c), rem = t % (tiles_r * tiles_c);
  const int64_t r0 = (rem / tiles_c) * kTile, c0 = (rem % tiles_c) * kTile;
  const uint16_t* xb = x + b * r_dim * c_dim;
  uint16_t* yb = y + b * r_dim * c_dim;
  // tile[k][lane] = x[b][r0 + k][c0 + lane]
  for (int k = threadIdx.y; k < kTile; k += kTileRows) {
    const int64_t r = r0 + k, c = c0 + threadIdx.x;
    if (r < r_dim && c < c_dim) tile[k][threadIdx.x] = xb[r * c_dim + c];
  }
  __syncthreads();
  // y[b][c0 + k][r0 + lane] = x[b][r0 + lane][c0 + k] = tile[lane][k]
  for (int k = threadIdx.y; k < kTile; k += kTileRows) {
    const int64_t c = c0 + k, r = r0 + threadIdx.x;
    if (c < c_dim && r < r_dim) yb[c * r_dim + r] = tile[threadIdx.x][k];
  }
}

// Direct: one thread per output element, for a short side (the engine's transposes are of latents with
// 16 channels and RGB images with 3, where a 32-wide tile would idle most threads). Writes are coalesced;
// a warp's reads cover a few short runs of x that the caches merge.
__global__ void transpose_direct_kernel(const uint16_t* __restrict__ x, uint16_t* __restrict__ y, int64_t r_dim,
                                        int64_t c_dim, int64_t total) {
  const int64_t o = thread_index();  // o = (b*C + c)*R + r
  if (o >= total) return;
  const int64_t r = o % r_dim, t = o / r_dim;
  const int64_t c = t % c_dim, b = t / c_dim;
  y[o] = x[(b * r_dim + r) * c_dim + c];
}

void transpose(const bf16* x, bf16* y, int64_t batch, int64_t r_dim, int64_t c_dim, cudaStream_t stream) {
  if (batch <= 0 || r_dim <= 0 || c_dim <= 0) return;
  const auto* xs = reinterpret_cast<const uint16_t*>(x);
  auto* ys = reinterpret_cast<uint16_t*>(y);
  if (r_dim >= kTile && c_dim >= kTile) {
    const int64_t tiles_r = (r_dim + kTile - 1) / kTile, tiles_c = (c_dim + kTile - 1) / kTile;
    const int64_t blocks = batch * tiles_r * tiles_c;
    transpose_tiled_kernel<<<unsigned(blocks), dim3(kTile, kTileRows), 0, stream>>>(xs, ys, r_dim, c_dim, tiles_r,
                                                                                    tiles_c);
  } else {
    const int64_t total = batch * r_dim * c_dim;
    transpose_direct_kernel<<<grid_for(total, kBlock), kBlock, 0, stream>>>(xs, ys, r_dim, c_dim, total);
  }
  ZI_CUDA_LAUNCH_CHECK();
}

// ---- upsample_nearest2x: x [n, h, w, c] -> y [n, 2h, 2w, c], y[i][oy][ox][ch] = x[i][oy/2][ox/2][ch] ----
// Each thread reads one copy unit (16, 8, 4 or 2 bytes of a pixel's channels) and writes it to the 2x2
// output pixels. Input pixel q = (i*h + iy)*w + ix; its outputs are rows 2*(i*h + iy) + dy of width 2w,
// columns 2*ix + dx. Reads 2*n*h*w*c + writes 8*n*h*w*c bytes; memory bound.
template <typename Unit>
__global__ void upsample_nearest2x_kernel(const Unit* __restrict__ x, Unit* __restrict__ y, int64_t w,
                                          int64_t units_per_pixel, int64_t total_units) {
  const int64_t g = thread_index();  // g = q*units_per_pixel + u
  if (g >= total_units) return;
  const int64_t q = g / units_per_pixel, u = g % units_per_pixel;
  const int64_t row = q / w, ix = q % w;  // row = i*h + iy
  const Unit v = x[g];
#pragma unroll
  for (int dy = 0; dy < 2; ++dy) {
    const int64_t base = ((2 * row + dy) * 2 * w + 2 * ix) * units_per_pixel + u;
    y[base] = v;                    // dx = 0
    y[base + units_per_pixel] = v;  // dx = 1
  }
}

template <typename Unit>
void launch_upsample(const bf16* x, bf16* y, int64_t pixels, int64_t w, int64_t c, cudaStream_t stream) {
  const int64_t upp = c * int64_t(sizeof(bf16)) / int64_t(sizeof(Unit));
  const int64_t total = pixels * upp;
  upsample_nearest2x_kernel<Unit><<<grid_for(total, kBlock), kBlock, 0, stream>>>(
      reinterpret_cast<const Unit*>(x), reinterpret_cast<Unit*>(y), w, upp, total);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace

void nchw_to_nhwc(const bf16* x, bf16* y, int64_t n, int64_t c, int64_t h, int64_t w, cudaStream_t stream) {
  transpose(x, y, n, c, h * w, stream);
}

void nhwc_to_nchw(const bf16* x, bf16* y, int64_t n, int64_t h, int64_t w, int64_t c, cudaStream_t stream) {
  transpose(x, y, n, h * w, c, stream);
}

void upsample_nearest2x(const bf16* x, bf16* y, int64_t n, int64_t h, int64_t w, int64_t c, cudaStream_t stream) {
  if (n <= 0 || h <= 0 || w <= 0 || c <= 0) return;
  const int64_t pixels = n * h * w;
  // The unit must divide a pixel's bytes and the alignment of both pointers.
  const uintptr_t a = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) | uintptr_t(2 * c);
  if (a % 16 == 0)
    launch_upsample<uint4>(x, y, pixels, w, c, stream);
  else if (a % 8 == 0)
    launch_upsample<uint2>(x, y, pixels, w, c, stream);
  else if (a % 4 == 0)
    launch_upsample<uint32_t>(x, y, pixels, w, c, stream);
  else
    launch_upsample<uint16_t>(x, y, pixels, w, c, stream);
}

}  // namespace zimage::cuda
