// Rows of bf16 activations quantized to FP8 e4m3 with one float32 scale each: the A operand of the W8A8
// GEMMs (Backend::quantize_fp8_rows). Reference: quantize_fp8_row (backend.cpp), which this equals bit for
// bit: s = max|x| / 448 (1 for a row of zeros) and q = e4m3(x / s) with IEEE float32 division (__fdiv_rn)
// and the intrinsic's round-to-nearest-even, saturating at +-448, as the host's f32_to_f8e4m3.
//
// One block per row. Memory bound: per value 2 bytes read twice (the second pass over a row of <= 20 KB is
// served from L1/L2), 1 byte written, ~3 FLOPs. The DiT's inputs at 1024^2 (4224 rows x 3840 or 10240)
// move 49-130 MB per call: ~10-30 us at H200's 4.8 TB/s.
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? red[lane] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ uint8_t to_e4m3(float v, float s) {
  return uint8_t(__nv_cvt_float_to_fp8(__fdiv_rn(v, s), __NV_SATFINITE, __NV_E4M3));
}

// kW values per access: 8 (16-byte loads, 8-byte stores) when k is a multiple of 8, else 1.
template <int kW>
__global__ void quantize_rows_e4m3(const bf16* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                   int64_t k) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const bf16* xr = x + row * k;
  uint8_t* qr = q + row * k;
  float amax = 0.0f;
  for (int64_t i = int64_t(threadIdx.x) * kW; i < k; i += int64_t(blockDim.x) * kW) {
    float f[kW];
    unpack<kW>(load_vec<kW>(xr + i), f);
#pragma unroll
    for (int j = 0; j < kW; ++j) amax = fmaxf(amax, fabsf(f[j]));
  }
  amax = block_max(amax, red);
  const float s = amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f;
  if (threadIdx.x == 0) scale[row] = s;
  for (int64_t i = int64_t(threadIdx.x) * kW; i < k; i += int64_t(blockDim.x) * kW) {
    float f[kW];
    unpack<kW>(load_vec<kW>(xr + i), f);
    if constexpr (kW == 8) {
      uint64_t packed = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) packed |= uint64_t(to_e4m3(f[j], s)) << (8 * j);
      *reinterpret_cast<uint64_t*>(qr + i) = packed;
    } else {
      qr[i] = to_e4m3(f[0], s);
    }
  }
}

}  // namespace

void quantize_rows_e4m3(const bf16* x, uint8_t* q, float* scale, int64_t rows, int64_t k, cudaStream_t stream) {
  if (rows == 0) return;
  const bool vec = k % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 8 == 0;
  if (vec) quantize_rows_e4m3<8><<<unsigned(rows), kThreads, 0, stream>>>(x, q, scale, k);
  else quantize_rows_e4m3<1><<<unsigned(rows), kThreads, 0, stream>>>(x, q, scale, k);
  ZI_CUDA_CHECK(cudaGetLastError());
}

}  // namespace zimage::cuda
