// GroupNorm over NHWC images x [n, hw, c] (the VAE's norm; groups of cg = c/groups consecutive
// channels), with affine w, b [c] and an optional SiLU:
//   y[i, p, ch] = (x[i, p, ch] - mean[i, g]) * rsqrt(var[i, g] + eps) * w[ch] + b[ch],  g = ch / cg
// with mean and var over the hw * cg values of (image i, group g). CPU reference: CpuBackend::group_norm
// in src/backend/cpu/cpu_backend.cpp (sum and sum of squares in double, var = E[x^2] - mean^2).
//
// One (image, group) holds up to 1024*1024 pixels x 16 channels, so its statistics come from many
// blocks, in three launches:
//   1. stats:    block (chunk, image) sums a run of pixels over all channels (contiguous in NHWC) and
//                writes one float2 (sum, sum of squares) per group: partial [n, groups, chunks].
//   2. finalize: block (image, group) adds its chunks in double, turns mean and rsqrt(var + eps) into
//                per-channel coefficients coef [n, c] = (a, s) with y = x * a + s before SiLU.
//   3. apply:    y = x * a + s (then SiLU), 16-byte loads and stores.
// Float32 sums within a block (a thread adds <= ~256 values per channel), double across blocks.
// The partial sums and coefficients live in a stream-ordered scratch allocation (cudaMallocAsync).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kStatsThreads = 256;           // rounded down to a multiple of the vectors per pixel
constexpr int64_t kChunkValues = 1 << 16;    // values per stats block at most (128 KB of bf16)
constexpr int64_t kMinStatsBlocks = 1024;    // small images are cut finer so that every SM has work
constexpr size_t kMaxStatsSmem = 48 * 1024;  // the default dynamic shared memory limit
constexpr int kFinalizeThreads = 256;
constexpr int kApplyThreads = 256;
constexpr int64_t kMaxApplyBlocks = int64_t(1) << 20;

// 1. Partial sums. Block (chunk, img) covers pixels [chunk * chunk_pixels, +chunk_pixels) of image img.
// The block is ppi rows of vpp = c/kW threads: thread t always loads channels [(t % vpp) * kW, +kW) of
// pixels p = p0 + t / vpp + k * ppi, so each thread keeps kW running sums in registers. Then, through
// shared memory, per channel (over the ppi rows) and per group (over its cg channels).
// Bytes: reads 2 per value once; writes 8 * groups per block. Memory bound: 256 MB (1024^2 x 128) in
// ~60 us at 4.2 TB/s.
template <int kW>
__global__ void __launch_bounds__(1024) group_norm_stats_kernel(const bf16* x, int64_t hw, int c, int groups,
                                                                int64_t chunk_pixels, int64_t chunks, float2* partial) {
  extern __shared__ float part[];  // [blockDim.x][2 * kW] per-thread sums, later [c][2] per-channel sums
  const int64_t img = blockIdx.y, chunk = blockIdx.x;
  const int vpp = c / kW;
  const int slot = int(threadIdx.x) % vpp, ppi = int(blockDim.x) / vpp;
  const int64_t p1 = (chunk + 1) * chunk_pixels < hw ? (chunk + 1) * chunk_pixels : hw;
  const bf16* base = x + img * hw * c + int64_t(slot) * kW;
  float s[kW] = {}, q[kW] = {};
  int64_t p = chunk * chunk_pixels + int(threadIdx.x) / vpp;
  for (; p + 3 * ppi < p1; p += 4 * ppi) {  // four loads in flight, then their sums
    BfVec<kW> v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = load_vec<kW>(base + (p + int64_t(u) * ppi) * c);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float f[kW];
      unpack<kW>(v[u], f);
#pragma unroll
      for (int k = 0; k < kW; ++k) {
        s[k] += f[k];
        q[k] += f[k] * f[k];
      }
    }
  }
  for (; p < p1; p += ppi) {
    float f[kW];
    unpack<kW>(load_vec<kW>(base + p * c), f);
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      s[k] += f[k];
      q[k] += f[k] * f[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kW; ++k) {
    part[threadIdx.x * 2 * kW + k] = s[k];
    part[threadIdx.x * 2 * kW + kW + k] = q[k];
  }
  __syncthreads();
  // Per channel ch = slot * kW + k: add the ppi threads of that slot. c <= kW * blockDim.x.
  float cs[kW], cq[kW];
#pragma unroll
  for (int i = 0; i < kW; ++i) {
    const int ch = int(threadIdx.x) + i * int(blockDim.x);
    cs[i] = cq[i] = 0.0f;
    if (ch < c) {
      const int sl = ch / kW, k = ch % kW;
      for (int r = 0; r < ppi; ++r) {
        const float* t = part + (r * vpp + sl) * 2 * kW;
        cs[i] += t[k];
        cq[i] += t[kW + k];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kW; ++i) {
    const int ch = int(threadIdx.x) + i * int(blockDim.x);
    if (ch < c) {
      part[2 * ch] = cs[i];
      part[2 * ch + 1] = cq[i];
    }
  }
  __syncthreads();
  const int cg = c / groups;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    float gs = 0.0f, gq = 0.0f;
    for (int t = 0; t < cg; ++t) {
      gs += part[2 * (g * cg + t)];
      gq += part[2 * (g * cg + t) + 1];
    }
    partial[(img * groups + g) * chunks + chunk] = make_float2(gs, gq);
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// 2. Statistics of (image, group) = blockIdx.x from its chunks' partial sums, in double:
//   mean = S / N, var = max(0, Q / N - mean^2), inv = 1 / sqrt(var + eps), N = hw * cg;
// then per channel a = inv * w, s = b - mean * a. Bytes: 8 * chunks read, 8 * cg written: negligible.
__global__ void __launch_bounds__(kFinalizeThreads)
    group_norm_finalize_kernel(const float2* partial, int64_t chunks, int groups, int c, int64_t hw, float eps,
                               const bf16* w, const bf16* b, float2* coef) {
  __shared__ double red[2][kFinalizeThreads / 32];
  __shared__ double stat[2];  // mean, inv
  const float2* pp = partial + int64_t(blockIdx.x) * chunks;
  double s = 0.0, q = 0.0;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) {
    const float2 v = pp[i];
    s += v.x;
    q += v.y;
  }
  s = warp_sum(s);
  q = warp_sum(q);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red[0][warp] = s;
    red[1][warp] = q;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    s = q = 0.0;
    for (int i = 0; i < kFinalizeThreads / 32; ++i) {
      s += red[0][i];
      q += red[1][i];
    }
    const int cg = c / groups;
    const double cnt = double(hw) * double(cg), mean = s / cnt;
    const double var = fmax(0.0, q / cnt - mean * mean);
    stat[0] = mean;
    stat[1] = 1.0 / sqrt(var + double(eps));
  }
  __syncthreads();
  const int64_t img = blockIdx.x / groups;
  const int g = int(blockIdx.x % groups), cg = c / groups;
  const double mean = stat[0], inv = stat[1];
  for (int t = threadIdx.x; t < cg; t += blockDim.x) {
    const int ch = g * cg + t;
    const float a = float(inv * (w ? double(__bfloat162float(w[ch])) : 1.0));
    const float sh = float((b ? double(__bfloat162float(b[ch])) : 0.0) - mean * double(a));
    coef[img * c + ch] = make_float2(a, sh);
  }
}

// 3. y = x * a[img, ch] + s[img, ch], then SiLU y / (1 + exp(-y)) if asked. A vector of kW values lies
// in one pixel (kW divides c). Bytes: 2 read + 2 written per value (coef [n, c] stays in L1/L2).
// Memory bound: 512 MB at 1024^2 x 128 in ~120 us at 4.2 TB/s.
template <int kW, bool kSilu>
__global__ void __launch_bounds__(kApplyThreads)
    group_norm_apply_kernel(const bf16* x, const float2* coef, bf16* y, int64_t nvec, int64_t hwc, int c) {
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * kW;
    const int64_t img = e / hwc;
    const int ch = int(e % c);
    float f[kW], ab[2 * kW];
    unpack<kW>(load_vec<kW>(x + e), f);
    const float2* cf = coef + img * c + ch;
    if constexpr (kW == 8) {  // 64-byte aligned: ch is a multiple of 8
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 t = reinterpret_cast<const float4*>(cf)[i];
        ab[4 * i] = t.x, ab[4 * i + 1] = t.y, ab[4 * i + 2] = t.z, ab[4 * i + 3] = t.w;
      }
    } else {
      ab[0] = cf->x, ab[1] = cf->y;
    }
    float o[kW];
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      const float t = f[k] * ab[2 * k] + ab[2 * k + 1];
      o[k] = kSilu ? t / (1.0f + __expf(-t)) : t;
    }
    store_vec<kW>(y + e, o);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Stream-ordered scratch, released on the stream after the last kernel that reads it (or on an error).
struct StreamScratch {
  void* ptr = nullptr;
  cudaStream_t stream;
  StreamScratch(size_t bytes, cudaStream_t s) : stream(s) { ZI_CUDA_CHECK(cudaMallocAsync(&ptr, bytes, stream)); }
  ~StreamScratch() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
};

template <int kW>
void launch_group_norm(const bf16* x, const bf16* w, const bf16* b, bf16* y, int64_t n, int64_t hw, int c, int groups,
                       float eps, bool silu, cudaStream_t stream) {
  // Stats block: whole rows of vpp threads (one pixel each), ~256 threads.
  const int vpp = c / kW;
  const int threads = vpp >= kStatsThreads ? vpp : vpp * (kStatsThreads / vpp);
  const size_t smem = size_t(threads) * 2 * kW * sizeof(float);
  ZI_CHECK(threads <= 1024 && smem <= kMaxStatsSmem, ErrorKind::InvalidArgument,
           "group_norm: " + std::to_string(c) + " channels are more than the CUDA kernel supports (" +
               std::to_string(kMaxStatsSmem / (2 * 8 * sizeof(float)) * 8) + " when a multiple of 8, else 1024)");
  const int64_t ppi = threads / vpp;  // pixels per block row sweep
  int64_t chunk_pixels = std::max<int64_t>(1, kChunkValues / c);
  chunk_pixels = std::min(chunk_pixels, std::max<int64_t>(1, n * hw / kMinStatsBlocks));
  chunk_pixels = (chunk_pixels + ppi - 1) / ppi * ppi;
  const int64_t chunks = (hw + chunk_pixels - 1) / chunk_pixels;

  const size_t partial_bytes = (size_t(n * groups * chunks) * sizeof(float2) + 255) / 256 * 256;
  StreamScratch scratch(partial_bytes + size_t(n) * c * sizeof(float2), stream);
  auto* partial = static_cast<float2*>(scratch.ptr);
  auto* coef = reinterpret_cast<float2*>(static_cast<char*>(scratch.ptr) + partial_bytes);

  group_norm_stats_kernel<kW>
      <<<dim3(unsigned(chunks), unsigned(n)), threads, smem, stream>>>(x, hw, c, groups, chunk_pixels, chunks, partial);
  ZI_CUDA_LAUNCH_CHECK();
  group_norm_finalize_kernel<<<unsigned(n * groups), kFinalizeThreads, 0, stream>>>(partial, chunks, groups, c, hw, eps,
                                                                                    w, b, coef);
  ZI_CUDA_LAUNCH_CHECK();
  const int64_t nvec = n * hw * c / kW;
  const unsigned grid = unsigned(std::min<int64_t>(grid_for(nvec, kApplyThreads), kMaxApplyBlocks));
  if (silu)
    group_norm_apply_kernel<kW, true><<<grid, kApplyThreads, 0, stream>>>(x, coef, y, nvec, hw * c, c);
  else
    group_norm_apply_kernel<kW, false><<<grid, kApplyThreads, 0, stream>>>(x, coef, y, nvec, hw * c, c);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace

void group_norm_nhwc(const bf16* x, const bf16* w, const bf16* b, bf16* y, int64_t n, int64_t hw, int64_t c, int groups,
                     float eps, bool silu, cudaStream_t stream) {
  if (n <= 0 || hw <= 0 || c <= 0) return;
  ZI_CHECK(groups > 0 && c % groups == 0, ErrorKind::InvalidArgument,
           "group_norm: " + std::to_string(c) + " channels do not split into " + std::to_string(groups) + " groups");
  ZI_CHECK(n <= 65535, ErrorKind::InvalidArgument,
           "group_norm: a batch of " + std::to_string(n) + " images is more than the CUDA kernel supports (65535)");
  ZI_CHECK(c <= 65536, ErrorKind::InvalidArgument,
           "group_norm: " + std::to_string(c) + " channels are more than the CUDA kernel supports");
  if (c % 8 == 0 && aligned16(x) && aligned16(y))
    launch_group_norm<8>(x, w, b, y, n, hw, int(c), groups, eps, silu, stream);
  else
    launch_group_norm<1>(x, w, b, y, n, hw, int(c), groups, eps, silu, stream);
}

}  // namespace zimage::cuda
