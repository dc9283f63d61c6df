// Packed bf16 <-> float helpers shared by the row-wise kernels (norms, group norm, QK-norm + RoPE):
// 16-byte vectors of 8 bf16 for the fast paths, single values for the fallbacks.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

#include "backend/cuda/cuda_common.h"

namespace zimage::cuda {

// Two bf16 packed in a 32-bit word (the first in the low half) <-> floats. bf16 -> float is exact: the
// bf16 bits are the float's upper half. Bit operations and memcpy rather than pointer casts between
// local variables of different types, which the optimizer may assume never alias.
__device__ __forceinline__ void bf16x2_to_float(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}

__device__ __forceinline__ uint32_t float_to_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // round to nearest even
  uint32_t w;
  memcpy(&w, &h, sizeof w);
  return w;
}

// bf16 vectors of kW values as loaded and stored, kept packed in registers: 16 bytes (kW = 8) or one
// value (kW = 1, the fallback for sizes not a multiple of 8 or pointers not 16-byte aligned).
template <int kW>
struct BfVec;
template <>
struct BfVec<8> {
  uint4 raw;
};
template <>
struct BfVec<1> {
  unsigned short raw;  // the bf16 bits
};

template <int kW>
__device__ __forceinline__ BfVec<kW> load_vec(const bf16* p) {
  BfVec<kW> v;
  v.raw = *reinterpret_cast<const decltype(v.raw)*>(p);
  return v;
}

template <int kW>
__device__ __forceinline__ void unpack(const BfVec<kW>& v, float (&f)[kW]) {
  if constexpr (kW == 8) {
    const uint32_t w[4] = {v.raw.x, v.raw.y, v.raw.z, v.raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) bf16x2_to_float(w[i], f[2 * i], f[2 * i + 1]);
  } else {
    f[0] = __uint_as_float(uint32_t(v.raw) << 16);
  }
}

// kW floats rounded to bf16 (nearest even) and packed.
template <int kW>
__device__ __forceinline__ BfVec<kW> pack(const float (&f)[kW]) {
  BfVec<kW> v;
  if constexpr (kW == 8) {
    v.raw = make_uint4(float_to_bf16x2(f[0], f[1]), float_to_bf16x2(f[2], f[3]), float_to_bf16x2(f[4], f[5]),
                       float_to_bf16x2(f[6], f[7]));
  } else {
    v.raw = uint16_t(float_to_bf16x2(f[0], 0.0f) & 0xffffu);
  }
  return v;
}

template <int kW>
__device__ __forceinline__ void store_vec(bf16* p, const float (&f)[kW]) {
  *reinterpret_cast<decltype(BfVec<kW>::raw)*>(p) = pack<kW>(f).raw;
}

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) bf16x2_to_float(w[i], f[2 * i], f[2 * i + 1]);
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(float_to_bf16x2(f[0], f[1]), float_to_bf16x2(f[2], f[3]), float_to_bf16x2(f[4], f[5]),
                    float_to_bf16x2(f[6], f[7]));
}

// ---- FP8 e4m3 rows (the inputs of FP8 linears; reference: quantize_fp8_row, backend.cpp) ----

// The e4m3 code of v / s: IEEE float32 division (__fdiv_rn: never the fast approximate one), round to
// nearest even, saturating at +-448, as the host's f32_to_f8e4m3.
__device__ __forceinline__ uint8_t e4m3_code(float v, float s) {
  return uint8_t(__nv_cvt_float_to_fp8(__fdiv_rn(v, s), __NV_SATFINITE, __NV_E4M3));
}

// The row's scale from its largest |value|: amax / 448, 1 for a row of zeros.
__device__ __forceinline__ float e4m3_row_scale(float amax) { return amax > 0.0f ? __fdiv_rn(amax, 448.0f) : 1.0f; }

// kW codes of f / s at p (one 8-byte store for kW = 8: p 8-byte aligned).
template <int kW>
__device__ __forceinline__ void store_e4m3(uint8_t* p, const float (&f)[kW], float s) {
  if constexpr (kW == 8) {
    uint64_t packed = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) packed |= uint64_t(e4m3_code(f[k], s)) << (8 * k);
    *reinterpret_cast<uint64_t*>(p) = packed;
  } else {
    p[0] = e4m3_code(f[0], s);
  }
}

// Max over the block (blockDim.x a multiple of 32), returned to every thread. `red` holds 32 floats; the
// leading barrier lets consecutive reductions reuse it.
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? red[lane] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// One block's row of k values, given kW at a time by values(i, f) (the values at columns i .. i + kW - 1),
// written as e4m3 codes q[0, k) with its scale: two passes (the row's max |value|, then the codes), each
// value computed twice. The producers whose output is not in registers (quantize_rows_e4m3, swiglu_e4m3).
template <int kW, class Values>
__device__ __forceinline__ void quantize_row_e4m3(int64_t k, Values values, uint8_t* q, float* scale, float* red) {
  float amax = 0.0f;
  for (int64_t i = int64_t(threadIdx.x) * kW; i < k; i += int64_t(blockDim.x) * kW) {
    float f[kW];
    values(i, f);
#pragma unroll
    for (int j = 0; j < kW; ++j) amax = fmaxf(amax, fabsf(f[j]));
  }
  const float s = e4m3_row_scale(block_max(amax, red));
  if (threadIdx.x == 0) *scale = s;
  for (int64_t i = int64_t(threadIdx.x) * kW; i < k; i += int64_t(blockDim.x) * kW) {
    float f[kW];
    values(i, f);
    store_e4m3<kW>(q + i, f, s);
  }
}

}  // namespace zimage::cuda
