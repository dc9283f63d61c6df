// 2-D convolution on the GPU in NHWC bf16 (the VAE's layout), through cuDNN with float32 accumulation;
// the algorithm is chosen once per shape and cached. Bias is added in the same call.
#pragma once

#include <map>
#include <memory>
#include <tuple>

#include "backend/backend.h"
#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

class Conv2d {
 public:
  Conv2d(cudnnHandle_t cudnn, Workspace& workspace);
  ~Conv2d();
  // x [n, h, w, c], weight [o, kh, kw, c], bias [o] (may be null) -> y [n, ho, wo, o].
  void run(const bf16* x, int64_t n, int64_t h, int64_t w, int64_t c, const bf16* weight, int64_t o, int64_t kh,
           int64_t kw, const bf16* bias, const Conv2dParams& p, bf16* y, cudaStream_t stream);

  struct Plan;

 private:
  cudnnHandle_t cudnn_;
  Workspace& workspace_;
  // Per cuDNN call: batch, h, w (after any explicit padding), c, o, kh, kw; stride, symmetric pad h, pad w,
  // pointer alignment in bytes (<= 16); bias.
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int, bool>,
           std::unique_ptr<Plan>>
      plans_;
};

// The convolution path's own kernels (conv2d_kernels.cu), asynchronous on `stream`.
// y [n, h + top + bottom, w + left + right, c] = x [n, h, w, c] inside a zero border.
void pad_nhwc(const bf16* x, bf16* y, int64_t n, int64_t h, int64_t w, int64_t c, int top, int bottom, int left,
              int right, cudaStream_t stream);
// y [pixels, o] += bias [o] in float32, rounded once to bf16.
void add_bias_nhwc(bf16* y, const bf16* bias, int64_t pixels, int64_t o, cudaStream_t stream);

}  // namespace zimage::cuda
