// Softmax attention on the GPU over a packed QKV projection, as Backend::attention defines it.
// The fast path is cuDNN's fused SDPA through the graph (backend) API, reading q, k, v in place from
// the packed buffer, with per-item key lengths (key padding) and an optional causal mask; execution
// plans are built once per shape and cached. Where cuDNN refuses a shape (the causal text encoder), a
// FlashAttention-style kernel of our own runs instead. Non-causal heads wider than 256 (the VAE's single
// 512-wide head over every latent pixel) run as two cuBLAS GEMMs per chunk of queries around a row softmax,
// several times faster there than cuDNN.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

class Attention {
 public:
  Attention(cudnnHandle_t cudnn, Workspace& workspace);
  ~Attention();
  // qkv [batch, seq, (hq + 2*hkv) * d] bf16 -> out [batch, seq, hq * d] bf16. key_len[b] in [1, seq].
  void run(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d, float scale, bool causal,
           const std::vector<int>& key_len, cudaStream_t stream);

  struct Plan;  // a cached cuDNN execution plan, or a marker that the fallback kernel handles the shape

 private:
  // Times each candidate plan of a new shape on the call's buffers and keeps the fastest.
  void choose_fastest(Plan& plan, const int64_t* uids, void* const* pointers, int64_t n, const std::string& shape,
                      cudaStream_t stream);

  // Non-causal heads wider than 256 (the VAE's single head of 512 over every latent pixel): per chunk of
  // queries, S = scale Q K^T in float32, P = softmax(S) in bf16, O = P V, with cuBLAS GEMMs.
  void run_gemm_attention(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d, float scale,
                          const std::vector<int>& key_len, cudaStream_t stream);

  cudnnHandle_t cudnn_;
  cublasHandle_t cublas_ = nullptr;  // created on the first GEMM attention
  Workspace& workspace_;
  std::map<std::tuple<int64_t, int64_t, int, int, int, bool, bool>, std::unique_ptr<Plan>> plans_;
};

// The fallback kernel (flash_attention.cu): online softmax over key tiles, float32 accumulation, any
// head dim that is a multiple of 8 up to 512, GQA, key lengths and causal mask. key_len is a device
// array of `batch` int32.
void flash_attention(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d, float scale,
                     bool causal, const int32_t* key_len, cudaStream_t stream);

// Ring attention's partial (Backend::attention_with_lse): queries of q_rows [batch, q_seq, 3*heads*d], keys and
// values of kv_rows [batch, kv_seq, 3*heads*d] -> out [batch, q_seq, heads*d] and lse [batch, q_seq, heads] float32.
void flash_attention_lse(const bf16* q_rows, const bf16* kv_rows, bf16* out, float* lse, int64_t batch, int64_t q_seq,
                         int64_t kv_seq, int heads, int d, float scale, const int32_t* key_len, cudaStream_t stream);

// p[r, j] = bf16(softmax_j(s[r, j])) for j < n, each of `rows` rows (float32 s and bf16 p share the row
// stride ld): the softmax between the two GEMMs of the GEMM attention.
void softmax_rows_to_bf16(const float* s, bf16* p, int64_t rows, int64_t n, int64_t ld, cudaStream_t stream);

// Writes q_len[i] = seq (q_len may be null) and kv_len[i] = key_len[i] on `stream` (device int32 arrays of
// key_len.size()). The values travel as kernel arguments, so the write is stream-ordered and is captured with its
// values in a CUDA graph (a host-to-device copy from pageable memory would be neither).
void write_sequence_lengths(const std::vector<int>& key_len, int64_t seq, int32_t* q_len, int32_t* kv_len,
                            cudaStream_t stream);

}  // namespace zimage::cuda
