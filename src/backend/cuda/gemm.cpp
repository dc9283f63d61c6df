#include "backend/cuda/gemm.h"

namespace zimage::cuda {

namespace {
constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr int kCandidates = 8;  // heuristic algorithms timed once per shape
}  // namespace

struct Gemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

// The fastest candidate by fastest_candidate's rule, timed on the call's own buffers (the output is
// rewritten by the real call after); the heuristic's first choice is not always the best at our shapes.
cublasLtMatmulAlgo_t Gemm::fastest(Plan& p, const cublasLtMatmulHeuristicResult_t* results, int found, const bf16* x,
                                   const bf16* w, bf16* y, cudaStream_t stream) {
  if (found == 1) return results[0].algo;
  const float alpha = 1.0f, beta = 0.0f;
  void* ws = workspace_.get(kWorkspaceBytes, stream);
  const int best = fastest_candidate(found, stream, [&](int i) {
    return cublasLtMatmul(lt_, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &results[i].algo, ws,
                          kWorkspaceBytes, stream) == CUBLAS_STATUS_SUCCESS;
  });
  return results[best < 0 ? 0 : best].algo;
}

Gemm::Gemm(cublasLtHandle_t lt, Workspace& workspace) : lt_(lt), workspace_(workspace) {}
Gemm::~Gemm() = default;

void Gemm::linear(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t m, int64_t n, int64_t k,
                  cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  auto key = std::make_tuple(m, n, k, bias != nullptr);
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    // Column-major view: y^T [N, M] = w [N, K] (stored as K x N, transposed) * x^T [K, M].
    auto p = std::make_unique<Plan>();
    ZI_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (bias) {
      cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      cudaDataType_t bias_type = CUDA_R_16BF;
      ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
      ZI_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
    }
    ZI_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, uint64_t(k), uint64_t(n), k));
    ZI_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, uint64_t(k), uint64_t(m), k));
    ZI_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->c, CUDA_R_16BF, uint64_t(n), uint64_t(m), n));
    cublasLtMatmulPreference_t pref;
    ZI_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = kWorkspaceBytes;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int found = 0;
    cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(lt_, p->desc, p->a, p->b, p->c, p->c, pref, kCandidates, results, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
      throw Error(ErrorKind::Backend, "cuBLASLt has no algorithm for a bf16 GEMM of M=" + std::to_string(m) +
                                          " N=" + std::to_string(n) + " K=" + std::to_string(k));
    if (bias) ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    p->algo = fastest(*p, results, found, x, w, y, stream);
    it = plans_.emplace(key, std::move(p)).first;
  }
  Plan& p = *it->second;
  if (bias) ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  const float alpha = 1.0f, beta = 0.0f;
  void* ws = workspace_.get(kWorkspaceBytes, stream);
  ZI_CUBLAS_CHECK(cublasLtMatmul(lt_, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, ws,
                                 kWorkspaceBytes, stream));
}

}  // namespace zimage::cuda
