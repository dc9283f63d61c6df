// Quantized weights dequantized on the device, one layer at a time, into a bf16 buffer right before its
// GEMM (Backend::dequantize): the weights stay FP8 or GGUF blocks in device memory (an FP8 or Q8_0 DiT
// takes about half the memory of a bf16 one, Q4_K about 0.3x).
//
// Reference: dequantize_on_host (backend.cpp), i.e. ggml_dequantize (io/gguf.cpp) for the block formats
// and value x scale for FP8. Every value here is computed with the same float32 operations in the same
// order, each rounded on its own (__fmul_rn / __fadd_rn / __fsub_rn: nvcc would otherwise contract
// a * b - c into one FMA, which rounds once and changes the last bit), then rounded once to bf16 with
// ties to even as the host's f32_to_bf16 does: the result equals the reference bit for bit.
//
// All kernels are memory bound: per output value they read the format's bits per weight (plus its block
// scales, shared by 16-32 values and served from L1) and write 2 bytes of bf16, with 1-3 FLOPs. The
// budget of each is written beside it as bytes read + written per value; at H200's ~4.8 TB/s a
// 3840 x 10240 matrix (39.3M values) moves ~120 MB (Q8_0) and takes ~25 us. bench/kernels/dequantize.cpp
// times them. Each thread writes 8 consecutive values (one 16-byte store); every format's block holds a
// multiple of 8 values, so a thread's values share one block.
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/kernels.h"
#include "io/gguf.h"

namespace zimage::cuda {

namespace {

constexpr int kBlock = 256;
constexpr int kValuesPerThread = 8;

// fp16 at a 2-byte aligned address inside a block, widened exactly.
__device__ __forceinline__ float f16_at(const uint8_t* p) {
  return __half2float(__ushort_as_half(uint16_t(p[0] | (p[1] << 8))));
}
__device__ __forceinline__ uint32_t u32_at(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// ---- the block formats (ggml-common.h); value(b, j) is value j of the block at b ----

// Q8_0 {d; int8 qs[32]}: y = q * d. 34/32 B read + 2 B written, 1 FLOP per value.
struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    return __fmul_rn(float(int8_t(b[2 + j])), f16_at(b));
  }
};

// Q4_0 {d; u8 qs[16]}: y = (nibble - 8) * d, low nibbles first. 18/32 B + 2 B, 1 FLOP.
struct Q4_0 {
  static constexpr int kElems = 32, kBytes = 18;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const uint8_t byte = b[2 + j % 16];
    return __fmul_rn(float(int(j < 16 ? byte & 0xf : byte >> 4) - 8), f16_at(b));
  }
};

// Q4_1 {d; m; u8 qs[16]}: y = nibble * d + m. 20/32 B + 2 B, 2 FLOPs.
struct Q4_1 {
  static constexpr int kElems = 32, kBytes = 20;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const uint8_t byte = b[4 + j % 16];
    return __fadd_rn(__fmul_rn(float(j < 16 ? byte & 0xf : byte >> 4), f16_at(b)), f16_at(b + 2));
  }
};

// Q5_0 {d; u32 qh; u8 qs[16]}: the nibble with bit j of qh as its 5th bit, minus 16, times d.
// 22/32 B + 2 B, 1 FLOP.
struct Q5_0 {
  static constexpr int kElems = 32, kBytes = 22;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const uint8_t byte = b[6 + j % 16];
    const int q = int((j < 16 ? byte & 0xf : byte >> 4) | (((u32_at(b + 2) >> j) & 1u) << 4)) - 16;
    return __fmul_rn(float(q), f16_at(b));
  }
};

// Q5_1 {d; m; u32 qh; u8 qs[16]}: Q5_0's 5-bit value without the -16, times d plus m. 24/32 B + 2 B, 2 FLOPs.
struct Q5_1 {
  static constexpr int kElems = 32, kBytes = 24;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const uint8_t byte = b[8 + j % 16];
    const uint32_t q = (j < 16 ? byte & 0xf : byte >> 4) | (((u32_at(b + 4) >> j) & 1u) << 4);
    return __fadd_rn(__fmul_rn(float(q), f16_at(b)), f16_at(b + 2));
  }
};

// K-quants: super-blocks of 256 values in two halves of 128 (see io/gguf.cpp for the layouts).

// Q2_K {scales[16]; qs[64]; d; dmin}: value (half, g, sub, l) = (d * lo4(sc)) * q - dmin * hi4(sc) with
// sc = scales[8 half + 2 g + sub], q = bits 2g..2g+1 of qs[32 half + 16 sub + l]. 84/256 B + 2 B, 4 FLOPs.
struct Q2_K {
  static constexpr int kElems = 256, kBytes = 84;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const int half = j / 128, g = (j % 128) / 32, sub = (j % 32) / 16, l = j % 16;
    const uint8_t sc = b[half * 8 + g * 2 + sub];
    const float dl = __fmul_rn(f16_at(b + 80), float(sc & 0xf)), ml = __fmul_rn(f16_at(b + 82), float(sc >> 4));
    const int q = (b[16 + half * 32 + sub * 16 + l] >> (2 * g)) & 3;
    return __fsub_rn(__fmul_rn(dl, float(q)), ml);
  }
};

// Q3_K {hmask[32]; qs[64]; scales[12]; d}: (d * (s6 - 32)) * (q - 4 unless hmask's bit), s6 the 6-bit
// scale of sub-block 8 half + 2 g + sub. 110/256 B + 2 B, 2 FLOPs.
struct Q3_K {
  static constexpr int kElems = 256, kBytes = 110;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const int half = j / 128, g = (j % 128) / 32, sub = (j % 32) / 16, l = j % 16, s = half * 8 + g * 2 + sub;
    const uint8_t* sc = b + 96;
    const int low = s < 8 ? sc[s] & 0xf : sc[s - 8] >> 4;
    const int high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
    const float dl = __fmul_rn(f16_at(b + 108), float((low | (high << 4)) - 32));
    const int q = (b[32 + half * 32 + sub * 16 + l] >> (2 * g)) & 3;
    const int h = (b[sub * 16 + l] >> (half * 4 + g)) & 1;
    return __fmul_rn(dl, float(q - (h ? 0 : 4)));
  }
};

// The 6-bit (scale, min) pair s of Q4_K / Q5_K's 12 packed bytes (get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int s, const uint8_t* q, int* sc, int* m) {
  if (s < 4) {
    *sc = q[s] & 63;
    *m = q[s + 4] & 63;
  } else {
    *sc = (q[s + 4] & 0xf) | ((q[s - 4] >> 6) << 4);
    *m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
  }
}

// Q4_K {d; dmin; scales[12]; qs[128]} (kFive false) and Q5_K {d; dmin; scales[12]; qh[32]; qs[128]}:
// value (chunk c, nibble hi, l) = (d * sc) * q - dmin * m, pair 2c + hi; Q5_K adds bit 2c + hi of qh[l]
// as 16. Q4_K 144/256 B, Q5_K 176/256 B, + 2 B written, 4 FLOPs.
template <bool kFive>
struct QK_45 {
  static constexpr int kElems = 256, kBytes = kFive ? 176 : 144;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const int c = j / 64, hi = (j % 64) / 32, l = j % 32;
    int sc, m;
    scale_min_k4(2 * c + hi, b + 4, &sc, &m);
    const float dl = __fmul_rn(f16_at(b), float(sc)), ml = __fmul_rn(f16_at(b + 2), float(m));
    const uint8_t byte = b[(kFive ? 48 : 16) + 32 * c + l];
    int q = hi ? byte >> 4 : byte & 0xf;
    if (kFive && ((b[16 + l] >> (2 * c + hi)) & 1)) q += 16;
    return __fsub_rn(__fmul_rn(dl, float(q)), ml);
  }
};
using Q4_K = QK_45<false>;
using Q5_K = QK_45<true>;

// Q6_K {ql[128]; qh[64]; int8 scales[16]; d}: value (half, k, l) = (d * scales[8 half + 2k + l/16]) * (q - 32),
// q = nibble of ql[64 half + 32 (k % 2) + l] (low for k < 2) | bits 2k..2k+1 of qh[32 half + l] << 4.
// 210/256 B + 2 B, 2 FLOPs.
struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210;
  static __device__ __forceinline__ float value(const uint8_t* b, int j) {
    const int half = j / 128, k = (j % 128) / 32, l = j % 32;
    const uint8_t lo = b[64 * half + 32 * (k % 2) + l];
    const int q = ((k < 2 ? lo & 0xf : lo >> 4) | (((b[128 + 32 * half + l] >> (2 * k)) & 3) << 4)) - 32;
    const float dl = __fmul_rn(f16_at(b + 208), float(int8_t(b[192 + 8 * half + 2 * k + l / 16])));
    return __fmul_rn(dl, float(q));
  }
};

// y[n] bf16 from the blocks at q (n a multiple of Format::kElems): thread t writes values 8t..8t+7.
template <typename Format>
__global__ void dequantize_blocks_to_bf16(const uint8_t* __restrict__ q, bf16* __restrict__ y, int64_t groups) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t first = g * kValuesPerThread;
  const uint8_t* b = q + (first / Format::kElems) * Format::kBytes;
  const int j0 = int(first % Format::kElems);
  __align__(16) bf16 out[kValuesPerThread];
#pragma unroll
  for (int k = 0; k < kValuesPerThread; ++k) out[k] = __float2bfloat16_rn(Format::value(b, j0 + k));
  *reinterpret_cast<uint4*>(y + first) = *reinterpret_cast<const uint4*>(out);
}

template <typename Format>
void launch_blocks(const uint8_t* q, bf16* y, int64_t n, cudaStream_t stream) {
  const int64_t groups = n / kValuesPerThread;
  dequantize_blocks_to_bf16<Format><<<grid_for(groups, kBlock), kBlock, 0, stream>>>(q, y, groups);
  ZI_CUDA_LAUNCH_CHECK();
}

// FP8 [rows, cols] -> bf16: y = value x scale (scale_count 1: per tensor; rows: per row; 0: no scale).
// The FP8 -> half conversion is exact (every e4m3 / e5m2 value is a half), half -> float too.
// 1 B (+ the row's 4-byte scale, cached) read + 2 B written, 1 FLOP per value.
template <__nv_fp8_interpretation_t kFormat>
__device__ __forceinline__ bf16 fp8_value(uint8_t v, const float* scale, int64_t scale_count, int64_t row) {
  float x = __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(v), kFormat)));
  if (scale_count) x = __fmul_rn(x, scale[scale_count == 1 ? 0 : row]);
  return __float2bfloat16_rn(x);
}

template <__nv_fp8_interpretation_t kFormat>
__global__ void dequantize_fp8_to_bf16(const uint8_t* __restrict__ q, const float* __restrict__ scale,
                                       int64_t scale_count, bf16* __restrict__ y, int64_t n, int64_t cols) {
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kValuesPerThread;
  if (first >= n) return;
  if (first + kValuesPerThread > n) {  // the last values of a matrix whose size is not a multiple of 8
    for (int64_t i = first; i < n; ++i) y[i] = fp8_value<kFormat>(q[i], scale, scale_count, i / cols);
    return;
  }
  const uint2 bytes = *reinterpret_cast<const uint2*>(q + first);
  const uint8_t* v = reinterpret_cast<const uint8_t*>(&bytes);
  __align__(16) bf16 out[kValuesPerThread];
#pragma unroll
  for (int k = 0; k < kValuesPerThread; ++k) out[k] = fp8_value<kFormat>(v[k], scale, scale_count, (first + k) / cols);
  *reinterpret_cast<uint4*>(y + first) = *reinterpret_cast<const uint4*>(out);
}

}  // namespace

void dequantize_ggml_to_bf16(uint32_t ggml_type, const uint8_t* q, bf16* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  switch (GgmlType(ggml_type)) {
    case GgmlType::Q8_0: return launch_blocks<Q8_0>(q, y, n, stream);
    case GgmlType::Q4_0: return launch_blocks<Q4_0>(q, y, n, stream);
    case GgmlType::Q4_1: return launch_blocks<Q4_1>(q, y, n, stream);
    case GgmlType::Q5_0: return launch_blocks<Q5_0>(q, y, n, stream);
    case GgmlType::Q5_1: return launch_blocks<Q5_1>(q, y, n, stream);
    case GgmlType::Q2_K: return launch_blocks<Q2_K>(q, y, n, stream);
    case GgmlType::Q3_K: return launch_blocks<Q3_K>(q, y, n, stream);
    case GgmlType::Q4_K: return launch_blocks<Q4_K>(q, y, n, stream);
    case GgmlType::Q5_K: return launch_blocks<Q5_K>(q, y, n, stream);
    case GgmlType::Q6_K: return launch_blocks<Q6_K>(q, y, n, stream);
    default: break;
  }
  throw Error(ErrorKind::Internal,
              std::string("cuda dequantize: no kernel for ggml type ") + ggml_type_name(ggml_type));
}

void dequantize_fp8_to_bf16(bool e5m2, const uint8_t* q, const float* scale, int64_t scale_count, bf16* y, int64_t rows,
                            int64_t cols, cudaStream_t stream) {
  const int64_t n = rows * cols, threads = (n + kValuesPerThread - 1) / kValuesPerThread;
  if (n <= 0) return;
  if (e5m2)
    dequantize_fp8_to_bf16<__NV_E5M2>
        <<<grid_for(threads, kBlock), kBlock, 0, stream>>>(q, scale, scale_count, y, n, cols);
  else
    dequantize_fp8_to_bf16<__NV_E4M3>
        <<<grid_for(threads, kBlock), kBlock, 0, stream>>>(q, scale, scale_count, y, n, cols);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
