// QK-norm + RoPE in place on a packed projection qkv [rows, (hq + 2*hkv) * d]: each of the first
// hq + hkv heads of a row (q heads with weight qw [d], then k heads with kw [d]) gets RMSNorm over its d
// values, then the rotation by the row's angles (cos, sin [rows, d/2] float32):
//   interleaved (Z-Image DiT):   (x[2m], x[2m+1])   -> (a*c_m - b*s_m, b*c_m + a*s_m)
//   half-split  (Qwen3, NeoX):   (x[m],  x[m+d/2])  -> the same, with a = x[m], b = x[m+d/2]
// The v heads are untouched. CPU reference: CpuBackend::qk_norm_rope_ in src/backend/cpu/cpu_backend.cpp.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void load8_f32(const float* p, float (&f)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// Fast path: d % 16 == 0 and d / 8 a power of two <= 32 (d = 16, 32, 64, 128, 256), every pointer
// 16-byte aligned. Each head is a segment of tph = d/8 consecutive lanes of one warp, a lane holding 8
// consecutive values (one 16-byte load). The sum of squares is reduced within the segment by xor
// shuffles; half-split rotation partners sit tph/2 lanes apart (lane ^ tph/2), interleaved partners in
// the same lane. Threads past the last head still take part in the shuffles (no loads, no stores).
// Bytes: 4 per q/k value (read + write) and 2*4*d/2 per head of cos/sin (L1/L2 hits: the heads of a
// row share one table row). Memory bound: the DiT's 2 x 4128 rows x 60 q/k heads x 128 move 254 MB, ~60 us
// at 4.2 TB/s.
template <bool kInterleaved>
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_vec_kernel(bf16* qkv, int64_t units, int heads, int hq, int d, int64_t width, const bf16* qw,
                            const bf16* kw, float eps, const float* cos, const float* sin) {
  const int tph = d / 8;  // lanes per head
  const int64_t gid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t unit = gid / tph;  // (row, head) pair
  const int j = int(gid % tph);    // this lane's 8 values: [8j, 8j + 8) of the head
  const bool valid = unit < units;
  const int64_t row = valid ? unit / heads : 0;
  const int h = valid ? int(unit % heads) : 0;
  bf16* x = qkv + row * width + int64_t(h) * d + j * 8;

  float v[8] = {};
  if (valid) unpack8(*reinterpret_cast<const uint4*>(x), v);
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
  for (int off = tph / 2; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float inv = rsqrtf(ss / float(d) + eps);

  const bf16* wp = h < hq ? qw : kw;
  float w[8];
  if (valid && wp) {
    unpack8(*reinterpret_cast<const uint4*>(wp + j * 8), w);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = 1.0f;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] *= inv * w[k];

  const int half = d / 2;
  const float* cr = cos + row * half;
  const float* sr = sin + row * half;
  float o[8];
  if constexpr (kInterleaved) {
    // Values 8j..8j+7 are the pairs m = 4j..4j+3.
    float c[4] = {}, s[4] = {};
    if (valid) {
      const float4 c4 = *reinterpret_cast<const float4*>(cr + 4 * j);
      const float4 s4 = *reinterpret_cast<const float4*>(sr + 4 * j);
      c[0] = c4.x, c[1] = c4.y, c[2] = c4.z, c[3] = c4.w;
      s[0] = s4.x, s[1] = s4.y, s[2] = s4.z, s[3] = s4.w;
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float a = v[2 * p], b = v[2 * p + 1];
      o[2 * p] = a * c[p] - b * s[p];
      o[2 * p + 1] = b * c[p] + a * s[p];
    }
  } else {
    // Lane j < tph/2 holds a = x[m] for m = 8j..8j+7; its partner lane j + tph/2 holds b = x[m + d/2].
    float partner[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) partner[k] = __shfl_xor_sync(0xffffffffu, v[k], tph / 2);
    const bool lower = j < tph / 2;
    const int m0 = lower ? 8 * j : 8 * j - half;
    float c[8] = {}, s[8] = {};
    if (valid) {
      load8_f32(cr + m0, c);
      load8_f32(sr + m0, s);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k)
      o[k] = lower ? v[k] * c[k] - partner[k] * s[k]   // x[m]       = a*c - b*s
                   : v[k] * c[k] + partner[k] * s[k];  // x[m + d/2] = b*c + a*s
  }
  if (valid) *reinterpret_cast<uint4*>(x) = pack8(o);
}

// Fallback for any d and alignment: one warp per (row, head), scalar loads. Pass 1 reduces the sum of
// squares (the warp reduction also orders every lane's reads before any write); pass 2 gives each
// pair (i0, i1) to one lane, which reads, normalizes, rotates and writes both values. For odd d the
// last value belongs to no pair and, as in the reference, is left as it was.
__global__ void __launch_bounds__(kThreads)
    qk_norm_rope_any_kernel(bf16* qkv, int64_t units, int heads, int hq, int d, int64_t width, const bf16* qw,
                            const bf16* kw, float eps, const float* cos, const float* sin, bool interleaved) {
  const int64_t unit = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (unit >= units) return;  // whole warps leave together
  const int64_t row = unit / heads;
  const int h = int(unit % heads);
  bf16* x = qkv + row * width + int64_t(h) * d;
  const bf16* wp = h < hq ? qw : kw;

  float ss = 0.0f;
  for (int i = lane; i < d; i += 32) {
    const float t = __bfloat162float(x[i]);
    ss += t * t;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float inv = rsqrtf(ss / float(d) + eps);

  const int half = d / 2;
  const float* cr = cos + row * half;
  const float* sr = sin + row * half;
  for (int m = lane; m < half; m += 32) {
    const int i0 = interleaved ? 2 * m : m;
    const int i1 = interleaved ? 2 * m + 1 : m + half;
    const float a = __bfloat162float(x[i0]) * inv * (wp ? __bfloat162float(wp[i0]) : 1.0f);
    const float b = __bfloat162float(x[i1]) * inv * (wp ? __bfloat162float(wp[i1]) : 1.0f);
    x[i0] = __float2bfloat16(a * cr[m] - b * sr[m]);
    x[i1] = __float2bfloat16(b * cr[m] + a * sr[m]);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

void qk_norm_rope(bf16* qkv, int64_t rows, int hq, int hkv, int d, const bf16* qw, const bf16* kw, float eps,
                  const float* cos, const float* sin, bool interleaved, cudaStream_t stream) {
  const int heads = hq + hkv;
  if (rows <= 0 || heads <= 0 || d <= 0) return;
  const int64_t units = rows * heads;
  const int64_t width = int64_t(hq + 2 * hkv) * d;
  const int tph = d / 8;
  const bool fast = d % 16 == 0 && tph <= 32 && (tph & (tph - 1)) == 0 && aligned16(qkv) && aligned16(qw) &&
                    aligned16(kw) && aligned16(cos) && aligned16(sin);
  if (fast) {
    const unsigned grid = grid_for(units * tph, kThreads);
    if (interleaved)
      qk_norm_rope_vec_kernel<true>
          <<<grid, kThreads, 0, stream>>>(qkv, units, heads, hq, d, width, qw, kw, eps, cos, sin);
    else
      qk_norm_rope_vec_kernel<false>
          <<<grid, kThreads, 0, stream>>>(qkv, units, heads, hq, d, width, qw, kw, eps, cos, sin);
  } else {
    const unsigned grid = grid_for(units, kThreads / 32);
    qk_norm_rope_any_kernel<<<grid, kThreads, 0, stream>>>(qkv, units, heads, hq, d, width, qw, kw, eps, cos, sin,
                                                           interleaved);
  }
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
