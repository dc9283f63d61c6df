// Softmax attention on the GPU over a packed QKV projection, as Backend::attention defines it.
// The fast path is cuDNN's fused SDPA through the graph (backend) API, reading q, k, v in place from
// the packed buffer, with per-item key lengths (key padding) and an optional causal mask; execution
// plans are built once per shape and cached. Where cuDNN refuses a shape (head dim above its limit,
// e.g. the VAE's single 512-wide head), a FlashAttention-style kernel of our own runs instead.
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

  cudnnHandle_t cudnn_;
  Workspace& workspace_;
  std::map<std::tuple<int64_t, int64_t, int, int, int, bool, bool>, std::unique_ptr<Plan>> plans_;
};

// The fallback kernel (flash_attention.cu): online softmax over key tiles, float32 accumulation, any
// head dim that is a multiple of 8 up to 512, GQA, key lengths and causal mask. key_len is a device
// array of `batch` int32.
void flash_attention(const bf16* qkv, bf16* out, int64_t batch, int64_t seq, int hq, int hkv, int d, float scale,
                     bool causal, const int32_t* key_len, cudaStream_t stream);

// Writes q_len[i] = seq (q_len may be null) and kv_len[i] = key_len[i] on `stream` (device int32 arrays of
// key_len.size()). The values travel as kernel arguments, so the write is stream-ordered and is captured with its
// values in a CUDA graph (a host-to-device copy from pageable memory would be neither).
void write_sequence_lengths(const std::vector<int>& key_len, int64_t seq, int32_t* q_len, int32_t* kv_len,
                            cudaStream_t stream);

}  // namespace zimage::cuda
