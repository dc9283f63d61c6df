// y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]) for a handful of rows, M <= 32: the text encoder on one
// prompt (M = 22 tokens for the benchmark prompt), the DiT's adaLN and timestep GEMMs (M = batch).
// Reference: CpuBackend::linear (src/backend/cpu/cpu_backend.cpp).
//
// Budget: 2·M·N·K FLOPs for 2·N·K bytes of w, i.e. M FLOPs per byte: the bound is reading w once from
// HBM (Qwen3-4B's 8 GB of matrices at 4.8 TB/s: 1.7 ms). cuBLASLt's best candidate at M = 22 reads the
// 19456x2560 gate|up matrix at 1.3 TB/s (77 µs on an H200), so this kernel is timed against cuBLASLt
// per shape (gemm.cpp) and used where it wins.
//
// Structure: each warp owns 64 rows of w (four m16 tiles) and a range of K; per stage of 32 k values every
// lane loads 16 bytes from each of its eight w rows and 16 bytes of each token's x row (x is shared by
// every warp and stays in L1/L2), two stages in flight, and issues mma.sync m16n8k16 with
// w as the A operand (rows = output features) and x^T as B (columns = tokens, NT tiles of 8). The 8
// values a lane loads for one row cover k = k0 + 8t .. k0 + 8t + 7 (t = lane % 4); the mma fragments take
// them in the order (2t, 2t+1, 2t+8, 2t+9) of each 16-wide step, the same permutation for w and x, so the
// dot products are unchanged and no shuffles or shared memory are needed.
// Split-K: when N / 64 warps cannot fill the GPU (N = 2560 rows of the down projection), blockIdx.y splits K
// and float32 partials [splits, M, N] are summed (with the bias) by a second kernel.
#include <algorithm>

#include "backend/cuda/kernels.h"
#include "backend/cuda/mma.cuh"

namespace zimage::cuda {

namespace {

constexpr int kWarps = 4;           // per block
constexpr int kTiles = 4;           // m16 tiles of w rows per warp
constexpr int kRowsPerWarp = 16 * kTiles;
constexpr int kStepK = 32;          // k values per pipeline stage: one 16-byte load per row and lane
constexpr int kTargetWarps = 2048;  // enough loads in flight to saturate HBM (132 SMs x ~16 warps)
constexpr int kMinSplitK = 256;

// Non-volatile loads (plain dereferences of __restrict__ pointers), so that the compiler may issue the
// next stage's loads ahead of this stage's mma instructions.
__device__ __forceinline__ uint4 load16(const bf16* __restrict__ p) { return *reinterpret_cast<const uint4*>(p); }

template <int NT>
struct Stage {
  uint4 a[kTiles][2];  // w: tile i, row half h (rows 16i + g and 16i + 8 + g)
  uint4 b[NT];         // x: token 8j + g
};

template <int NT>  // token tiles of 8: M <= 8 * NT
__global__ void __launch_bounds__(kWarps * 32)
    linear_skinny_kernel(const bf16* __restrict__ x, const bf16* __restrict__ w, const bf16* __restrict__ bias,
                         bf16* __restrict__ y, float* __restrict__ partial, int m, int n, int k, int k_per_split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = (blockIdx.x * kWarps + warp) * kRowsPerWarp;
  if (row0 >= n) return;
  const int k_begin = blockIdx.y * k_per_split, k_end = min(k, k_begin + k_per_split);

  // Row pointers of this lane, at its 8 values of each stage (rows past N are clamped: computed, dropped).
  const bf16* wr[kTiles][2];
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) wr[i][h] = w + int64_t(min(row0 + 16 * i + 8 * h + g, n - 1)) * k + 8 * t;
  const bf16* xr[NT];
  bool xv[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    xv[j] = 8 * j + g < m;
    xr[j] = x + int64_t(min(8 * j + g, m - 1)) * k + 8 * t;
  }
  auto load = [&](Stage<NT>& st, int k0) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) st.a[i][h] = load16(wr[i][h] + k0);
#pragma unroll
    for (int j = 0; j < NT; ++j) st.b[j] = xv[j] ? load16(xr[j] + k0) : make_uint4(0, 0, 0, 0);
  };
  float acc[kTiles][NT][4] = {};
  // The 8 values of a row that a lane holds cover k0 + 8t .. k0 + 8t + 7; mma step s takes [4s, 4s + 4)
  // as fragment columns (2t, 2t+1) <- .x / .z and (2t+8, 2t+9) <- .y / .w.
  auto compute = [&](const Stage<NT>& st) {
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        const uint4 &r0 = st.a[i][0], &r1 = st.a[i][1];
        const uint32_t af[4] = {s ? r0.z : r0.x, s ? r1.z : r1.x, s ? r0.w : r0.y, s ? r1.w : r1.y};
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_bf16(acc[i][j], af, s ? st.b[j].z : st.b[j].x, s ? st.b[j].w : st.b[j].y);
      }
  };
  // Two stages in registers: the loads of one are in flight while the other's mma instructions run.
  // K ranges are multiples of 2 * kStepK.
  Stage<NT> s0, s1;
  load(s0, k_begin);
  for (int k0 = k_begin; k0 < k_end; k0 += 2 * kStepK) {
    load(s1, k0 + kStepK);
    compute(s0);
    if (k0 + 2 * kStepK < k_end) load(s0, k0 + 2 * kStepK);
    compute(s1);
  }

  // acc[i][j]: rows (features) row0 + 16i + g (+8 for [2], [3]), columns (tokens) 8j + 2t, 8j + 2t + 1.
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int feat = row0 + 16 * i + g + (e >= 2 ? 8 : 0), tok = 8 * j + 2 * t + (e & 1);
        if (feat >= n || tok >= m) continue;
        if (partial) {
          partial[(int64_t(blockIdx.y) * m + tok) * n + feat] = acc[i][j][e];
        } else {
          float v = acc[i][j][e] + (bias ? __bfloat162float(bias[feat]) : 0.0f);
          y[int64_t(tok) * n + feat] = __float2bfloat16(v);
        }
      }
}

// y[i] = bf16(sum over splits of partial[s][i] + bias[i % n]).
__global__ void sum_splits_kernel(const float* __restrict__ partial, const bf16* __restrict__ bias, bf16* __restrict__ y,
                                  int64_t mn, int n, int splits) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= mn) return;
  float v = bias ? __bfloat162float(bias[i % n]) : 0.0f;
  for (int s = 0; s < splits; ++s) v += partial[int64_t(s) * mn + i];
  y[i] = __float2bfloat16(v);
}

}  // namespace

bool linear_skinny_applies(int64_t m, int64_t n, int64_t k, const void* x, const void* w) {
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return m >= 1 && m <= kLinearSkinnyMaxRows && n >= 1 && n < (int64_t(1) << 31) && k % (2 * kStepK) == 0 &&
         k < (int64_t(1) << 31) && aligned(x) && aligned(w);
}

size_t linear_skinny_workspace(int64_t m, int64_t n, int64_t k) {
  const int64_t warps = (n + kRowsPerWarp - 1) / kRowsPerWarp;
  int64_t splits = std::clamp<int64_t>(kTargetWarps / warps, 1, std::max<int64_t>(1, k / kMinSplitK));
  return splits > 1 ? size_t(splits) * size_t(m) * size_t(n) * sizeof(float) : 0;
}

void linear_skinny(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int64_t m, int64_t n, int64_t k,
                   float* workspace, cudaStream_t stream) {
  const int64_t warps = (n + kRowsPerWarp - 1) / kRowsPerWarp;
  int64_t splits = std::clamp<int64_t>(kTargetWarps / warps, 1, std::max<int64_t>(1, k / kMinSplitK));
  int64_t k_per_split = (k / (2 * kStepK) + splits - 1) / splits * (2 * kStepK);
  splits = (k + k_per_split - 1) / k_per_split;
  float* partial = splits > 1 ? workspace : nullptr;
  dim3 grid(unsigned((warps + kWarps - 1) / kWarps), unsigned(splits));
  const int nt = int((m + 7) / 8);
  auto launch = [&](auto kernel) {
    kernel<<<grid, kWarps * 32, 0, stream>>>(x, w, bias, y, partial, int(m), int(n), int(k), int(k_per_split));
  };
  switch (nt) {
    case 1: launch(linear_skinny_kernel<1>); break;
    case 2: launch(linear_skinny_kernel<2>); break;
    case 3: launch(linear_skinny_kernel<3>); break;
    default: launch(linear_skinny_kernel<4>); break;
  }
  ZI_CUDA_LAUNCH_CHECK();
  if (partial) {
    sum_splits_kernel<<<grid_for(m * n, 256), 256, 0, stream>>>(partial, bias, y, m * n, int(n), int(splits));
    ZI_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace zimage::cuda
