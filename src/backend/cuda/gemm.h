// GEMMs through cuBLASLt with float32 accumulation: y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]) in row-major
// terms, bf16 out, the bias fused as a cuBLASLt epilogue. Per shape, the heuristic's candidates are timed once
// and the fastest is cached. FLOPs 2*M*N*K.
//   linear: bf16 x and w; 712-824 TFLOP/s at the DiT's shapes on an H200 (CUDA_NOTES.md).
//   linear_fp8: e4m3 x and w (W8A8) with per-row scales of x (M floats) and per-output-channel scales of w
//     (N floats) applied by cuBLASLt's outer-vector scaling: y = s_x[m] s_w[n] sum_k x w. 1.5-1.75x the bf16
//     rate per GEMM (CUDA_NOTES.md); K and N must be multiples of 16. fast_accum: cuBLASLt's FP8 fast
//     accumulation (partial sums kept in the tensor cores' reduced precision instead of promoted to float32
//     every few k-blocks); the backend uses kFp8FastAccumulation.
#pragma once

#include <map>
#include <memory>
#include <tuple>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

// Off until the op test and the pipeline accuracy on the H200 say it is safe and bench_fp8_gemm says
// it is faster.
inline constexpr bool kFp8FastAccumulation = false;

class Gemm {
 public:
  Gemm(cublasLtHandle_t lt, Workspace& workspace);
  ~Gemm();
  void linear(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t m, int64_t n, int64_t k,
              cudaStream_t stream);
  void linear_fp8(const uint8_t* x, const float* x_scale, const uint8_t* w, const float* w_scale, const bf16* bias,
                  bf16* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream,
                  bool fast_accum = kFp8FastAccumulation);

  struct Plan;

 private:
  struct Operands {
    const void *x, *w;
    const float *x_scale, *w_scale;  // FP8 only
    const bf16* bias;
    bf16* y;
    bool fast_accum;  // FP8 only
  };
  void run(bool fp8, const Operands& o, int64_t m, int64_t n, int64_t k, cudaStream_t stream);
  Plan& plan(bool fp8, const Operands& o, int64_t m, int64_t n, int64_t k, cudaStream_t stream);
  cublasLtHandle_t lt_;
  Workspace& workspace_;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool, bool>, std::unique_ptr<Plan>> plans_;  // m, n, k, bias, fp8, fast_accum
};

}  // namespace zimage::cuda
