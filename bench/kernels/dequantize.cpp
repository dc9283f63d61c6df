// Times Backend::dequantize, the per-layer dequantization of quantized weights before their GEMM, for
// every format on the full-size DiT's largest matrix (the FFN's w1|w3 packed: 20480 x 3840, 78.6M
// values), and reports GB/s as (bytes read + bytes written) / time: quantized bytes in, 2 bytes of bf16
// out per value (CUDA) or 4 bytes of float32 (the CPU reference). The kernels are memory bound
// (src/backend/cuda/dequantize.cu states each one's budget): the number to compare is the device's
// memory bandwidth, ~4.8 TB/s on an H200.
// Usage: bench_dequantize [cpu|cuda] (default: cuda when a GPU is present).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "backend/backend.h"
#include "core/dtype.h"
#include "io/gguf.h"

using namespace zimage;

namespace {

constexpr int64_t kRows = 20480, kCols = 3840;

// Host weights in `type` (a ggml block type, or F8E4M3 / F8E5M2 with a per-tensor scale) from random
// values: quantized with ggml_quantize where this build has a quantizer, else random blocks with sane scales.
StoredWeight make_weight(const std::string& format, std::mt19937& rng) {
  StoredWeight w;
  w.shape = {kRows, kCols};
  if (format == "fp8_e4m3" || format == "fp8_e5m2") {
    w.data = Tensor::empty(w.shape, format == "fp8_e4m3" ? DType::F8E4M3 : DType::F8E5M2);
    for (int64_t i = 0; i < kRows * kCols; ++i) w.data.data_as<uint8_t>()[i] = uint8_t(rng() & 0x77);  // finite
    w.scale = Tensor::from_f32({1}, {0.01f});
    return w;
  }
  const struct {
    const char* name;
    GgmlType type;
  } kTypes[] = {{"q8_0", GgmlType::Q8_0}, {"q4_0", GgmlType::Q4_0}, {"q4_1", GgmlType::Q4_1}, {"q5_0", GgmlType::Q5_0},
                {"q5_1", GgmlType::Q5_1}, {"q2_k", GgmlType::Q2_K}, {"q3_k", GgmlType::Q3_K}, {"q4_k", GgmlType::Q4_K},
                {"q5_k", GgmlType::Q5_K}, {"q6_k", GgmlType::Q6_K}};
  for (const auto& t : kTypes) {
    if (format != t.name) continue;
    int64_t be = 0, bb = 0;
    ggml_block_layout(uint32_t(t.type), &be, &bb);
    w.ggml_type = uint32_t(t.type);
    w.data = Tensor::empty({kRows, kCols / be * bb}, DType::U8);
    // Random bytes with every 16-bit word a small finite fp16 (exponent bits cleared): scales stay finite.
    auto* p = w.data.data_as<uint8_t>();
    for (size_t i = 0; i < w.data.nbytes(); ++i) p[i] = uint8_t(i % 2 ? rng() & 0x83 : rng());
    return w;
  }
  std::fprintf(stderr, "unknown format %s\n", format.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : (cuda_device_count() > 0 ? "cuda" : "cpu");
  auto be = which == "cuda" ? make_cuda_backend(0) : make_cpu_backend();
  std::printf("dequantize %lld x %lld on %s\n", (long long)kRows, (long long)kCols, be->name().c_str());
  std::mt19937 rng(1);
  const int reps = which == "cuda" ? 50 : 2;
  for (const char* format :
       {"fp8_e4m3", "fp8_e5m2", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}) {
    const StoredWeight host = make_weight(format, rng);
    StoredWeight w = host;
    w.data = be->upload(host.data, host.data.dtype());
    if (host.scale.defined()) w.scale = be->upload(host.scale, DType::F32);
    be->dequantize(w);  // warm up
    be->synchronize();
    auto from = be->mark();
    for (int r = 0; r < reps; ++r) be->dequantize(w);
    auto to = be->mark();
    const double ms = be->elapsed_ms(from, to) / reps;
    const double bytes =
        double(host.data.nbytes()) + double(kRows * kCols) * double(dtype_size(be->activation_dtype()));
    std::printf("%-9s %7.2f bits/value  %9.3f ms  %8.1f GB/s\n", format,
                8.0 * double(host.data.nbytes()) / double(kRows * kCols), ms, bytes / ms / 1e6);
  }
  return 0;
}
