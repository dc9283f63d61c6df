// The two small kernels of the convolution path (conv2d.cpp): an explicit zero pad for the padding that
// cuDNN's symmetric convolution cannot express, and a bias add for the shapes where cuDNN offers no engine
// with the bias fused. Both are memory-bound copies: 16-byte accesses when the channel count allows.
#include <cstdint>

#include "backend/cuda/conv2d.h"

namespace zimage::cuda {

namespace {

constexpr int kBlock = 256;
constexpr unsigned kMaxBlocks = 1u << 20;  // grid-stride beyond this

// V elements of type T move as one access: T = uint4 (8 bf16) or uint16_t (1 bf16, by its bits).
// y [n, hp, wp, cv] from x [n, h, w, cv] (cv in units of T), hp = h + top + bottom, wp = w + left + right.
template <typename T>
__global__ void pad_nhwc_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total, int64_t h, int64_t w,
                                int64_t cv, int64_t hp, int64_t wp, int top, int left) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t ch = i % cv, t = i / cv;
    int64_t ox = t % wp;
    t /= wp;
    int64_t oy = t % hp, img = t / hp;
    int64_t sy = oy - top, sx = ox - left;
    T v{};
    if (sy >= 0 && sy < h && sx >= 0 && sx < w) v = x[((img * h + sy) * w + sx) * cv + ch];
    y[i] = v;
  }
}

// y [pixels, o] += bias [o], 8 channels per thread; float math, one rounding to bf16.
__global__ void add_bias_vec8_kernel(uint4* __restrict__ y, const uint4* __restrict__ bias, int64_t total, int64_t ov) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    uint4 v = y[i];
    const uint4 b = bias[i % ov];
    __nv_bfloat162* vp = reinterpret_cast<__nv_bfloat162*>(&v);
    const __nv_bfloat162* bp = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float2 a = __bfloat1622float2(vp[k]), c = __bfloat1622float2(bp[k]);
      vp[k] = __floats2bfloat162_rn(a.x + c.x, a.y + c.y);
    }
    y[i] = v;
  }
}

__global__ void add_bias_kernel(bf16* __restrict__ y, const bf16* __restrict__ bias, int64_t total, int64_t o) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(bias[i % o]));
}

unsigned blocks_for(int64_t total) {
  unsigned b = grid_for(total, kBlock);
  return b < kMaxBlocks ? b : kMaxBlocks;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void pad_nhwc(const bf16* x, bf16* y, int64_t n, int64_t h, int64_t w, int64_t c, int top, int bottom, int left,
              int right, cudaStream_t stream) {
  const int64_t hp = h + top + bottom, wp = w + left + right;
  if (n == 0 || hp == 0 || wp == 0 || c == 0) return;
  if (c % 8 == 0 && aligned16(x) && aligned16(y)) {
    const int64_t cv = c / 8, total = n * hp * wp * cv;
    pad_nhwc_kernel<uint4><<<blocks_for(total), kBlock, 0, stream>>>(
        reinterpret_cast<const uint4*>(x), reinterpret_cast<uint4*>(y), total, h, w, cv, hp, wp, top, left);
  } else {
    const int64_t total = n * hp * wp * c;
    pad_nhwc_kernel<uint16_t><<<blocks_for(total), kBlock, 0, stream>>>(
        reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(y), total, h, w, c, hp, wp, top, left);
  }
  ZI_CUDA_LAUNCH_CHECK();
}

void add_bias_nhwc(bf16* y, const bf16* bias, int64_t pixels, int64_t o, cudaStream_t stream) {
  if (pixels == 0 || o == 0) return;
  if (o % 8 == 0 && aligned16(y) && aligned16(bias)) {
    const int64_t ov = o / 8, total = pixels * ov;
    add_bias_vec8_kernel<<<blocks_for(total), kBlock, 0, stream>>>(reinterpret_cast<uint4*>(y),
                                                                   reinterpret_cast<const uint4*>(bias), total, ov);
  } else {
    const int64_t total = pixels * o;
    add_bias_kernel<<<blocks_for(total), kBlock, 0, stream>>>(y, bias, total, o);
  }
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
