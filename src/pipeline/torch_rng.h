// Host reproduction of torch.randn(shape, generator=torch.Generator(device).manual_seed(seed)) in float32,
// so that a seed gives the same starting latents as the diffusers pipeline, for either generator device.
// Both PyTorch generators are reproduced on the host: the CPU one (MT19937 + normal_fill) and the CUDA one
// (curand Philox4x32-10 + curand_normal4, laid out by torch's grid-stride distribution kernel).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <random>

#include "core/tensor.h"

namespace zimage {

enum class GeneratorDevice { Cpu, Cuda };

// at::CPUGeneratorImpl after manual_seed(seed). Its engine, at::mt19937, is the reference MT19937
// seeded with the low 32 bits of the seed, which is exactly what std::mt19937 computes.
class TorchCpuGenerator {
 public:
  explicit TorchCpuGenerator(uint64_t seed);

  uint32_t random();        // CPUGeneratorImpl::random
  uint64_t random64();      // CPUGeneratorImpl::random64: the first draw is the high word
  float uniform_float();    // at::uniform_real_distribution<float>(0, 1): low 24 bits of one draw
  double uniform_double();  // at::uniform_real_distribution<double>(0, 1): low 53 bits of a 64-bit draw
  double normal_double();   // at::normal_distribution<double>(0, 1), using the generator's cached sample

  // templates::cpu::normal_kernel with mean 0, std 1 on a contiguous float32 tensor of n values, as
  // PyTorch's x86 builds run it (the AVX2 kernel).
  void randn(float* out, int64_t n);

 private:
  std::mt19937 engine_;
  std::optional<double> next_double_normal_;  // CPUGeneratorImpl::next_double_normal_sample_
};

// curand_Philox4x32_10: ten rounds of Philox-4x32 over a 128-bit counter with a 64-bit key.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, uint64_t key);

// A curandStatePhilox4_32_10_t after curand_init(seed, subsequence, offset) with offset a multiple of 4
// (torch rounds every philox offset increment up to a multiple of 4, and a fresh generator starts at 0),
// so the state always sits at the start of a 4-value block.
class CurandPhilox {
 public:
  CurandPhilox(uint64_t seed, uint64_t subsequence, uint64_t offset);

  std::array<uint32_t, 4> next4();  // curand4: the four words that one curand_normal4 call consumes

 private:
  std::array<uint32_t, 4> counter_;
  uint64_t key_;
};

// at::CUDAGeneratorImpl after manual_seed(seed) on a GPU with `sm_count` multiprocessors of
// `max_threads_per_sm` threads each (132 and 2048: an H100 SXM; H200 and A100 also allow 2048 threads):
// a Philox seed and a per-thread offset that every draw advances.
class TorchCudaGenerator {
 public:
  explicit TorchCudaGenerator(uint64_t seed, int sm_count = 132, int max_threads_per_sm = 2048);

  // templates::cuda::normal_kernel with mean 0, std 1 on a contiguous float32 tensor of n values.
  void randn(float* out, int64_t n);
  uint64_t philox_offset() const { return offset_; }  // CUDAGeneratorImpl::philox_offset_per_thread

 private:
  uint64_t seed_;
  uint64_t offset_ = 0;
  int sm_count_;
  int max_threads_per_sm_;
};

// One torch.Generator(device).manual_seed(seed) whose successive randn calls continue its stream: how
// diffusers' image-to-image draws the VAE posterior's sample and then the noise from one generator.
class TorchGenerator {
 public:
  TorchGenerator(uint64_t seed, GeneratorDevice device, int cuda_sm_count = 132);
  Tensor randn(const Shape& shape);  // float32, as torch.randn(shape, generator=this)

 private:
  std::optional<TorchCpuGenerator> cpu_;
  std::optional<TorchCudaGenerator> cuda_;
};

// Same values as torch.randn(shape, generator=torch.Generator(device).manual_seed(seed)) in float32.
// The CUDA values depend on the GPU's multiprocessor count once the tensor holds more than
// cuda_sm_count * 2048 values (the most threads torch launches on an H100/H200-class GPU).
Tensor torch_randn(const Shape& shape, uint64_t seed, GeneratorDevice device, int cuda_sm_count = 132);

}  // namespace zimage
