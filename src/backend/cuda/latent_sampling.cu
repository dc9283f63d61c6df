// Latents from images on the device (image-to-image and inpainting): the VAE posterior's draw taken
// into the DiT's latent space, and the flow-match noising / inpaint blend that runs after every step.
// CPU references: CpuBackend::gaussian_sample and CpuBackend::flow_match_blend_ (cpu_backend.cpp).
//
// Both are memory bound and small (a 1024^2 image has 16 x 128 x 128 = 262k latents: ~3 MiB moved,
// about a microsecond at H200's ~4.2 TB/s, so launch latency dominates); one thread per element, float32
// math in the same order as the reference.
#include <cstdint>

#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }

// out = (mean + exp(0.5 * logvar) * eps - shift) * scale. Reads 2-4 + 4 bytes, writes 4 per element.
template <typename T>
__global__ void gaussian_sample_kernel(const T* __restrict__ mean, const T* __restrict__ logvar,
                                       const float* __restrict__ eps, float* __restrict__ out, int64_t n, float shift,
                                       float scale) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float std_dev = expf(0.5f * load(logvar, i));
  out[i] = (load(mean, i) + std_dev * eps[i] - shift) * scale;
}

// x [b, c, hw]: n = sigma*noise + (1 - sigma)*init; x = mask ? (1 - m)*n + m*x : n, m = mask[b, hw].
// Reads 12 (16 with a mask: x and m too) and writes 4 bytes per element.
__global__ void flow_match_blend_kernel(float* __restrict__ x, const float* __restrict__ init,
                                        const float* __restrict__ noise, const float* __restrict__ mask, int64_t n,
                                        int64_t c, int64_t hw, float sigma) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  // No fused multiply-add: the same roundings as the reference (and as torch's eager ops).
  const float noised = __fadd_rn(__fmul_rn(sigma, noise[i]), __fmul_rn(1.0f - sigma, init[i]));
  if (!mask) {
    x[i] = noised;
    return;
  }
  const float m = mask[(i / (c * hw)) * hw + i % hw];
  x[i] = __fadd_rn(__fmul_rn(1.0f - m, noised), __fmul_rn(m, x[i]));
}

}  // namespace

void gaussian_sample_bf16(const bf16* mean, const bf16* logvar, const float* eps, float* out, int64_t n, float shift,
                          float scale, cudaStream_t stream) {
  if (n <= 0) return;
  gaussian_sample_kernel<bf16><<<grid_for(n, kBlock), kBlock, 0, stream>>>(mean, logvar, eps, out, n, shift, scale);
  ZI_CUDA_LAUNCH_CHECK();
}

void gaussian_sample_f32(const float* mean, const float* logvar, const float* eps, float* out, int64_t n, float shift,
                         float scale, cudaStream_t stream) {
  if (n <= 0) return;
  gaussian_sample_kernel<float><<<grid_for(n, kBlock), kBlock, 0, stream>>>(mean, logvar, eps, out, n, shift, scale);
  ZI_CUDA_LAUNCH_CHECK();
}

void flow_match_blend(float* x, const float* init, const float* noise, const float* mask, int64_t b, int64_t c,
                      int64_t hw, float sigma, cudaStream_t stream) {
  const int64_t n = b * c * hw;
  if (n <= 0) return;
  flow_match_blend_kernel<<<grid_for(n, kBlock), kBlock, 0, stream>>>(x, init, noise, mask, n, c, hw, sigma);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
