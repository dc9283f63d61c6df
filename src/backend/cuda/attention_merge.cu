// Merging ring attention's partial results (parallel/usp_attention.h): two attentions of the same queries
// over disjoint key blocks, each with its log-sum-exp, into the attention over both keys. CPU reference:
// CpuBackend::merge_attention_ (cpu_backend.cpp).
//
// One warp per (row, head) slot: the lanes read the two lse values, then stride over the slot's d output
// values (coalesced), and lane 0 writes the merged lse after the warp has read it. Memory bound: per slot
// 4*d bytes read and 2*d written plus 12 bytes of lse; the DiT's ring step at 1024^2 on 4 GPUs (U = 2: 15
// heads of 128 over ~2.1k rows) moves ~25 MB, ~6 us at ~4.2 TB/s.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kWarpsPerBlock = 8;

__global__ void merge_attention_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ out_b,
                                       const float* __restrict__ lse_b, int64_t slots, int64_t d) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t slot = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; slot < slots; slot += warps) {
    const float la = lse[slot], lb = lse_b[slot], m = fmaxf(la, lb);
    if (m == -INFINITY) continue;  // neither part has a valid key: out stays as it is (zero)
    const float wa = expf(la - m), wb = expf(lb - m), inv = 1.0f / (wa + wb);
    bf16* o = out + slot * d;
    const bf16* ob = out_b + slot * d;
    for (int64_t e = lane; e < d; e += 32)
      o[e] = __float2bfloat16((wa * __bfloat162float(o[e]) + wb * __bfloat162float(ob[e])) * inv);
    __syncwarp();
    if (lane == 0) lse[slot] = m + logf(wa + wb);
  }
}

}  // namespace

void merge_attention(bf16* out, float* lse, const bf16* out_b, const float* lse_b, int64_t slots, int64_t d,
                     cudaStream_t stream) {
  if (slots <= 0) return;
  const unsigned blocks = unsigned(std::min<int64_t>((slots + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535));
  merge_attention_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(out, lse, out_b, lse_b, slots, d);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
