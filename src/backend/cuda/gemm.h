// bf16 GEMMs through cuBLASLt with float32 accumulation: y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]) in
// row-major terms, the bias fused as a cuBLASLt epilogue. Per shape, the heuristic's candidates are
// timed once and the fastest is cached. FLOPs 2*M*N*K; at the DiT's shapes cuBLASLt reaches 712-824 TFLOP/s on
// an H200 (CUDA_NOTES.md).
#pragma once

#include <map>
#include <memory>
#include <tuple>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

class Gemm {
 public:
  Gemm(cublasLtHandle_t lt, Workspace& workspace);
  ~Gemm();
  void linear(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t m, int64_t n, int64_t k,
              cudaStream_t stream);

  struct Plan;

 private:
  cublasLtMatmulAlgo_t fastest(Plan& p, const cublasLtMatmulHeuristicResult_t* results, int found, const bf16* x,
                               const bf16* w, bf16* y, cudaStream_t stream);
  cublasLtHandle_t lt_;
  Workspace& workspace_;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool>, std::unique_ptr<Plan>> plans_;
};

}  // namespace zimage::cuda
