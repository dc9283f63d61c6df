#include "pipeline/torch_rng.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#include "core/error.h"
#include "core/parallel.h"

namespace zimage {

// ---------------------------------------------------------------------------------------------------------
// CPU generator (aten/src/ATen/CPUGeneratorImpl.cpp, aten/src/ATen/core/DistributionsHelper.h)

TorchCpuGenerator::TorchCpuGenerator(uint64_t seed) : engine_(uint32_t(seed)) {}

uint32_t TorchCpuGenerator::random() { return uint32_t(engine_()); }

uint64_t TorchCpuGenerator::random64() {
  uint64_t hi = random();
  uint64_t lo = random();
  return (hi << 32) | lo;
}

// transformation::uniform_real: keep as many low bits as the type has mantissa digits, scale by 2^-digits.
float TorchCpuGenerator::uniform_float() { return float(random() & ((1u << 24) - 1)) * 0x1p-24f; }

double TorchCpuGenerator::uniform_double() {
  return double(random64() & ((uint64_t(1) << 53) - 1)) * 0x1p-53;
}

// at::normal_distribution<double>: Box-Muller on two uniform doubles; the sine half is cached on the
// generator and returned by the next call.
double TorchCpuGenerator::normal_double() {
  if (next_double_normal_) {
    double cached = *next_double_normal_;
    next_double_normal_.reset();
    return cached;
  }
  const double u1 = uniform_double();
  const double u2 = uniform_double();
  const double r = std::sqrt(-2.0 * std::log1p(-u2));
  const double theta = 2.0 * std::numbers::pi * u1;
  next_double_normal_ = r * std::sin(theta);
  return r * std::cos(theta);
}

namespace {

float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// PyTorch's x86 builds run normal_fill through its AVX2 kernel (normal_fill_16_AVX2), whose log and
// sin/cos are the Cephes-style polynomials of aten/src/ATen/native/cpu/avx_mathfun.h (log256_ps,
// sincos256_ps), not libm. The lanes are independent, so one lane is reproduced here in scalar float
// arithmetic, operation for operation. GCC builds that kernel with -mfma and contracts every multiply
// whose only use is an add into a fused multiply-add; those steps are written as std::fma (the golden
// draws are bit-exact only with them).

// log256_ps for one positive, normal lane.
float avx2_log(float x) {
  // x = m * 2^e with m in [0.5, 1); when m < sqrt(1/2), use 2m - 1 and e - 1 so that the polynomial
  // argument stays in [sqrt(1/2) - 1, sqrt(2)/2).
  const int32_t biased = int32_t(bits_from_float(x) >> 23);
  float m = float_from_bits((bits_from_float(x) & ~0x7f800000u) | bits_from_float(0.5f));
  float e = float(biased - 0x7f) + 1.0f;
  const bool small = m < 0.707106781186547524f;
  m = (m - 1.0f) + (small ? m : 0.0f);
  if (small) e -= 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  for (float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                  2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    y = std::fma(y, m, c);
  y = y * m;
  y = std::fma(y, z, e * -2.12194440e-4f);  // the low part of log(2)
  y = std::fma(-z, 0.5f, y);
  return std::fma(e, 0.693359375f, m + y);  // the high part of log(2)
}

// sincos256_ps for one lane: reduce by multiples of pi/4 (j even), evaluate the cosine and sine
// polynomials on the remainder and pick/sign them by octant.
void avx2_sincos(float x, float* sin_out, float* cos_out) {
  uint32_t sin_sign = bits_from_float(x) & 0x80000000u;
  x = std::fabs(x);
  const int32_t j = (int32_t(x * 1.27323954473516f) + 1) & ~1;  // 4/pi
  const float fj = float(j);
  // x - j * pi/4 with pi/4 split in three parts (Cephes DP1..DP3).
  x = std::fma(fj, -0.78515625f, x);
  x = std::fma(fj, -2.4187564849853515625e-4f, x);
  x = std::fma(fj, -3.77489497744594108e-8f, x);
  sin_sign ^= uint32_t(j & 4) << 29;
  const uint32_t cos_sign = uint32_t(~(j - 2) & 4) << 29;
  const bool swap = (j & 2) != 0;  // odd quadrant pair: sine and cosine polynomials trade places
  const float z = x * x;
  float yc = 2.443315711809948e-5f;
  yc = std::fma(yc, z, -1.388731625493765e-3f);
  yc = std::fma(yc, z, 4.166664568298827e-2f);
  yc = yc * z;
  yc = std::fma(yc, z, -(z * 0.5f)) + 1.0f;
  float ys = -1.9515295891e-4f;
  ys = std::fma(ys, z, 8.3321608736e-3f);
  ys = std::fma(ys, z, -1.6666654611e-1f);
  ys = ys * z;
  ys = std::fma(ys, x, x);
  *sin_out = float_from_bits(bits_from_float(swap ? yc : ys) ^ sin_sign);
  *cos_out = float_from_bits(bits_from_float(swap ? ys : yc) ^ cos_sign);
}

// normal_fill_16_AVX2: Box-Muller on 16 uniforms, the first 8 paired with the next 8. 2*pi is a float
// here (_mm256_set1_ps), and mean 0 / std 1 leave the final fused multiply-add exact.
void normal_fill_16(float* data) {
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1.0f - data[j];  // [0, 1) -> (0, 1] for the log
    const float u2 = data[j + 8];
    const float radius = std::sqrt(-2.0f * avx2_log(u1));
    float sin_theta, cos_theta;
    avx2_sincos(float(2.0 * std::numbers::pi) * u2, &sin_theta, &cos_theta);
    data[j] = radius * cos_theta;
    data[j + 8] = radius * sin_theta;
  }
}

}  // namespace

// templates::cpu::normal_kernel: float32 tensors of at least 16 values go through normal_fill_AVX2 (all
// uniforms drawn first, Box-Muller per block of 16, a ragged tail redone on 16 fresh uniforms over the last
// 16 values); smaller ones draw one at::normal_distribution<double> value per element.
void TorchCpuGenerator::randn(float* out, int64_t n) {
  if (n < 16) {
    for (int64_t i = 0; i < n; ++i) out[i] = float(normal_double());
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = uniform_float();
  // The blocks of 16 are independent once the uniforms are drawn.
  parallel_for(n / 16, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) normal_fill_16(out + 16 * b);
  });
  if (n % 16 != 0) {
    float* tail = out + n - 16;
    for (int i = 0; i < 16; ++i) tail[i] = uniform_float();
    normal_fill_16(tail);
  }
}

// ---------------------------------------------------------------------------------------------------------
// CUDA generator (curand_philox4x32_x.h, curand_kernel.h, curand_normal.h; torch's
// aten/src/ATen/native/cuda/DistributionTemplates.h)

namespace {

using Block = std::array<uint32_t, 4>;

// Adds n to the 128-bit counter {x, y, z, w} (x least significant), as Philox_State_Incr does.
void add_to_counter(Block& c, uint64_t n, int word) {
  uint64_t carry = n;
  for (int i = word; i < 4 && carry; ++i) {
    uint64_t sum = uint64_t(c[i]) + (carry & 0xffffffffu);
    c[i] = uint32_t(sum);
    carry = (carry >> 32) + (sum >> 32);
  }
}

}  // namespace

Block philox4x32_10(Block c, uint64_t key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // PHILOX_M4x32_0/1
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // PHILOX_W32_0/1 (key schedule)
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    const uint64_t p0 = uint64_t(kMul0) * c[0];
    const uint64_t p1 = uint64_t(kMul1) * c[2];
    c = {uint32_t(p1 >> 32) ^ c[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k1, uint32_t(p0)};
  }
  return c;
}

// curand_init: the subsequence is added to the high 64 bits of the counter (skipahead_sequence), the offset
// in units of 4-value blocks to the low 64 bits (skipahead).
CurandPhilox::CurandPhilox(uint64_t seed, uint64_t subsequence, uint64_t offset) : counter_{}, key_(seed) {
  ZI_ASSERT(offset % 4 == 0);
  add_to_counter(counter_, subsequence, 2);
  add_to_counter(counter_, offset / 4, 0);
}

Block CurandPhilox::next4() {
  Block out = philox4x32_10(counter_, key_);
  add_to_counter(counter_, 1, 0);
  return out;
}

namespace {

// One lane of curand_normal4: lanes 0/1 are the sine/cosine outputs of _curand_box_muller(x, y) on the
// first two words of a curand4 block, lanes 2/3 the same on the last two. This is the device branch.
// u and v come from fused multiply-adds (nvcc contracts `x * CURAND_2POW32_INV + CURAND_2POW32_INV/2`).
// logf and sqrtf are the accurate device functions, reproduced by correctly rounded host math.
// __sincosf is the hardware approximation: sm_90 code scales the argument to revolutions by a multiply by
// the float 1/(2 pi) rounded toward zero (FMUL.RZ), then MUFU.SIN/MUFU.COS approximate it; the exact
// sine/cosine of that scaled argument is the closest reproduction the host has (measured on an H100 over
// all 2^32 inputs of this path: within 3.6e-7 of MUFU, equal to it about 20% of the time).
float curand_normal4_lane(const Block& bits, int lane) {
  const uint32_t x = bits[lane & 2], y = bits[(lane & 2) + 1];
  constexpr float kInv32 = 2.3283064e-10f;                    // CURAND_2POW32_INV
  constexpr float kInv32TwoPi = 2.3283064e-10f * 6.2831855f;  // CURAND_2POW32_INV_2PI
  const float u = std::fma(float(x), kInv32, kInv32 / 2);
  const float v = std::fma(float(y), kInv32TwoPi, kInv32TwoPi / 2);
  const float s = std::sqrt(-2.0f * float(std::log(double(u))));
  // The product of two floats is exact in double; truncating it to float is the FMUL.RZ.
  const double revolutions_exact = double(v) * double(0.15915494f);
  float revolutions = float(revolutions_exact);
  if (double(revolutions) > revolutions_exact) revolutions = std::nextafter(revolutions, 0.0f);
  const double angle = 2.0 * std::numbers::pi * double(revolutions);
  const float trig = float(lane % 2 == 0 ? std::sin(angle) : std::cos(angle));
  return trig * s;
}

}  // namespace

TorchCudaGenerator::TorchCudaGenerator(uint64_t seed, int sm_count, int max_threads_per_sm)
    : seed_(seed), sm_count_(sm_count), max_threads_per_sm_(max_threads_per_sm) {
  ZI_CHECK(sm_count > 0 && max_threads_per_sm >= 256, ErrorKind::InvalidArgument,
           "TorchCudaGenerator: bad GPU description (" + std::to_string(sm_count) + " multiprocessors, " +
               std::to_string(max_threads_per_sm) + " threads each)");
}

// distribution_nullary_kernel + distribution_elementwise_grid_stride_kernel with unroll_factor 4 (a float4
// per curand_normal4 call). calc_execution_policy launches blocks of 256 threads, at most
// sm_count * (max_threads_per_sm / 256) of them, and reserves 4 offsets per curand call each thread makes.
// Thread t starts Philox subsequence t at the generator's offset and, on its k-th call, writes lane i of
// curand_normal4 to element t + T * (4k + i), T being the number of threads launched.
void TorchCudaGenerator::randn(float* out, int64_t n) {
  constexpr int64_t kBlockSize = 256, kUnroll = 4, kOffsetsPerCall = 4;
  // Past 2^31 values torch splits the launch (with_32bit_indexing); latents never get there.
  ZI_CHECK(n < (int64_t(1) << 31), ErrorKind::InvalidArgument,
           "TorchCudaGenerator: " + std::to_string(n) + " values need torch's split launch, not reproduced");
  if (n == 0) return;  // torch returns before touching the generator
  const int64_t blocks = std::min<int64_t>((n + kBlockSize - 1) / kBlockSize,
                                           int64_t(sm_count_) * (max_threads_per_sm_ / kBlockSize));
  const int64_t threads = blocks * kBlockSize;
  const int64_t calls_per_thread = (n - 1) / (threads * kUnroll) + 1;
  // CUDAGeneratorImpl::philox_cuda_state: this draw uses the current offset, the next one starts after it.
  const uint64_t offset = offset_;
  offset_ += uint64_t(calls_per_thread * kOffsetsPerCall);
  // GPU threads own disjoint elements and independent Philox streams: emulate them in parallel.
  parallel_for(std::min(threads, n), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      CurandPhilox state(seed_, uint64_t(t), offset);
      for (int64_t base = t; base < n; base += threads * kUnroll) {
        const Block r = state.next4();
        // Only the lanes that land inside the tensor are evaluated; the others are drawn and discarded.
        for (int lane = 0; lane < kUnroll && base + threads * lane < n; ++lane)
          out[base + threads * lane] = curand_normal4_lane(r, lane);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------

TorchGenerator::TorchGenerator(uint64_t seed, GeneratorDevice device, int cuda_sm_count) {
  if (device == GeneratorDevice::Cpu)
    cpu_.emplace(seed);
  else
    cuda_.emplace(seed, cuda_sm_count);
}

Tensor TorchGenerator::randn(const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::F32);
  if (cpu_)
    cpu_->randn(t.f32(), t.numel());
  else
    cuda_->randn(t.f32(), t.numel());
  return t;
}

Tensor torch_randn(const Shape& shape, uint64_t seed, GeneratorDevice device, int cuda_sm_count) {
  return TorchGenerator(seed, device, cuda_sm_count).randn(shape);
}

}  // namespace zimage
