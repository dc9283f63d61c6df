// Elementwise kernels of the CUDA backend (bf16 storage, float32 math): dtype casts, x += y, SiLU,
// SwiGLU on a packed w1|w3 projection, x * scale + shift, the [-1, 1] image -> uint8 conversion and
// the count of non-finite values behind the numerical guards.
// CPU references: the ops of the same names in src/backend/cpu/cpu_backend.cpp.
//
// All of them are memory bound (a few flops per element), so the bound they chase is DRAM bandwidth,
// ~4.2 TB/s on H200 (~3.35 TB/s on H100): time >= bytes moved / bandwidth, stated above each kernel.
// A thread moves one 16-byte vector (8 bf16) when the pointers are 16-byte aligned; otherwise, and for
// the last n % 8 elements, threads take single elements ("tail" threads).
#include <algorithm>
#include <cstdint>

#include "backend/cuda/bf16_vec.cuh"
#include "backend/cuda/kernels.h"

namespace zimage::cuda {

namespace {

constexpr int kBlock = 256;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Work split of n elements: `vecs` threads take 8 elements each (elements [0, 8*vecs)), then one
// thread per remaining element. vecs = 0 when the pointers do not allow 16-byte access.
struct Split8 {
  int64_t vecs;
  int64_t threads;
};
Split8 split8(int64_t n, bool vector_ok) {
  const int64_t vecs = vector_ok ? n / 8 : 0;
  return {vecs, vecs + (n - 8 * vecs)};
}

__device__ __forceinline__ int64_t thread_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }

// ---- casts ----

// y[i] = bf16(x[i]) (round to nearest even). Reads 4n + writes 2n bytes; memory bound.
__global__ void cast_f32_to_bf16_kernel(const float* __restrict__ x, bf16* __restrict__ y, int64_t n, int64_t vecs) {
  const int64_t i = thread_index();
  if (i < vecs) {
    const float4 a = reinterpret_cast<const float4*>(x)[2 * i];
    const float4 b = reinterpret_cast<const float4*>(x)[2 * i + 1];
    const float f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    reinterpret_cast<uint4*>(y)[i] = pack8(f);
  } else {
    const int64_t j = 8 * vecs + (i - vecs);
    if (j < n) y[j] = __float2bfloat16_rn(x[j]);
  }
}

// y[i] = float(x[i]) (exact). Reads 2n + writes 4n bytes; memory bound.
__global__ void cast_bf16_to_f32_kernel(const bf16* __restrict__ x, float* __restrict__ y, int64_t n, int64_t vecs) {
  const int64_t i = thread_index();
  if (i < vecs) {
    float f[8];
    unpack8(reinterpret_cast<const uint4*>(x)[i], f);
    float4* o = reinterpret_cast<float4*>(y) + 2 * i;
    o[0] = make_float4(f[0], f[1], f[2], f[3]);
    o[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    const int64_t j = 8 * vecs + (i - vecs);
    if (j < n) y[j] = __bfloat162float(x[j]);
  }
}

// ---- x += y ----

// x[i] = bf16(float(x[i]) + float(y[i])). Reads 4n + writes 2n bytes; memory bound.
__global__ void add_inplace_kernel(bf16* __restrict__ x, const bf16* __restrict__ y, int64_t n, int64_t vecs) {
  const int64_t i = thread_index();
  if (i < vecs) {
    float a[8], b[8];
    unpack8(reinterpret_cast<const uint4*>(x)[i], a);
    unpack8(reinterpret_cast<const uint4*>(y)[i], b);
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] += b[k];
    reinterpret_cast<uint4*>(x)[i] = pack8(a);
  } else {
    const int64_t j = 8 * vecs + (i - vecs);
    if (j < n) x[j] = __float2bfloat16_rn(__bfloat162float(x[j]) + __bfloat162float(y[j]));
  }
}

// ---- unary maps: silu, scale_shift, clamp ----

struct SiluOp {
  __device__ float operator()(float v) const { return v / (1.0f + __expf(-v)); }
};
struct ScaleShiftOp {
  float scale, shift;
  __device__ float operator()(float v) const { return fmaf(v, scale, shift); }
};
struct ClampOp {
  float lo, hi;
  __device__ float operator()(float v) const { return fminf(fmaxf(v, lo), hi); }
};

// y[i] = op(x[i]). Reads 2n + writes 2n bytes; memory bound.
template <typename Op>
__global__ void map_bf16_kernel(const bf16* __restrict__ x, bf16* __restrict__ y, int64_t n, int64_t vecs, Op op) {
  const int64_t i = thread_index();
  if (i < vecs) {
    float f[8];
    unpack8(reinterpret_cast<const uint4*>(x)[i], f);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = op(f[k]);
    reinterpret_cast<uint4*>(y)[i] = pack8(f);
  } else {
    const int64_t j = 8 * vecs + (i - vecs);
    if (j < n) y[j] = __float2bfloat16_rn(op(__bfloat162float(x[j])));
  }
}

template <typename Op>
void launch_map_bf16(const bf16* x, bf16* y, int64_t n, Op op, cudaStream_t stream) {
  if (n <= 0) return;
  const Split8 s = split8(n, aligned16(x) && aligned16(y));
  map_bf16_kernel<<<grid_for(s.threads, kBlock), kBlock, 0, stream>>>(x, y, n, s.vecs, op);
  ZI_CUDA_LAUNCH_CHECK();
}

// ---- swiglu ----

// x [rows, 2f] -> y [rows, f], y[r, j] = silu(x[r, j]) * x[r, f + j].
// Grid: x over column units of a row (8 columns when vectorized, else 1), y over rows (strided, as rows
// may exceed gridDim.y's 65535). Reads 4*rows*f + writes 2*rows*f bytes; memory bound.
__global__ void swiglu_kernel(const bf16* __restrict__ x, bf16* __restrict__ y, int64_t rows, int64_t f, bool vec) {
  const int64_t unit = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t units = vec ? f / 8 : f;
  if (unit >= units) return;
  const SiluOp silu_op;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const bf16* gate = x + r * 2 * f;
    const bf16* up = gate + f;
    bf16* out = y + r * f;
    if (vec) {
      float g[8], u[8];
      unpack8(reinterpret_cast<const uint4*>(gate)[unit], g);
      unpack8(reinterpret_cast<const uint4*>(up)[unit], u);
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = silu_op(g[k]) * u[k];
      reinterpret_cast<uint4*>(out)[unit] = pack8(g);
    } else {
      out[unit] = __float2bfloat16_rn(silu_op(__bfloat162float(gate[unit])) * __bfloat162float(up[unit]));
    }
  }
}

// x [rows, 2f] -> e4m3 codes q [rows, f] and scale [rows] of swiglu(x) rounded to bf16: what swiglu_kernel
// writes, quantized as quantize_rows_e4m3 does (the input of an FP8 w2). One block per row, two passes over
// the row's 4f bytes (the second from L2): reads 8f bytes, writes f + 4, instead of swiglu's 4f + 2f and the
// quantization's 4f + f.
template <int kW>
__global__ void swiglu_e4m3_kernel(const bf16* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                   int64_t f) {
  __shared__ float red[32];
  const SiluOp silu_op;
  const int64_t row = blockIdx.x;
  const bf16* gate = x + row * 2 * f;
  const bf16* up = gate + f;
  // silu(g) * u rounded to bf16 and back, as the stored swiglu output holds it.
  auto values = [&](int64_t i, float (&out)[kW]) {
    float g[kW], u[kW];
    unpack<kW>(load_vec<kW>(gate + i), g);
    unpack<kW>(load_vec<kW>(up + i), u);
#pragma unroll
    for (int k = 0; k < kW; ++k) out[k] = silu_op(g[k]) * u[k];
    unpack<kW>(pack<kW>(out), out);
  };
  quantize_row_e4m3<kW>(f, values, q + row * f, scale + row, red);
}

// ---- image_to_u8 ----

// round-half-even(clamp(v/2 + 0.5, 0, 1) * 255); v*0.5 is exact, so a fused multiply-add here rounds
// like the CPU's v/2 + 0.5. NaN maps to 0 (fmaxf drops it).
__device__ __forceinline__ uint32_t to_u8(float v) {
  const float t = fminf(fmaxf(v * 0.5f + 0.5f, 0.0f), 1.0f) * 255.0f;
  return uint32_t(__float2int_rn(t));
}

// x [n] bf16 in [-1, 1] -> y [n] uint8. Vectors: 16 bytes in, 8 bytes out (y must be 8-byte aligned).
// Reads 2n + writes n bytes; memory bound.
__global__ void image_to_u8_kernel(const bf16* __restrict__ x, uint8_t* __restrict__ y, int64_t n, int64_t vecs) {
  const int64_t i = thread_index();
  if (i < vecs) {
    float f[8];
    unpack8(reinterpret_cast<const uint4*>(x)[i], f);
    const uint32_t lo = to_u8(f[0]) | (to_u8(f[1]) << 8) | (to_u8(f[2]) << 16) | (to_u8(f[3]) << 24);
    const uint32_t hi = to_u8(f[4]) | (to_u8(f[5]) << 8) | (to_u8(f[6]) << 16) | (to_u8(f[7]) << 24);
    reinterpret_cast<uint2*>(y)[i] = make_uint2(lo, hi);
  } else {
    const int64_t j = 8 * vecs + (i - vecs);
    if (j < n) y[j] = uint8_t(to_u8(__bfloat162float(x[j])));
  }
}

// ---- u8_to_image ----

// x [n] uint8 -> y [n] bf16 2 * (x / 255) - 1: an IEEE division (no fast math), and 2 * q is exact, so a
// fused multiply-add gives the CPU's float32 value; then rounded once to bf16. Reads n, writes 2n bytes.
__global__ void u8_to_image_kernel(const uint8_t* __restrict__ x, bf16* __restrict__ y, int64_t n) {
  const int64_t i = thread_index();
  if (i < n) y[i] = __float2bfloat16_rn(2.0f * (float(x[i]) / 255.0f) - 1.0f);
}

// ---- count_non_finite ----

// *count += #{i : x[i] is NaN or Inf}: the exponent bits (`exp_mask`) all set. Grid-stride, one atomic
// per warp. Reads n * sizeof(Bits) bytes, nothing written but the count: memory bound (the decoded
// 1024^2 image, 6 MiB of bf16: ~2 us on an H200).
template <typename Bits>
__global__ void count_non_finite_kernel(const Bits* __restrict__ x, int64_t n, Bits exp_mask, int* __restrict__ count) {
  int local = 0;
  for (int64_t i = thread_index(); i < n; i += int64_t(gridDim.x) * blockDim.x) local += (x[i] & exp_mask) == exp_mask;
  local = __reduce_add_sync(0xffffffffu, local);
  if ((threadIdx.x & 31) == 0 && local) atomicAdd(count, local);
}

template <typename Bits>
void launch_count_non_finite(const void* x, int64_t n, Bits exp_mask, int* count, cudaStream_t stream) {
  if (n <= 0) return;
  // Enough blocks to fill an H200 several times over; each thread then strides through the rest.
  const unsigned grid = std::min(grid_for(n, kBlock), 132u * 8u);
  count_non_finite_kernel<Bits><<<grid, kBlock, 0, stream>>>(static_cast<const Bits*>(x), n, exp_mask, count);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace

void count_non_finite_f32(const float* x, int64_t n, int* count, cudaStream_t stream) {
  launch_count_non_finite<uint32_t>(x, n, 0x7f800000u, count, stream);
}

void count_non_finite_bf16(const bf16* x, int64_t n, int* count, cudaStream_t stream) {
  launch_count_non_finite<uint16_t>(x, n, uint16_t(0x7f80), count, stream);
}

void cast_f32_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const Split8 s = split8(n, aligned16(x) && aligned16(y));
  cast_f32_to_bf16_kernel<<<grid_for(s.threads, kBlock), kBlock, 0, stream>>>(x, y, n, s.vecs);
  ZI_CUDA_LAUNCH_CHECK();
}

void cast_bf16_to_f32(const bf16* x, float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const Split8 s = split8(n, aligned16(x) && aligned16(y));
  cast_bf16_to_f32_kernel<<<grid_for(s.threads, kBlock), kBlock, 0, stream>>>(x, y, n, s.vecs);
  ZI_CUDA_LAUNCH_CHECK();
}

void add_inplace(bf16* x, const bf16* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const Split8 s = split8(n, aligned16(x) && aligned16(y));
  add_inplace_kernel<<<grid_for(s.threads, kBlock), kBlock, 0, stream>>>(x, y, n, s.vecs);
  ZI_CUDA_LAUNCH_CHECK();
}

void silu(const bf16* x, bf16* y, int64_t n, cudaStream_t stream) { launch_map_bf16(x, y, n, SiluOp{}, stream); }

void scale_shift(const bf16* x, bf16* y, int64_t n, float scale, float shift, cudaStream_t stream) {
  launch_map_bf16(x, y, n, ScaleShiftOp{scale, shift}, stream);
}

void clamp(const bf16* x, bf16* y, int64_t n, float lo, float hi, cudaStream_t stream) {
  launch_map_bf16(x, y, n, ClampOp{lo, hi}, stream);
}

void swiglu(const bf16* x, bf16* y, int64_t rows, int64_t f, cudaStream_t stream) {
  if (rows <= 0 || f <= 0) return;
  // Rows start 16-byte aligned in x (stride 2f) and y (stride f), and the up half at +f, iff f % 8 == 0.
  const bool vec = f % 8 == 0 && aligned16(x) && aligned16(y);
  const int64_t units = vec ? f / 8 : f;
  const dim3 grid(grid_for(units, kBlock), unsigned(rows < 65535 ? rows : 65535));
  swiglu_kernel<<<grid, kBlock, 0, stream>>>(x, y, rows, f, vec);
  ZI_CUDA_LAUNCH_CHECK();
}

void swiglu_e4m3(const bf16* x, uint8_t* q, float* scale, int64_t rows, int64_t f, cudaStream_t stream) {
  if (rows <= 0 || f <= 0) return;
  const bool vec = f % 8 == 0 && aligned16(x) && (reinterpret_cast<uintptr_t>(q) & 7) == 0;
  if (vec) swiglu_e4m3_kernel<8><<<unsigned(rows), kBlock, 0, stream>>>(x, q, scale, f);
  else swiglu_e4m3_kernel<1><<<unsigned(rows), kBlock, 0, stream>>>(x, q, scale, f);
  ZI_CUDA_LAUNCH_CHECK();
}

void u8_to_image(const uint8_t* x, bf16* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  u8_to_image_kernel<<<grid_for(n, kBlock), kBlock, 0, stream>>>(x, y, n);
  ZI_CUDA_LAUNCH_CHECK();
}

void image_to_u8(const bf16* x, uint8_t* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const bool vec = aligned16(x) && (reinterpret_cast<uintptr_t>(y) & 7) == 0;
  const Split8 s = split8(n, vec);
  image_to_u8_kernel<<<grid_for(s.threads, kBlock), kBlock, 0, stream>>>(x, y, n, s.vecs);
  ZI_CUDA_LAUNCH_CHECK();
}

}  // namespace zimage::cuda
