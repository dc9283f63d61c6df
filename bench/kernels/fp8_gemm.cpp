// Times the W8A8 FP8 GEMM against the bf16 one at every GEMM shape of the full-size DiT (M = 4224 tokens at
// 1024^2, 16416 at 2048^2), with cuBLASLt's FP8 fast accumulation off and on, and measures each one's error
// against float64 of the same quantized values (a subsample of rows, at M = 4224; -1 where not measured): the data behind
// kFp8FastAccumulation (src/backend/cuda/gemm.h). Then one DiT block's four GEMMs (plus the activation
// quantizations) repeated for the 30 layers, as the denoising loop runs them, sustained at the power cap.
// Usage: bench_fp8_gemm [--json FILE]     (CUDA builds; needs an FP8 GPU: Hopper or newer)
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "core/dtype.h"

using namespace zimage;
using namespace zimage::cuda;

namespace {

template <class T>
T* device_copy(const std::vector<T>& v) {
  T* p = nullptr;
  ZI_CUDA_CHECK(cudaMalloc(&p, v.size() * sizeof(T)));
  ZI_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

struct Operands {
  int64_t m = 0, n = 0, k = 0;
  bf16 *x = nullptr, *w = nullptr, *y = nullptr;
  uint8_t *xq = nullptr, *wq = nullptr;
  float *xs = nullptr, *ws = nullptr;
  std::vector<uint8_t> host_wq;
  std::vector<float> host_ws;
};

// Normal activations with outlier tokens (x40 every 97th row), weights N(0, 1/K) quantized per row.
Operands make(int64_t m, int64_t n, int64_t k, std::mt19937& rng, cudaStream_t stream) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<bf16> x(size_t(m * k)), w(size_t(n * k));
  Tensor wf = Tensor::empty({n, k}, DType::F32);
  for (int64_t i = 0; i < m * k; ++i) x[size_t(i)] = __float2bfloat16(nd(rng) * ((i / k) % 97 == 0 ? 40.0f : 1.0f));
  for (int64_t i = 0; i < n * k; ++i) {
    w[size_t(i)] = __float2bfloat16(nd(rng) / std::sqrt(float(k)));
    wf.f32()[i] = __bfloat162float(w[size_t(i)]);
  }
  Operands o;
  o.m = m;
  o.n = n;
  o.k = k;
  const StoredWeight q = quantize_fp8_weight(wf);
  o.host_wq.assign(q.data.data_as<uint8_t>(), q.data.data_as<uint8_t>() + n * k);
  o.host_ws.assign(q.scale.f32(), q.scale.f32() + n);
  o.x = device_copy(x);
  o.w = device_copy(w);
  o.wq = device_copy(o.host_wq);
  o.ws = device_copy(o.host_ws);
  ZI_CUDA_CHECK(cudaMalloc(&o.y, size_t(m * n) * sizeof(bf16)));
  ZI_CUDA_CHECK(cudaMalloc(&o.xq, size_t(m * k)));
  ZI_CUDA_CHECK(cudaMalloc(&o.xs, size_t(m) * sizeof(float)));
  quantize_rows_e4m3(o.x, o.xq, o.xs, m, k, stream);
  return o;
}

void release(Operands& o) {
  for (void* p : {(void*)o.x, (void*)o.w, (void*)o.y, (void*)o.xq, (void*)o.wq, (void*)o.xs, (void*)o.ws}) cudaFree(p);
}

// ms per call of fn, over `reps` calls after one warm-up.
template <class Fn>
double time_ms(cudaStream_t stream, int reps, Fn fn) {
  fn();
  cudaEvent_t a, b;
  ZI_CUDA_CHECK(cudaEventCreate(&a));
  ZI_CUDA_CHECK(cudaEventCreate(&b));
  ZI_CUDA_CHECK(cudaEventRecord(a, stream));
  for (int r = 0; r < reps; ++r) fn();
  ZI_CUDA_CHECK(cudaEventRecord(b, stream));
  ZI_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  ZI_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return double(ms) / reps;
}

// ‖y − float64(quantized x · quantized w^T, scaled)‖ / ‖ref‖ over every 211th row.
double fp8_error(const Operands& o, cudaStream_t stream) {
  ZI_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<uint8_t> xq(size_t(o.m * o.k));
  std::vector<float> xs(size_t(o.m));
  std::vector<bf16> y(size_t(o.m * o.n));
  ZI_CUDA_CHECK(cudaMemcpy(xq.data(), o.xq, xq.size(), cudaMemcpyDeviceToHost));
  ZI_CUDA_CHECK(cudaMemcpy(xs.data(), o.xs, xs.size() * sizeof(float), cudaMemcpyDeviceToHost));
  ZI_CUDA_CHECK(cudaMemcpy(y.data(), o.y, y.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<double> wv(size_t(o.n * o.k));
  for (size_t i = 0; i < wv.size(); ++i) wv[i] = f8e4m3_to_f32(o.host_wq[i]);
  double num = 0, den = 0;
  std::vector<double> xv(size_t(o.k));
  for (int64_t i = 0; i < o.m; i += 211) {
    for (int64_t t = 0; t < o.k; ++t) xv[size_t(t)] = f8e4m3_to_f32(xq[size_t(i * o.k + t)]);
    for (int64_t j = 0; j < o.n; ++j) {
      double acc = 0;
      const double* wr = &wv[size_t(j * o.k)];
      for (int64_t t = 0; t < o.k; ++t) acc += xv[size_t(t)] * wr[t];
      acc *= double(xs[size_t(i)]) * o.host_ws[size_t(j)];
      const double got = __bfloat162float(y[size_t(i * o.n + j)]);
      num += (got - acc) * (got - acc);
      den += acc * acc;
    }
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--json") json_path = argv[i + 1];
  cudaDeviceProp prop{};
  ZI_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  ZI_CUDA_CHECK(cudaStreamCreate(&stream));
  cublasLtHandle_t lt;
  ZI_CUBLAS_CHECK(cublasLtCreate(&lt));
  Workspace ws;
  Gemm gemm(lt, ws);
  std::printf("FP8 vs bf16 GEMMs on %s (sm_%d%d), y[M,N] = x[M,K] w[N,K]^T\n", prop.name, prop.major, prop.minor);
  std::mt19937 rng(7);
  std::string rows = "[";
  struct Shape3 {
    const char* what;
    int64_t k, n;
  } shapes[] = {{"to_q|to_k|to_v", 3840, 11520}, {"to_out", 3840, 3840}, {"w1|w3", 3840, 20480}, {"w2", 10240, 3840}};
  for (const int64_t m : {int64_t(4224), int64_t(16416)})
    for (const auto& s : shapes) {
      Operands o = make(m, s.n, s.k, rng, stream);
      const double flop = 2.0 * double(m) * double(s.n) * double(s.k);
      const int reps = m > 8000 ? 10 : 30;
      const double bf = time_ms(stream, reps, [&] { gemm.linear(o.x, o.w, nullptr, o.y, m, s.n, s.k, stream); });
      const double quant = time_ms(stream, reps, [&] { quantize_rows_e4m3(o.x, o.xq, o.xs, m, s.k, stream); });
      double fp8[2], err[2];
      for (int fast = 0; fast < 2; ++fast) {
        fp8[fast] = time_ms(stream, reps, [&] {
          gemm.linear_fp8(o.xq, o.xs, o.wq, o.ws, nullptr, o.y, m, s.n, s.k, stream, fast == 1);
        });
        err[fast] = m < 8000 ? fp8_error(o, stream) : -1.0;  // the host's float64 check at the 1024^2 shapes only
      }
      std::printf(
          "M=%5lld %-15s K=%5lld N=%5lld: bf16 %6.0f TFLOP/s | FP8 %6.0f (fast accum %6.0f) TFLOP/s, %.2fx | quantize x "
          "%.1f us | error vs float64 %.2e (fast %.2e)\n",
          (long long)m, s.what, (long long)s.k, (long long)s.n, flop / bf / 1e9, flop / fp8[0] / 1e9, flop / fp8[1] / 1e9,
          bf / fp8[0], quant * 1e3, err[0], err[1]);
      char buf[512];
      std::snprintf(buf, sizeof buf,
                    "%s{\"m\": %lld, \"k\": %lld, \"n\": %lld, \"gemm\": \"%s\", \"bf16_ms\": %.5f, \"fp8_ms\": %.5f, "
                    "\"fp8_fast_accum_ms\": %.5f, \"quantize_ms\": %.5f, \"fp8_error\": %.3e, \"fp8_fast_accum_error\": %.3e}",
                    rows.size() > 1 ? ", " : "", (long long)m, (long long)s.k, (long long)s.n, s.what, bf, fp8[0], fp8[1],
                    quant, err[0], err[1]);
      rows += buf;
      release(o);
    }
  rows += "]";
  // 30 layers x the block's four GEMMs at M = 4224, back to back (the power cap sets the sustained clock).
  const int64_t m = 4224;
  std::vector<Operands> block;
  for (const auto& s : shapes) block.push_back(make(m, s.n, s.k, rng, stream));
  double layer[3];
  for (int mode = 0; mode < 3; ++mode)
    layer[mode] = time_ms(stream, 1, [&] {
                    for (int l = 0; l < 30 * 8; ++l)
                      for (auto& o : block) {
                        if (mode == 0) {
                          gemm.linear(o.x, o.w, nullptr, o.y, o.m, o.n, o.k, stream);
                        } else {
                          quantize_rows_e4m3(o.x, o.xq, o.xs, o.m, o.k, stream);
                          gemm.linear_fp8(o.xq, o.xs, o.wq, o.ws, nullptr, o.y, o.m, o.n, o.k, stream, mode == 2);
                        }
                      }
                  }) /
                  (30 * 8);
  std::printf("one block's 4 GEMMs at M=4224, 240 in a row (8 steps x 30 layers): bf16 %.3f ms, FP8 with quantize %.3f "
              "ms (fast accum %.3f ms): %.2fx\n",
              layer[0], layer[1], layer[2], layer[0] / layer[1]);
  for (auto& o : block) release(o);
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\"device\": \"" << prop.name << "\", \"shapes\": " << rows << ", \"sustained_block_ms\": {\"bf16\": "
        << layer[0] << ", \"fp8\": " << layer[1] << ", \"fp8_fast_accum\": " << layer[2] << "}}\n";
    std::printf("wrote %s\n", json_path.c_str());
  }
  cublasLtDestroy(lt);
  return 0;
}
