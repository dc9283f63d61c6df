// Softmax attention on the GPU (see attention.h). The fast path is cuDNN's unified SDPA forward operation
// (CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, cuDNN >= 9.13) through the plain backend API, one operation
// in an operation graph:
//   Q [B, Hq, S, d], K and V [B, Hkv, S, d]  read in place from qkv [B, S, (Hq + 2 Hkv) d]: strides
//                                             (S W, d, W, 1) with W = (Hq + 2 Hkv) d; K, V start Hq d and
//                                             (Hq + Hkv) d elements into the buffer
//   O [B, Hq, S, d]                           written as out [B, S, Hq, d]: strides (S Hq d, d, Hq d, 1)
//   scale                                     a by-value float tensor
//   SEQ_LEN_Q, SEQ_LEN_KV [B, 1, 1, 1] int32  only when some key_len[b] < S (cuDNN >= 9.15): query lengths
//                                             are all S so that every output row is computed and written
// (the layout verified on the H200 by shared/tools/cudnn_sdpa_probe.cu). The unified operation of this cuDNN
// has no causal mask (a mask subgraph arrives in 9.21), so causal attention -- the text encoder -- always runs
// the flash_attention kernel, as does any shape the heuristics or the plan finalization refuse. Non-causal
// heads wider than 256 (the VAE's d = 512) skip cuDNN for the GEMM attention below, measured faster. Plans,
// or the decision to fall back, are cached per shape.
#include "backend/cuda/attention.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/log.h"

namespace zimage::cuda {

namespace {

// Non-causal heads wider than this take the GEMM attention. cuDNN 9.19 accepts the VAE's d = 512 but runs it
// slowly: on the H200 the VAE's one attention at 2048^2 (65536 tokens, 8.8 TFLOP) took ~100 ms through
// cuDNN and ~17 ms as two GEMMs per query chunk (VAE decode 199 -> 116 ms; at 1024^2 28.3 -> 22.5 ms).
constexpr int kMaxFusedHeadDim = 256;
// Float32 scores per chunk of queries in the GEMM attention (and half as much again for the probabilities).
constexpr int64_t kScoreBytes = int64_t(128) << 20;

// Owns one cuDNN backend descriptor.
class Descriptor {
 public:
  Descriptor() = default;
  explicit Descriptor(cudnnBackendDescriptor_t d) : d_(d) {}
  Descriptor(Descriptor&& o) noexcept : d_(o.d_) { o.d_ = nullptr; }
  Descriptor& operator=(Descriptor&& o) noexcept {
    std::swap(d_, o.d_);
    return *this;
  }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  ~Descriptor() {
    if (d_) cudnnBackendDestroyDescriptor(d_);
  }
  cudnnBackendDescriptor_t get() const { return d_; }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

// Unique ids of the tensors in the graph and in the variant pack.
enum Uid : int64_t { kQ = 1, kK, kV, kO, kScale, kSeqQ, kSeqKV };

constexpr int64_t kAlignment = 16;  // bytes; run() checks the buffers, d % 8 == 0 keeps the head offsets aligned

bool is_allocation_failure(cudnnStatus_t s) {
  return s == CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED ||
         s == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED;
}

}  // namespace

struct Attention::Plan {
  bool cudnn = false;                       // false: flash_attention runs this shape
  std::vector<Descriptor> descriptors;      // what the execution plans were built from, kept alive with them
  cudnnBackendDescriptor_t exec = nullptr;  // the execution plan (owned by `descriptors`)
  int64_t workspace_bytes = 0;
  // Every engine config of the heuristics that finalized, until the first run times them and keeps the
  // fastest in `exec` (the heuristics' first choice is not always the fastest: measure, as for GEMMs).
  struct Candidate {
    cudnnBackendDescriptor_t exec;
    int64_t workspace_bytes;
    int64_t engine;  // cuDNN's global engine index, for the log
  };
  std::vector<Candidate> candidates;
  int32_t* lengths = nullptr;  // device [2 * batch]: query lengths, then key lengths

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    descriptors.clear();
    if (lengths) cudaFree(lengths);  // no throw from a destructor; an error here has nowhere to go
  }
};

namespace {

// Builds the cuDNN graph for one shape. A cuDNN call that fails here means "this shape is not supported" (the
// fallback kernel takes it), not an engine error: the first failure is recorded and the rest of the build skipped.
// Only allocation failures are raised.
class PlanBuilder {
 public:
  explicit PlanBuilder(Attention::Plan& plan) : plan_(plan) {}

  bool ok() const { return status_ == CUDNN_STATUS_SUCCESS; }
  std::string failure() const { return std::string(cudnnGetErrorString(status_)) + " at " + failed_at_; }

  cudnnBackendDescriptor_t make(cudnnBackendDescriptorType_t type, const char* what) {
    if (!ok()) return nullptr;
    cudnnBackendDescriptor_t d = nullptr;
    if (!check(cudnnBackendCreateDescriptor(type, &d), what)) return nullptr;
    plan_.descriptors.emplace_back(d);
    return d;
  }
  void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
           int64_t count, const void* value, const char* what) {
    if (ok()) check(cudnnBackendSetAttribute(d, name, type, count, value), what);
  }
  void set_desc(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, cudnnBackendDescriptor_t value,
                const char* what) {
    set(d, name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value, what);
  }
  void finalize(cudnnBackendDescriptor_t d, const char* what) {
    if (ok()) check(cudnnBackendFinalize(d), what);
  }
  bool check(cudnnStatus_t s, const char* what) {
    if (s == CUDNN_STATUS_SUCCESS) return true;
    if (is_allocation_failure(s)) throw_cuda_error(what, cudnnGetErrorString(s), __FILE__, __LINE__, /*oom=*/true);
    if (ok()) {
      status_ = s;
      failed_at_ = what;
    }
    return false;
  }

  // A 4-d tensor with the given dims and strides (elements).
  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t type, const int64_t (&dims)[4],
                                  const int64_t (&strides)[4], bool by_value, const char* what) {
    cudnnBackendDescriptor_t t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, what);
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, what);
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type, what);
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims, what);
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides, what);
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &kAlignment, what);
    if (by_value) {
      const bool yes = true;
      set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &yes, what);
    }
    finalize(t, what);
    return t;
  }

 private:
  Attention::Plan& plan_;
  cudnnStatus_t status_ = CUDNN_STATUS_SUCCESS;
  std::string failed_at_;
};

// Fills `plan` with a cuDNN execution plan for the shape, or returns why cuDNN does not take it.
std::string build_cudnn_plan(Attention::Plan& plan, cudnnHandle_t handle, int64_t batch, int64_t seq, int hq, int hkv,
                             int d, bool padded) {
  PlanBuilder pb(plan);
  const int64_t width = int64_t(hq + 2 * hkv) * d;  // packed qkv row, elements
  const int64_t q_dims[4] = {batch, hq, seq, d}, kv_dims[4] = {batch, hkv, seq, d};
  const int64_t in_strides[4] = {seq * width, d, width, 1};
  const int64_t out_strides[4] = {seq * int64_t(hq) * d, d, int64_t(hq) * d, 1};
  const int64_t one[4] = {1, 1, 1, 1}, lens_dims[4] = {batch, 1, 1, 1};

  cudnnBackendDescriptor_t q = pb.tensor(kQ, CUDNN_DATA_BFLOAT16, q_dims, in_strides, false, "Q tensor");
  cudnnBackendDescriptor_t k = pb.tensor(kK, CUDNN_DATA_BFLOAT16, kv_dims, in_strides, false, "K tensor");
  cudnnBackendDescriptor_t v = pb.tensor(kV, CUDNN_DATA_BFLOAT16, kv_dims, in_strides, false, "V tensor");
  cudnnBackendDescriptor_t o = pb.tensor(kO, CUDNN_DATA_BFLOAT16, q_dims, out_strides, false, "O tensor");
  cudnnBackendDescriptor_t scale = pb.tensor(kScale, CUDNN_DATA_FLOAT, one, one, true, "scale tensor");

  cudnnBackendDescriptor_t op = pb.make(CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR, "SDPA operation");
  pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, q, "SDPA Q");
  pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, k, "SDPA K");
  pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, v, "SDPA V");
  pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, o, "SDPA O");
  pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC, scale, "SDPA scale");
  if (padded) {
    cudnnBackendDescriptor_t sq = pb.tensor(kSeqQ, CUDNN_DATA_INT32, lens_dims, one, false, "query lengths");
    cudnnBackendDescriptor_t skv = pb.tensor(kSeqKV, CUDNN_DATA_INT32, lens_dims, one, false, "key lengths");
    pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_SEQ_LEN_QDESC, sq, "SDPA query lengths");
    pb.set_desc(op, CUDNN_ATTR_OPERATION_SDPA_FWD_SEQ_LEN_KVDESC, skv, "SDPA key lengths");
  }
  pb.finalize(op, "SDPA operation finalize");

  cudnnBackendDescriptor_t graph = pb.make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
  pb.set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle, "graph handle");
  pb.set_desc(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, op, "graph operations");
  pb.finalize(graph, "operation graph finalize");

  cudnnBackendDescriptor_t heur = pb.make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "heuristics");
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  pb.set_desc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph, "heuristics graph");
  pb.set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, "heuristics mode");
  pb.finalize(heur, "heuristics finalize");
  int64_t n_configs = 0;
  if (pb.ok())
    pb.check(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &n_configs,
                                      nullptr),
             "heuristics result count");
  if (!pb.ok()) return pb.failure();
  if (n_configs <= 0) return "the heuristics offered no engine";

  std::vector<cudnnBackendDescriptor_t> configs;
  for (int64_t i = 0; i < n_configs; ++i) configs.push_back(pb.make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "config"));
  int64_t got = 0;
  if (pb.ok())
    pb.check(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, n_configs,
                                      &got, configs.data()),
             "heuristics results");
  if (!pb.ok()) return pb.failure();

  // Every config that finalizes into an execution plan is a candidate; the first run times them.
  std::string last_refusal = "no engine config finalized";
  for (int64_t i = 0; i < got; ++i) {
    cudnnBackendDescriptor_t candidate = nullptr;
    cudnnStatus_t s = cudnnBackendCreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &candidate);
    if (is_allocation_failure(s))
      throw_cuda_error("cudnnBackendCreateDescriptor(execution plan)", cudnnGetErrorString(s), __FILE__, __LINE__,
                       true);
    if (s != CUDNN_STATUS_SUCCESS) return std::string(cudnnGetErrorString(s)) + " at execution plan";
    Descriptor owned(candidate);
    cudnnBackendDescriptor_t config = configs[size_t(i)];
    s = cudnnBackendSetAttribute(candidate, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    if (s == CUDNN_STATUS_SUCCESS)
      s = cudnnBackendSetAttribute(candidate, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                                   &config);
    if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(candidate);
    if (is_allocation_failure(s))
      throw_cuda_error("cudnnBackendFinalize(execution plan)", cudnnGetErrorString(s), __FILE__, __LINE__, true);
    if (s != CUDNN_STATUS_SUCCESS) {
      last_refusal = std::string(cudnnGetErrorString(s)) + " at execution plan finalize (config " + std::to_string(i) +
                     " of " + std::to_string(got) + ")";
      continue;
    }
    Attention::Plan::Candidate c{candidate, 0, -1};
    int64_t count = 0;
    if (cudnnBackendGetAttribute(candidate, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &count,
                                 &c.workspace_bytes) != CUDNN_STATUS_SUCCESS)
      continue;
    cudnnBackendDescriptor_t engine = nullptr;
    if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) == CUDNN_STATUS_SUCCESS) {
      Descriptor owned_engine(engine);
      if (cudnnBackendGetAttribute(config, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &count,
                                   &engine) == CUDNN_STATUS_SUCCESS)
        cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &count, &c.engine);
    }
    plan.candidates.push_back(c);
    plan.descriptors.push_back(std::move(owned));
  }
  if (plan.candidates.empty()) return last_refusal;
  plan.exec = plan.candidates[0].exec;
  plan.workspace_bytes = plan.candidates[0].workspace_bytes;
  if (plan.candidates.size() == 1) plan.candidates.clear();
  plan.cudnn = true;
  return "";
}

std::string shape_text(int64_t batch, int64_t seq, int hq, int hkv, int d, bool causal, bool padded) {
  return "batch " + std::to_string(batch) + ", seq " + std::to_string(seq) + ", heads " + std::to_string(hq) + "/" +
         std::to_string(hkv) + ", d " + std::to_string(d) + (causal ? ", causal" : "") +
         (padded ? ", key padding" : "");
}

std::unique_ptr<Attention::Plan> make_plan(cudnnHandle_t handle, int64_t batch, int64_t seq, int hq, int hkv, int d,
                                           bool causal, bool padded) {
  auto plan = std::make_unique<Attention::Plan>();
  ZI_CUDA_CHECK(cudaMalloc(&plan->lengths, size_t(2 * batch) * sizeof(int32_t)));

  const size_t version = cudnnGetVersion();
  std::string why;
  if (causal)
    why = "the unified SDPA operation has no causal mask before cuDNN 9.21";
  else if (version < 91300)
    why = "cuDNN " + std::to_string(version) + " has no unified SDPA operation (needs 9.13)";
  else if (padded && version < 91500)
    why = "cuDNN " + std::to_string(version) + " has no SDPA sequence lengths (needs 9.15)";
  else
    why = build_cudnn_plan(*plan, handle, batch, seq, hq, hkv, d, padded);

  if (!plan->cudnn) {
    plan->descriptors.clear();
    plan->exec = nullptr;
    const std::string msg = "attention (" + shape_text(batch, seq, hq, hkv, d, causal, padded) +
                            "): flash_attention kernel, not cuDNN: " + why;
    if (causal)
      log_debug(msg);
    else
      log_info(msg);
  } else {
    log_debug("attention (" + shape_text(batch, seq, hq, hkv, d, causal, padded) + "): cuDNN SDPA, workspace " +
              std::to_string(plan->workspace_bytes) + " bytes");
  }
  return plan;
}

}  // namespace

Attention::Attention(cudnnHandle_t cudnn, Workspace& workspace) : cudnn_(cudnn), workspace_(workspace) {}

Attention::~Attention() {
  if (cublas_) cublasDestroy(cublas_);
}

void Attention::run(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d, float scale,
                    bool causal, const std::vector<int>& key_len, cudaStream_t stream) {
  ZI_ASSERT(batch >= 1 && seq >= 1 && hq >= 1 && hkv >= 1 && hq % hkv == 0);
  ZI_ASSERT(d >= 8 && d <= 512 && d % 8 == 0);
  ZI_ASSERT(int64_t(key_len.size()) == batch);
  ZI_ASSERT(reinterpret_cast<uintptr_t>(qkv) % kAlignment == 0 && reinterpret_cast<uintptr_t>(out) % kAlignment == 0);
  bool padded = false;
  for (int len : key_len) {
    ZI_ASSERT(len >= 1 && len <= seq);
    padded = padded || len != seq;
  }
  // Non-causal attention takes the key lengths whenever cuDNN can (9.15+), padded keys or not: the
  // graph without them rounds differently, and an item must get the same bits alone as in a batch
  // beside a longer item (a CFG pair whose captions pad to different lengths, a server batch).
  static const bool lengths_supported = cudnnGetVersion() >= 91500;
  if (!causal && lengths_supported) padded = true;

  if (!causal && d > kMaxFusedHeadDim) {
    run_gemm_attention(qkv, out, batch, seq, hq, hkv, d, scale, key_len, stream);
    return;
  }

  auto key = std::make_tuple(batch, seq, hq, hkv, d, causal, padded);
  auto it = plans_.find(key);
  if (it == plans_.end()) it = plans_.emplace(key, make_plan(cudnn_, batch, seq, hq, hkv, d, causal, padded)).first;
  Plan& plan = *it->second;
  int32_t* q_len = plan.lengths;
  int32_t* kv_len = plan.lengths + batch;

  if (!plan.cudnn) {
    write_sequence_lengths(key_len, seq, nullptr, kv_len, stream);
    flash_attention(qkv, out, batch, seq, hq, hkv, d, scale, causal, kv_len, stream);
    return;
  }

  if (padded) write_sequence_lengths(key_len, seq, q_len, kv_len, stream);
  ZI_CUDNN_CHECK(cudnnSetStream(cudnn_, stream));
  float scale_value = scale;  // by value: read when the plan is executed
  bf16* base = const_cast<bf16*>(qkv);
  const int64_t uids[7] = {kQ, kK, kV, kO, kScale, kSeqQ, kSeqKV};
  void* const pointers[7] = {base,  base + int64_t(hq) * d, base + int64_t(hq + hkv) * d, out, &scale_value, q_len,
                             kv_len};
  const int64_t n = padded ? 7 : 5;
  if (!plan.candidates.empty())
    choose_fastest(plan, uids, pointers, n, shape_text(batch, seq, hq, hkv, d, causal, padded), stream);
  void* workspace = plan.workspace_bytes > 0 ? workspace_.get(size_t(plan.workspace_bytes)) : nullptr;
  ZI_CUDNN_CHECK(cudnn_execute(cudnn_, plan.exec, uids, pointers, n, workspace));
}

void Attention::run_gemm_attention(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d,
                                   float scale, const std::vector<int>& key_len, cudaStream_t stream) {
  if (!cublas_) ZI_CUBLAS_CHECK(cublasCreate(&cublas_));
  ZI_CUBLAS_CHECK(cublasSetStream(cublas_, stream));
  const int64_t width = int64_t(hq + 2 * hkv) * d, out_width = int64_t(hq) * d;
  // Queries per chunk: float32 scores of at most kScoreBytes (plus their bf16 probabilities), in multiples of
  // 64 rows. The VAE at 1024^2 (16384 keys): 2048 queries per chunk; at 2048^2 (65536 keys): 512.
  const int64_t chunk = std::min(seq, std::max<int64_t>(64, kScoreBytes / (4 * seq) / 64 * 64));
  const size_t score_bytes = size_t(chunk * seq) * 4, prob_bytes = size_t(chunk * seq) * 2;
  char* scratch = static_cast<char*>(workspace_.get(score_bytes + prob_bytes));
  float* scores = reinterpret_cast<float*>(scratch);
  bf16* probs = reinterpret_cast<bf16*>(scratch + score_bytes);
  const float one = 1.0f, zero = 0.0f;
  for (int64_t b = 0; b < batch; ++b)
    for (int h = 0; h < hq; ++h) {
      const int kv = h / (hq / hkv);
      const bf16* q = qkv + b * seq * width + int64_t(h) * d;
      const bf16* k = qkv + b * seq * width + int64_t(hq + kv) * d;
      const bf16* v = qkv + b * seq * width + int64_t(hq + hkv + kv) * d;
      const int keys = key_len[size_t(b)];
      for (int64_t q0 = 0; q0 < seq; q0 += chunk) {
        const int rows = int(std::min(chunk, seq - q0));
        // Column-major views of the row-major operands: S^T [keys, rows] = K [keys, d] . Q^T [d, rows].
        ZI_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, keys, rows, d, &scale, k, CUDA_R_16BF,
                                     int(width), q + q0 * width, CUDA_R_16BF, int(width), &zero, scores, CUDA_R_32F,
                                     keys, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        softmax_rows_to_bf16(scores, probs, rows, keys, keys, stream);
        // O^T [d, rows] = V^T [d, keys] . P^T [keys, rows], written into the output rows of this head.
        ZI_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_N, CUBLAS_OP_N, d, rows, keys, &one, v, CUDA_R_16BF, int(width),
                                     probs, CUDA_R_16BF, keys, &zero, out + (b * seq + q0) * out_width + int64_t(h) * d,
                                     CUDA_R_16BF, int(out_width), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
    }
}

void Attention::choose_fastest(Plan& plan, const int64_t* uids, void* const* pointers, int64_t n,
                               const std::string& shape, cudaStream_t stream) {
  int64_t most = 0;
  for (const auto& c : plan.candidates) most = std::max(most, c.workspace_bytes);
  void* workspace = most > 0 ? workspace_.get(size_t(most)) : nullptr;
  std::vector<float> times;
  const int best = fastest_candidate(
      int(plan.candidates.size()), stream,
      [&](int i) {
        return cudnn_execute(cudnn_, plan.candidates[size_t(i)].exec, uids, pointers, n, workspace) ==
               CUDNN_STATUS_SUCCESS;
      },
      &times);
  std::string report;
  for (size_t i = 0; i < times.size(); ++i)
    report += " engine " + std::to_string(plan.candidates[i].engine) + ": " +
              (times[i] < 0 ? std::string("failed") : std::to_string(times[i]) + " ms") + ";";
  if (best >= 0) {
    plan.exec = plan.candidates[size_t(best)].exec;
    plan.workspace_bytes = plan.candidates[size_t(best)].workspace_bytes;
  }
  plan.candidates.clear();
  log_info("attention (" + shape + "): cuDNN candidates timed:" + report + " kept candidate " +
           (best >= 0 ? std::to_string(best) : std::string("0 (none ran)")));
}

}  // namespace zimage::cuda
