// The DiT's sinusoidal time features, on the device so the step needs no host-side tensor math:
// y[i, k] = cos(a_i * f_k), y[i, half + k] = sin(a_i * f_k), a_i = t_i * t_scale, f_k = exp(-ln(P) * k / half),
// float32 math as torch does it. t is read on the device, so a recorded graph replays with each step's t. n*dim values
// (n <= 2*batch, dim = 256): a single tiny launch, latency bound.
#include <cmath>

#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

__global__ void timestep_embedding_kernel(const float* t, float t_scale, bf16* y, int64_t n, int dim,
                                          float neg_log_period) {
  const int half = dim / 2;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * half) return;
  const int64_t i = idx / half;
  const int k = int(idx % half);
  const float freq = expf(neg_log_period * float(k) / float(half));
  const float arg = (t[i] * t_scale) * freq;
  float s, c;
  sincosf(arg, &s, &c);  // full-precision sincos: arguments reach t_scale * 1 = 1000 radians
  y[i * dim + k] = __float2bfloat16(c);
  y[i * dim + half + k] = __float2bfloat16(s);
}

}  // namespace

void timestep_embedding(const float* t, float t_scale, bf16* y, int64_t n, int dim, float max_period,
                        cudaStream_t stream) {
  const int64_t units = n * (dim / 2);
  if (units == 0) return;
  timestep_embedding_kernel<<<grid_for(units, 256), 256, 0, stream>>>(t, t_scale, y, n, dim, -logf(max_period));
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
