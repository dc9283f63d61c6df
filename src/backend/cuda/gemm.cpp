#include "backend/cuda/gemm.h"

#include <string>

#include "core/log.h"

namespace zimage::cuda {

namespace {
constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr int kCandidates = 8;  // heuristic algorithms timed once per shape

// The configuration of a cuBLASLt algorithm, for the debug log: which kernel family, tile and stages,
// and whether it splits K (a split-K GEMM sums K in parts, so its rows can depend on the batch).
std::string algo_text(const cublasLtMatmulAlgo_t& algo) {
  auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attr) {
    uint32_t v = 0;
    size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof v, &written);
    return std::to_string(v);
  };
  return "algo " + get(CUBLASLT_ALGO_CONFIG_ID) + " tile " + get(CUBLASLT_ALGO_CONFIG_TILE_ID) + " stages " +
         get(CUBLASLT_ALGO_CONFIG_STAGES_ID) + " split-k " + get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM) + " reduction " +
         get(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) + " cluster " + get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
}

// Rewrites the candidates that split K into their one-pass form (the same tile summing all of K) and
// drops those cuBLASLt then rejects; returns how many remain. A split-K GEMM sums K in parts whose
// number depends on M, so a row's bits would depend on how many rows share the call: without it, an
// item's rows come out the same alone as in a batch (a CFG pair on one GPU matches the two branches on
// two GPUs; a server batch matches its requests alone). Costs nothing measurable at the DiT's sizes.
int without_split_k(cublasLtHandle_t lt, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                    cublasLtMatrixLayout_t c, cublasLtMatmulHeuristicResult_t* results, int found,
                    size_t max_workspace) {
  int kept = 0;
  for (int i = 0; i < found; ++i) {
    cublasLtMatmulHeuristicResult_t r = results[i];
    uint32_t splits = 1;
    size_t written = 0;
    cublasLtMatmulAlgoConfigGetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof splits, &written);
    if (splits > 1) {
      const uint32_t one = 1, none = CUBLASLT_REDUCTION_SCHEME_NONE;
      cublasLtMatmulAlgoConfigSetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof one);
      cublasLtMatmulAlgoConfigSetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none, sizeof none);
      if (cublasLtMatmulAlgoCheck(lt, desc, a, b, c, c, &r.algo, &r) != CUBLAS_STATUS_SUCCESS ||
          r.workspaceSize > max_workspace)
        continue;
    }
    results[kept++] = r;
  }
  return kept;
}
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

Gemm::Gemm(cublasLtHandle_t lt, Workspace& workspace) : lt_(lt), workspace_(workspace) {}
Gemm::~Gemm() = default;

namespace {
// The pointers that change from call to call (bias, FP8 scales) are attributes of the descriptor: set
// before every call, as the plan is shared by every call of its shape.
void set_pointers(cublasLtMatmulDesc_t desc, const void* bias, const float* x_scale, const float* w_scale) {
  if (bias) ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  if (w_scale) {  // cuBLASLt's A is the weight (N rows), B the activations (M rows)
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof w_scale));
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof x_scale));
  }
}
}  // namespace

Gemm::Plan& Gemm::plan(bool fp8, const Operands& o, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  auto key = std::make_tuple(m, n, k, o.bias != nullptr, fp8, fp8 && o.fast_accum);
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  // Column-major view: y^T [N, M] = w [N, K] (stored as K x N, transposed) * x^T [K, M].
  auto p = std::make_unique<Plan>();
  ZI_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (o.bias) {
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    cudaDataType_t bias_type = CUDA_R_16BF;
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    ZI_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
  }
  if (fp8) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof mode));
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof mode));
    const int8_t fast = o.fast_accum ? 1 : 0;
    ZI_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast));
  }
  const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  ZI_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, in, uint64_t(k), uint64_t(n), k));
  ZI_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, in, uint64_t(k), uint64_t(m), k));
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
  if (st == CUBLAS_STATUS_SUCCESS) found = without_split_k(lt_, p->desc, p->a, p->b, p->c, results, found, ws);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    throw Error(ErrorKind::Backend, std::string("cuBLASLt has no algorithm for a ") + (fp8 ? "FP8" : "bf16") +
                                        " GEMM of M=" + std::to_string(m) + " N=" + std::to_string(n) +
                                        " K=" + std::to_string(k));
  // The fastest candidate by fastest_candidate's rule, timed on the call's own buffers (the output is
  // rewritten by the real call after); the heuristic's first choice is not always the best at our shapes.
  set_pointers(p->desc, o.bias, o.x_scale, o.w_scale);
  p->algo = results[0].algo;
  if (found > 1) {
    const float alpha = 1.0f, beta = 0.0f;
    void* wsp = workspace_.get(kWorkspaceBytes);
    const int best = fastest_candidate(found, stream, [&](int i) {
      return cublasLtMatmul(lt_, p->desc, &alpha, o.w, p->a, o.x, p->b, &beta, o.y, p->c, o.y, p->c, &results[i].algo,
                            wsp, kWorkspaceBytes, stream) == CUBLAS_STATUS_SUCCESS;
    });
    if (best > 0) p->algo = results[best].algo;
  }
  log_debug(std::string(fp8 ? "FP8" : "bf16") + " GEMM M=" + std::to_string(m) + " N=" + std::to_string(n) +
            " K=" + std::to_string(k) + ": " + algo_text(p->algo));
  return *plans_.emplace(key, std::move(p)).first->second;
}

void Gemm::run(bool fp8, const Operands& o, int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  Plan& p = plan(fp8, o, m, n, k, stream);
  set_pointers(p.desc, o.bias, o.x_scale, o.w_scale);
  const float alpha = 1.0f, beta = 0.0f;
  void* ws = workspace_.get(kWorkspaceBytes);
  ZI_CUBLAS_CHECK(cublasLtMatmul(lt_, p.desc, &alpha, o.w, p.a, o.x, p.b, &beta, o.y, p.c, o.y, p.c, &p.algo, ws,
                                 kWorkspaceBytes, stream));
}

void Gemm::linear(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t m, int64_t n, int64_t k,
                  cudaStream_t stream) {
  run(false, {x, w, nullptr, nullptr, bias, y, false}, m, n, k, stream);
}

void Gemm::linear_fp8(const uint8_t* x, const float* x_scale, const uint8_t* w, const float* w_scale, const bf16* bias,
                      bf16* y, int64_t m, int64_t n, int64_t k, cudaStream_t stream, bool fast_accum) {
  ZI_CHECK(k % 16 == 0 && n % 16 == 0, ErrorKind::Internal,
           "FP8 GEMM needs K and N multiples of 16, got N=" + std::to_string(n) + " K=" + std::to_string(k));
  run(true, {x, w, x_scale, w_scale, bias, y, fast_accum}, m, n, k, stream);
}

}  // namespace zimage::cuda
