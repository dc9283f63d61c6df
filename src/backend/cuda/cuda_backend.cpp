// The CUDA implementation of the Backend interface: bf16 activations and weights on one device and
// one stream; GEMMs through cuBLASLt (gemm.cpp), attention through cuDNN SDPA with our own fallback
// (attention.cpp), convolutions through cuDNN (conv2d.cpp), everything else our kernels (kernels.h).
// Each op's float32 reference is the same-named op of cpu/cpu_backend.cpp.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>

#include "backend/backend.h"
#include "backend/cuda/attention.h"
#include "backend/cuda/conv2d.h"
#include "backend/cuda/cuda_common.h"
#include "backend/cuda/device_allocator.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "core/parallel.h"

namespace zimage {

namespace cuda {

void throw_cuda_error(const char* what, const std::string& detail, const char* file, int line, bool oom) {
  throw Error(oom ? ErrorKind::OutOfMemory : ErrorKind::Backend,
              std::string("CUDA error in ") + what + ": " + detail + " (" + file + ":" + std::to_string(line) + ")");
}

cudnnStatus_t cudnn_execute(cudnnHandle_t handle, cudnnBackendDescriptor_t plan, const int64_t* uids,
                            void* const* pointers, int64_t n, void* workspace) {
  cudnnBackendDescriptor_t pack = nullptr;
  cudnnStatus_t s = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
  if (s != CUDNN_STATUS_SUCCESS) return s;
  s = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids);
  if (s == CUDNN_STATUS_SUCCESS)
    s = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, pointers);
  if (s == CUDNN_STATUS_SUCCESS)
    s = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendFinalize(pack);
  if (s == CUDNN_STATUS_SUCCESS) s = cudnnBackendExecute(handle, plan, pack);
  cudnnBackendDestroyDescriptor(pack);
  return s;
}

int fastest_candidate(int n, cudaStream_t stream, const std::function<bool(int)>& run, std::vector<float>* times) {
  constexpr int kTimedRuns = 3;
  constexpr float kClearlyFaster = 0.9f, kMinTimedMs = 0.05f;
  cudaEvent_t begin = nullptr, end = nullptr;
  ZI_CUDA_CHECK(cudaEventCreate(&begin));
  const cudaError_t e = cudaEventCreate(&end);
  if (e != cudaSuccess) {
    cudaEventDestroy(begin);
    ZI_CUDA_CHECK(e);
  }
  int best = -1;
  float best_ms = 0;
  cudaError_t status = cudaSuccess;
  for (int i = 0; i < n && status == cudaSuccess; ++i) {
    bool ok = run(i);  // warm-up
    status = cudaEventRecord(begin, stream);
    for (int r = 0; r < kTimedRuns && ok; ++r) ok = run(i);
    if (status == cudaSuccess) status = cudaEventRecord(end, stream);
    if (status == cudaSuccess) status = cudaEventSynchronize(end);
    float ms = 0;
    if (status == cudaSuccess) status = cudaEventElapsedTime(&ms, begin, end);
    ms /= kTimedRuns;
    if (times) times->push_back(ok ? ms : -1.0f);
    if (ok && (best < 0 || ms < best_ms * kClearlyFaster)) {
      best = i;
      best_ms = ms;
    }
    if (best == 0 && i == 0 && best_ms < kMinTimedMs) break;
  }
  cudaEventDestroy(begin);
  cudaEventDestroy(end);
  ZI_CUDA_CHECK(status);
  return best;
}

Workspace::~Workspace() {
  if (ptr_) cudaFree(ptr_);
  for (void* p : retired_) cudaFree(p);
}

void* Workspace::get(size_t bytes) {
  if (bytes <= bytes_) return ptr_;
  // A grown workspace keeps its old buffer until the backend goes: recorded graphs replay into it.
  if (ptr_) retired_.push_back(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
  ZI_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  bytes_ = bytes;
  return ptr_;
}

namespace {

int64_t rows_of(const Tensor& t) { return t.numel() / t.dim(-1); }

const bf16* cbf(const Tensor& t) { return static_cast<const bf16*>(t.data()); }
bf16* mbf(const Tensor& t) { return static_cast<bf16*>(t.data()); }
const bf16* cbf_or_null(const Tensor* t) { return t ? cbf(*t) : nullptr; }

// Makes `device` the calling thread's current GPU for a scope and gives the caller's back after. Every
// entry point of a backend opens one, so a backend works from any thread whatever GPU it has current
// (one thread may hold a backend per GPU: the multi-GPU pipeline and its tests create them in turn).
// cudaGetDevice reads thread-local state: tens of nanoseconds per op.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    ZI_CUDA_CHECK(cudaGetDevice(&caller_));
    if (caller_ == device)
      caller_ = -1;
    else
      ZI_CUDA_CHECK(cudaSetDevice(device));
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  ~DeviceScope() {
    if (caller_ >= 0) cudaSetDevice(caller_);
  }

 private:
  int caller_ = -1;
};

class CudaBackend;

// Backend::Graph on CUDA (backend.h): the first call runs fn, the second records it into a CUDA graph
// over buffers reserved for it (DeviceAllocator::Pool), later calls copy their inputs into the
// recorded ones and replay. What a replay saves is the host's launch work: ~1000 kernels and library
// calls per DiT forward become one cudaGraphLaunch.
class CudaGraph final : public Backend::Graph {
 public:
  CudaGraph(CudaBackend& be, Backend::GraphFn fn) : be_(be), fn_(std::move(fn)) {}
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  ~CudaGraph() override;
  Tensor operator()(const std::vector<Tensor>& inputs) override;
  bool recorded() const override { return exec_ != nullptr; }

 private:
  // Records fn on input buffers of `like`'s shapes, allocated (like everything fn allocates) in a new pool.
  void record(const std::vector<Tensor>& like);

  CudaBackend& be_;
  Backend::GraphFn fn_;
  int64_t calls_ = 0;
  std::shared_ptr<DeviceAllocator::Pool> pool_;
  std::vector<Tensor> inputs_;  // the recorded inputs: a replay reads these addresses
  Tensor output_;               // and writes this one
  cudaGraphExec_t exec_ = nullptr;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    ZI_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    ZI_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    device_name_ = prop.name;
    ZI_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    ZI_CUBLAS_CHECK(cublasLtCreate(&lt_));
    ZI_CUDNN_CHECK(cudnnCreate(&cudnn_));
    ZI_CUDNN_CHECK(cudnnSetStream(cudnn_, stream_));
    alloc_ = std::make_shared<cuda::DeviceAllocator>();
    gemm_ = std::make_unique<Gemm>(lt_, workspace_);
    attention_ = std::make_unique<Attention>(cudnn_, workspace_);
    conv_ = std::make_unique<Conv2d>(cudnn_, workspace_);
  }
  ~CudaBackend() override {
    DeviceScope on(device_);
    cudaStreamSynchronize(stream_);
    for (int k = 0; k < 2; ++k)
      if (staging_[k]) {
        cudaFreeHost(staging_[k]);
        cudaEventDestroy(staging_free_[k]);
      }
    conv_.reset();
    attention_.reset();
    gemm_.reset();
    alloc_.reset();
    cudnnDestroy(cudnn_);
    cublasLtDestroy(lt_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda:" + std::to_string(device_) + " " + device_name_ + " (bf16)"; }
  DType activation_dtype() const override { return DType::BF16; }
  void synchronize() override { ZI_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  void* native_stream() override { return stream_; }
  MemoryStats memory_stats() const override {
    return {alloc_->bytes_in_use(), alloc_->peak_bytes_in_use(), alloc_->bytes_cached()};
  }
  void reset_peak_memory() override { alloc_->reset_peak(); }

  Mark mark() override {
    DeviceScope on(device_);
    auto* ev = new cudaEvent_t;
    ZI_CUDA_CHECK(cudaEventCreate(ev));
    ZI_CUDA_CHECK(cudaEventRecord(*ev, stream_));
    return Mark(ev, [](void* p) {
      auto* e = static_cast<cudaEvent_t*>(p);
      cudaEventDestroy(*e);
      delete e;
    });
  }
  double elapsed_ms(const Mark& from, const Mark& to) override {
    auto a = *static_cast<cudaEvent_t*>(from.get()), b = *static_cast<cudaEvent_t*>(to.get());
    ZI_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    ZI_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  }
  void wait(const Mark& m) override { ZI_CUDA_CHECK(cudaEventSynchronize(*static_cast<cudaEvent_t*>(m.get()))); }
  void set_op_profiling(bool on) override { profiling_ = on; }
  std::vector<OpTime> take_op_profile() override {
    std::map<std::string, OpTime> agg;
    for (const auto& r : op_records_) {
      OpTime& t = agg[r.op];
      t.op = r.op;
      t.calls += 1;
      t.ms += elapsed_ms(r.begin, r.end);
    }
    op_records_.clear();
    std::vector<OpTime> out;
    for (auto& kv : agg) out.push_back(kv.second);
    std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
    return out;
  }

  Tensor empty(const Shape& shape, DType dtype) override {
    DeviceScope on(device_);
    size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
    auto mem = alloc_->allocate(std::max<size_t>(bytes, 1));
    // ZIMAGE_POISON=1 fills new buffers with 0xff (NaN in f32 and bf16): tests use it to prove that
    // every op writes every output element.
    if (poison_ && bytes) ZI_CUDA_CHECK(cudaMemsetAsync(mem.get(), 0xff, bytes, stream_));
    return Tensor::wrap(mem.get(), shape, dtype, Device::Cuda, mem);
  }

  Tensor upload(const Tensor& host, DType dtype) override {
    DeviceScope on(device_);
    ZI_ASSERT(host.device() == Device::Host);
    Tensor src = host.is_contiguous() ? host : host.clone();
    if (src.dtype() != dtype) src = src.to_dtype(dtype);
    Tensor t = empty(src.shape(), dtype);
    copy_from_host(src.data(), t.data(), t.nbytes());
    return t;
  }
  Tensor upload_rows(const std::vector<Tensor>& parts, DType dtype) override {
    DeviceScope on(device_);
    ZI_ASSERT(!parts.empty());
    const int64_t k = parts[0].dim(-1);
    int64_t rows = 0;
    for (const auto& p : parts) {
      ZI_ASSERT(p.device() == Device::Host && p.ndim() == 2 && p.dim(1) == k);
      rows += p.dim(0);
    }
    Tensor t = empty({rows, k}, dtype);
    char* dst = static_cast<char*>(t.data());
    for (const auto& p : parts) {  // each part from the mapped checkpoint straight into its rows
      Tensor src = p.is_contiguous() ? p : p.clone();
      if (src.dtype() != dtype) src = src.to_dtype(dtype);
      copy_from_host(src.data(), dst, src.nbytes());
      dst += src.nbytes();
    }
    return t;
  }

  Tensor to_host_f32(const Tensor& t) override {
    Tensor host = Tensor::empty(t.shape(), t.dtype());
    copy_to_host(t, host);
    return t.dtype() == DType::F32 ? host : host.to_f32();
  }
  Tensor to_host_u8(const Tensor& t) override {
    ZI_ASSERT(dtype_size(t.dtype()) == 1);
    Tensor host = Tensor::empty(t.shape(), DType::U8);
    copy_to_host(t, host);
    return host;
  }

  Tensor cast(const Tensor& x, DType dtype) override {
    auto scope = profile("cast");
    check(x, "cast");
    Tensor y = empty(x.shape(), dtype);
    if (x.dtype() == dtype) {
      if (x.nbytes()) ZI_CUDA_CHECK(cudaMemcpyAsync(y.data(), x.data(), x.nbytes(), cudaMemcpyDeviceToDevice, stream_));
    } else if (x.dtype() == DType::F32 && dtype == DType::BF16) {
      cuda::cast_f32_to_bf16(x.data_as<float>(), mbf(y), x.numel(), stream_);
    } else if (x.dtype() == DType::BF16 && dtype == DType::F32) {
      cuda::cast_bf16_to_f32(cbf(x), y.data_as<float>(), x.numel(), stream_);
    } else {
      throw Error(ErrorKind::Internal, std::string("cuda cast from ") + dtype_name(x.dtype()) + " to " + dtype_name(dtype));
    }
    return y;
  }

  Tensor dequantize(const StoredWeight& w) override {
    auto scope = profile("dequantize");
    check(w.data, "dequantize");
    ZI_ASSERT(w.quantized() && w.shape.size() == 2);
    Tensor y = empty(w.shape, DType::BF16);
    if (w.blocks()) {
      cuda::dequantize_ggml_to_bf16(w.ggml_type, w.data.data_as<uint8_t>(), mbf(y), y.numel(), stream_);
    } else {
      if (w.scale.defined()) check(w.scale, "dequantize scale");
      ZI_ASSERT(!w.scale.defined() || (w.scale.dtype() == DType::F32 &&
                                      (w.scale.numel() == 1 || w.scale.numel() == w.shape[0])));
      cuda::dequantize_fp8_to_bf16(w.data.dtype() == DType::F8E5M2, w.data.data_as<uint8_t>(),
                                   w.scale.defined() ? w.scale.data_as<float>() : nullptr,
                                   w.scale.defined() ? w.scale.numel() : 0, mbf(y), w.shape[0], w.shape[1], stream_);
    }
    return y;
  }

  Tensor linear(const Tensor& x, const Tensor& w, const Tensor* bias) override {
    auto scope = profiling_ ? OpScope(*this, "linear " + std::to_string(w.dim(0)) + "x" + std::to_string(w.dim(-1)))
                            : OpScope(*this, "");
    check_bf16(x, "linear");
    check_bf16(w, "linear weight");
    int64_t k = x.dim(-1), n = w.dim(0), m = rows_of(x);
    ZI_CHECK(w.ndim() == 2 && w.dim(1) == k, ErrorKind::Internal,
             "linear: x " + shape_str(x.shape()) + " does not match weight " + shape_str(w.shape()));
    if (bias) check_bf16(*bias, "linear bias");
    Shape s = x.shape();
    s.back() = n;
    Tensor y = empty(s, DType::BF16);
    gemm_->linear(cbf(x), cbf(w), cbf_or_null(bias), mbf(y), m, n, k, stream_);
    return y;
  }

  Fp8Rows quantize_fp8_rows(const Tensor& x) override {
    auto scope = profile("quantize_fp8_rows");
    check_bf16(x, "quantize_fp8_rows");
    const int64_t k = x.dim(-1), r = rows_of(x);
    Fp8Rows out{empty(x.shape(), DType::F8E4M3), empty({r}, DType::F32)};
    cuda::quantize_rows_e4m3(cbf(x), out.q.data_as<uint8_t>(), out.scale.data_as<float>(), r, k, stream_);
    return out;
  }

  Tensor linear_fp8(const Fp8Rows& x, const StoredWeight& w, const Tensor* bias) override {
    auto scope = profiling_ ? OpScope(*this, "linear_fp8 " + std::to_string(w.shape[0]) + "x" + std::to_string(w.shape[1]))
                            : OpScope(*this, "");
    check(x.q, "linear_fp8");
    check(w.data, "linear_fp8 weight");
    ZI_ASSERT(x.q.dtype() == DType::F8E4M3 && w.data.dtype() == DType::F8E4M3 && w.scale.dtype() == DType::F32);
    const int64_t k = x.q.dim(-1), n = w.shape[0], m = rows_of(x.q);
    ZI_CHECK(w.shape[1] == k && w.scale.numel() == n && x.scale.numel() == m, ErrorKind::Internal,
             "linear_fp8: x " + shape_str(x.q.shape()) + " does not match weight " + shape_str(w.shape));
    if (bias) check_bf16(*bias, "linear_fp8 bias");
    Shape s = x.q.shape();
    s.back() = n;
    Tensor y = empty(s, DType::BF16);
    gemm_->linear_fp8(x.q.data_as<uint8_t>(), x.scale.data_as<float>(), w.data.data_as<uint8_t>(),
                      w.scale.data_as<float>(), cbf_or_null(bias), mbf(y), m, n, k, stream_);
    return y;
  }

  using Backend::gather_rows;
  Tensor gather_rows(const Tensor& src, const Tensor& idx) override {
    auto scope = profile("gather_rows");
    check(src, "gather_rows");
    check(idx, "gather_rows indices");
    ZI_ASSERT(idx.dtype() == DType::I32);
    const int64_t d = src.dim(-1), n = idx.numel();
    Tensor out = empty({n, d}, src.dtype());
    if (n)
      cuda::gather_rows(src.data(), idx.data_as<int32_t>(), out.data(), n, d * int64_t(dtype_size(src.dtype())),
                        stream_);
    return out;
  }

  Tensor concat_rows(const Tensor& a, const Tensor& b) override {
    auto scope = profile("concat_rows");
    check(a, "concat_rows");
    check(b, "concat_rows");
    ZI_ASSERT(a.dim(-1) == b.dim(-1) && a.dtype() == b.dtype());
    Tensor out = empty({rows_of(a) + rows_of(b), a.dim(-1)}, a.dtype());
    if (a.nbytes()) ZI_CUDA_CHECK(cudaMemcpyAsync(out.data(), a.data(), a.nbytes(), cudaMemcpyDeviceToDevice, stream_));
    if (b.nbytes())
      ZI_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(out.data()) + a.nbytes(), b.data(), b.nbytes(),
                                    cudaMemcpyDeviceToDevice, stream_));
    return out;
  }

  Tensor slice_cols(const Tensor& x, int64_t start, int64_t len) override {
    auto scope = profile("slice_cols");
    check(x, "slice_cols");
    int64_t n = x.dim(-1), r = rows_of(x);
    ZI_ASSERT(start >= 0 && len >= 0 && start + len <= n);
    Shape s = x.shape();
    s.back() = len;
    Tensor out = empty(s, x.dtype());
    size_t es = dtype_size(x.dtype());
    if (r && len)
      ZI_CUDA_CHECK(cudaMemcpy2DAsync(out.data(), size_t(len) * es, static_cast<const char*>(x.data()) + size_t(start) * es,
                                      size_t(n) * es, size_t(len) * es, size_t(r), cudaMemcpyDeviceToDevice, stream_));
    return out;
  }

  Tensor rms_norm(const Tensor& x, const Tensor* w, float eps) override {
    auto scope = profile("rms_norm");
    check_bf16(x, "rms_norm");
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::rms_norm(cbf(x), cbf_or_null(w), mbf(y), rows_of(x), x.dim(-1), eps, stream_);
    return y;
  }

  Tensor modulated_rms_norm(const Tensor& x, const Tensor& w, const Tensor* scale, float eps) override {
    auto scope = profile("modulated_rms_norm");
    check_bf16(x, "modulated_rms_norm");
    ZI_ASSERT(x.ndim() == 3);
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::modulated_rms_norm(cbf(x), cbf(w), cbf_or_null(scale), mbf(y), x.dim(0), x.dim(1), x.dim(2), eps, stream_);
    return y;
  }

  void gated_residual_rms_norm_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate, float eps,
                                const Tensor* extra) override {
    auto scope = profile("gated_residual_rms_norm_");
    check_bf16(x, "gated_residual_rms_norm_");
    check_bf16(y, "gated_residual_rms_norm_");
    ZI_ASSERT(x.ndim() == 3 && x.shape() == y.shape());
    if (extra) {
      check_bf16(*extra, "gated_residual_rms_norm_");
      ZI_ASSERT(extra->shape() == x.shape());
    }
    cuda::gated_residual_rms_norm(mbf(x), cbf(y), cbf(w), cbf_or_null(gate), cbf_or_null(extra), x.dim(0), x.dim(1),
                                  x.dim(2), eps, stream_);
  }

  Tensor gated_residual_then_rms_norm_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate,
                                       const Tensor& w_next, const Tensor* scale_next, float eps,
                                       const Tensor* extra) override {
    auto scope = profile("gated_residual_then_rms_norm_");
    check_bf16(x, "gated_residual_then_rms_norm_");
    check_bf16(y, "gated_residual_then_rms_norm_");
    ZI_ASSERT(x.ndim() == 3 && x.shape() == y.shape());
    if (extra) {
      check_bf16(*extra, "gated_residual_then_rms_norm_");
      ZI_ASSERT(extra->shape() == x.shape());
    }
    Tensor out = empty(x.shape(), DType::BF16);
    cuda::gated_residual_then_rms_norm(mbf(x), cbf(y), cbf(w), cbf_or_null(gate), cbf_or_null(extra), cbf(w_next),
                                       cbf_or_null(scale_next), mbf(out), x.dim(0), x.dim(1), x.dim(2), eps, stream_);
    return out;
  }

  Fp8Rows modulated_rms_norm_fp8(const Tensor& x, const Tensor& w, const Tensor* scale, float eps) override {
    auto scope = profile("modulated_rms_norm_fp8");
    check_bf16(x, "modulated_rms_norm_fp8");
    ZI_ASSERT(x.ndim() == 3);
    Fp8Rows out{empty(x.shape(), DType::F8E4M3), empty({rows_of(x)}, DType::F32)};
    cuda::modulated_rms_norm_e4m3(cbf(x), cbf(w), cbf_or_null(scale), out.q.data_as<uint8_t>(),
                                  out.scale.data_as<float>(), x.dim(0), x.dim(1), x.dim(2), eps, stream_);
    return out;
  }

  Fp8Rows gated_residual_then_rms_norm_fp8_(Tensor& x, const Tensor& y, const Tensor& w, const Tensor* gate,
                                            const Tensor& w_next, const Tensor* scale_next, float eps,
                                            const Tensor* extra) override {
    auto scope = profile("gated_residual_then_rms_norm_fp8_");
    check_bf16(x, "gated_residual_then_rms_norm_fp8_");
    check_bf16(y, "gated_residual_then_rms_norm_fp8_");
    ZI_ASSERT(x.ndim() == 3 && x.shape() == y.shape());
    if (extra) {
      check_bf16(*extra, "gated_residual_then_rms_norm_fp8_");
      ZI_ASSERT(extra->shape() == x.shape());
    }
    Fp8Rows out{empty(x.shape(), DType::F8E4M3), empty({rows_of(x)}, DType::F32)};
    cuda::gated_residual_then_rms_norm_e4m3(mbf(x), cbf(y), cbf(w), cbf_or_null(gate), cbf_or_null(extra), cbf(w_next),
                                            cbf_or_null(scale_next), out.q.data_as<uint8_t>(),
                                            out.scale.data_as<float>(), x.dim(0), x.dim(1), x.dim(2), eps, stream_);
    return out;
  }

  Fp8Rows swiglu_fp8(const Tensor& x) override {
    auto scope = profile("swiglu_fp8");
    check_bf16(x, "swiglu_fp8");
    Shape s = x.shape();
    s.back() /= 2;
    Fp8Rows out{empty(s, DType::F8E4M3), empty({rows_of(x)}, DType::F32)};
    cuda::swiglu_e4m3(cbf(x), out.q.data_as<uint8_t>(), out.scale.data_as<float>(), rows_of(x), s.back(), stream_);
    return out;
  }

  Tensor modulated_layer_norm(const Tensor& x, const Tensor& scale, float eps) override {
    auto scope = profile("modulated_layer_norm");
    check_bf16(x, "modulated_layer_norm");
    ZI_ASSERT(x.ndim() == 3);
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::modulated_layer_norm(cbf(x), cbf(scale), mbf(y), x.dim(0), x.dim(1), x.dim(2), eps, stream_);
    return y;
  }

  Tensor group_norm(const Tensor& x, const Tensor& w, const Tensor& b, int groups, float eps, bool silu) override {
    auto scope = profile("group_norm");
    check_bf16(x, "group_norm");
    ZI_ASSERT(x.ndim() == 4 && x.dim(3) % groups == 0);
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::group_norm_nhwc(cbf(x), cbf(w), cbf(b), mbf(y), x.dim(0), x.dim(1) * x.dim(2), x.dim(3), groups, eps, silu,
                          stream_);
    return y;
  }

  void qk_norm_rope_(Tensor& qkv, int hq, int hkv, int d, const Tensor& q_w, const Tensor& k_w, float eps,
                     const Tensor& cos, const Tensor& sin, RopeStyle style) override {
    auto scope = profile("qk_norm_rope_");
    check_bf16(qkv, "qk_norm_rope_");
    ZI_ASSERT(cos.dtype() == DType::F32 && sin.dtype() == DType::F32);
    int64_t rows = rows_of(qkv);
    ZI_ASSERT(qkv.dim(-1) == int64_t(hq + 2 * hkv) * d && cos.numel() == rows * d / 2);
    cuda::qk_norm_rope(mbf(qkv), rows, hq, hkv, d, cbf(q_w), cbf(k_w), eps, cos.data_as<float>(), sin.data_as<float>(),
                       style == RopeStyle::Interleaved, stream_);
  }

  Tensor attention(const Tensor& qkv, int hq, int hkv, int d, float scale, bool causal,
                   const std::vector<int>& key_len) override {
    auto scope = profile("attention");
    check_bf16(qkv, "attention");
    ZI_ASSERT(qkv.ndim() == 3 && hq % hkv == 0 && int64_t(key_len.size()) == qkv.dim(0));
    Tensor out = empty({qkv.dim(0), qkv.dim(1), int64_t(hq) * d}, DType::BF16);
    attention_->run(cbf(qkv), mbf(out), qkv.dim(0), qkv.dim(1), hq, hkv, d, scale, causal, key_len, stream_);
    return out;
  }

  Tensor attention_with_lse(const Tensor& q_rows, const Tensor& kv_rows, int heads, int d, float scale,
                            const std::vector<int>& key_len, Tensor& lse) override {
    auto scope = profile("attention_with_lse");
    check_bf16(q_rows, "attention_with_lse");
    check_bf16(kv_rows, "attention_with_lse");
    const int64_t b = q_rows.dim(0), sq = q_rows.dim(1), sk = kv_rows.dim(1);
    ZI_ASSERT(q_rows.ndim() == 3 && kv_rows.ndim() == 3 && kv_rows.dim(0) == b && int64_t(key_len.size()) == b &&
              q_rows.dim(2) == 3 * int64_t(heads) * d && kv_rows.dim(2) == q_rows.dim(2));
    Tensor out = empty({b, sq, int64_t(heads) * d}, DType::BF16);
    lse = empty({b, sq, heads}, DType::F32);
    Tensor lengths = empty({b}, DType::I32);
    cuda::write_sequence_lengths(key_len, sq, nullptr, static_cast<int32_t*>(lengths.data()), stream_);
    cuda::flash_attention_lse(cbf(q_rows), cbf(kv_rows), mbf(out), static_cast<float*>(lse.data()), b, sq, sk, heads,
                              d, scale, static_cast<const int32_t*>(lengths.data()), stream_);
    return out;
  }

  void merge_attention_(Tensor& out, Tensor& lse, const Tensor& out_b, const Tensor& lse_b) override {
    auto scope = profile("merge_attention_");
    check_bf16(out, "merge_attention_");
    check_bf16(out_b, "merge_attention_");
    ZI_ASSERT(out.shape() == out_b.shape() && lse.shape() == lse_b.shape() && lse.dtype() == DType::F32 &&
              lse_b.dtype() == DType::F32 && out.numel() % lse.numel() == 0);
    cuda::merge_attention(mbf(out), static_cast<float*>(lse.data()), cbf(out_b), static_cast<const float*>(lse_b.data()),
                          lse.numel(), out.numel() / lse.numel(), stream_);
  }

  void add_(Tensor& x, const Tensor& y) override {
    auto scope = profile("add_");
    check_bf16(x, "add_");
    check_bf16(y, "add_");
    ZI_ASSERT(x.numel() == y.numel());
    cuda::add_inplace(mbf(x), cbf(y), x.numel(), stream_);
  }

  Tensor silu(const Tensor& x) override {
    auto scope = profile("silu");
    check_bf16(x, "silu");
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::silu(cbf(x), mbf(y), x.numel(), stream_);
    return y;
  }

  Tensor swiglu(const Tensor& x) override {
    auto scope = profile("swiglu");
    check_bf16(x, "swiglu");
    Shape s = x.shape();
    s.back() /= 2;
    Tensor y = empty(s, DType::BF16);
    cuda::swiglu(cbf(x), mbf(y), rows_of(x), s.back(), stream_);
    return y;
  }

  Tensor scale_shift(const Tensor& x, float scale, float shift) override {
    auto scope = profile("scale_shift");
    check_bf16(x, "scale_shift");
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::scale_shift(cbf(x), mbf(y), x.numel(), scale, shift, stream_);
    return y;
  }

  Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor* bias, const Conv2dParams& p) override {
    auto scope = profile("conv2d");
    check_bf16(x, "conv2d");
    check_bf16(w, "conv2d weight");
    ZI_ASSERT(x.ndim() == 4 && w.ndim() == 4 && w.dim(3) == x.dim(3));
    int64_t n = x.dim(0), h = x.dim(1), wd = x.dim(2), c = x.dim(3), o = w.dim(0), kh = w.dim(1), kw = w.dim(2);
    int64_t ho = (h + p.pad_top + p.pad_bottom - kh) / p.stride + 1;
    int64_t wo = (wd + p.pad_left + p.pad_right - kw) / p.stride + 1;
    Tensor y = empty({n, ho, wo, o}, DType::BF16);
    conv_->run(cbf(x), n, h, wd, c, cbf(w), o, kh, kw, cbf_or_null(bias), p, mbf(y), stream_);
    return y;
  }

  Tensor upsample_nearest2x(const Tensor& x) override {
    auto scope = profile("upsample_nearest2x");
    check_bf16(x, "upsample_nearest2x");
    Tensor y = empty({x.dim(0), 2 * x.dim(1), 2 * x.dim(2), x.dim(3)}, DType::BF16);
    cuda::upsample_nearest2x(cbf(x), mbf(y), x.dim(0), x.dim(1), x.dim(2), x.dim(3), stream_);
    return y;
  }

  Tensor nchw_to_nhwc(const Tensor& x) override {
    auto scope = profile("nchw_to_nhwc");
    check_bf16(x, "nchw_to_nhwc");
    Tensor y = empty({x.dim(0), x.dim(2), x.dim(3), x.dim(1)}, DType::BF16);
    cuda::nchw_to_nhwc(cbf(x), mbf(y), x.dim(0), x.dim(1), x.dim(2), x.dim(3), stream_);
    return y;
  }

  Tensor nhwc_to_nchw(const Tensor& x) override {
    auto scope = profile("nhwc_to_nchw");
    check_bf16(x, "nhwc_to_nchw");
    Tensor y = empty({x.dim(0), x.dim(3), x.dim(1), x.dim(2)}, DType::BF16);
    cuda::nhwc_to_nchw(cbf(x), mbf(y), x.dim(0), x.dim(1), x.dim(2), x.dim(3), stream_);
    return y;
  }

  Tensor image_to_u8(const Tensor& x) override {
    auto scope = profile("image_to_u8");
    check_bf16(x, "image_to_u8");
    Tensor y = empty(x.shape(), DType::U8);
    cuda::image_to_u8(cbf(x), y.data_as<uint8_t>(), x.numel(), stream_);
    return y;
  }

  Tensor u8_to_image(const Tensor& x) override {
    auto scope = profile("u8_to_image");
    ZI_ASSERT(x.dtype() == DType::U8 && x.device() == Device::Cuda && x.is_contiguous());
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::u8_to_image(x.data_as<uint8_t>(), mbf(y), x.numel(), stream_);
    return y;
  }

  Tensor patchify(const Tensor& latent, int p) override {
    auto scope = profile("patchify");
    check_bf16(latent, "patchify");
    ZI_ASSERT(latent.ndim() == 3);
    int c = int(latent.dim(0)), h = int(latent.dim(1)), w = int(latent.dim(2));
    ZI_ASSERT(h % p == 0 && w % p == 0);
    Tensor y = empty({int64_t(h / p) * (w / p), int64_t(p) * p * c}, DType::BF16);
    cuda::patchify(cbf(latent), mbf(y), c, h, w, p, stream_);
    return y;
  }

  Tensor unpatchify(const Tensor& tokens, int c, int h, int w, int p) override {
    auto scope = profile("unpatchify");
    check_bf16(tokens, "unpatchify");
    ZI_ASSERT(tokens.dim(-1) == int64_t(p) * p * c && rows_of(tokens) >= int64_t(h / p) * (w / p));
    Tensor y = empty({c, h, w}, DType::BF16);
    cuda::unpatchify(cbf(tokens), mbf(y), c, h, w, p, stream_);
    return y;
  }

  Tensor timestep_embedding(const Tensor& t, float t_scale, int dim, float max_period) override {
    auto scope = profile("timestep_embedding");
    check(t, "timestep_embedding");
    ZI_ASSERT(t.dtype() == DType::F32);
    Tensor y = empty({t.numel(), dim}, DType::BF16);
    cuda::timestep_embedding(t.data_as<float>(), t_scale, mbf(y), t.numel(), dim, max_period, stream_);
    return y;
  }

  void cfg_euler_step_(Tensor& latents, const Tensor& model_out, float guidance, float cfg_norm, float dt) override {
    auto scope = profile("cfg_euler_step_");
    check(latents, "cfg_euler_step_");
    check(model_out, "cfg_euler_step_");
    ZI_ASSERT(latents.dtype() == DType::F32 && model_out.dtype() == DType::F32);
    int64_t b = latents.dim(0), per = latents.numel() / b;
    ZI_ASSERT(model_out.numel() == (guidance > 0 ? 2 : 1) * latents.numel());
    cuda::cfg_euler_step(latents.data_as<float>(), model_out.data_as<float>(), b, per, guidance, cfg_norm, dt, stream_);
  }

  Tensor clamp(const Tensor& x, float lo, float hi) override {
    auto scope = profile("clamp");
    check_bf16(x, "clamp");
    Tensor y = empty(x.shape(), DType::BF16);
    cuda::clamp(cbf(x), mbf(y), x.numel(), lo, hi, stream_);
    return y;
  }

  Tensor gaussian_sample(const Tensor& mean, const Tensor& logvar, const Tensor& eps, float shift,
                         float scale) override {
    auto scope = profile("gaussian_sample");
    check(mean, "gaussian_sample");
    check(logvar, "gaussian_sample");
    check(eps, "gaussian_sample");
    ZI_ASSERT(mean.shape() == logvar.shape() && mean.shape() == eps.shape() && mean.dtype() == logvar.dtype() &&
              eps.dtype() == DType::F32);
    Tensor y = empty(mean.shape(), DType::F32);
    if (mean.dtype() == DType::F32) {
      cuda::gaussian_sample_f32(mean.data_as<float>(), logvar.data_as<float>(), eps.data_as<float>(),
                                y.data_as<float>(), y.numel(), shift, scale, stream_);
    } else {
      check_bf16(mean, "gaussian_sample");
      cuda::gaussian_sample_bf16(cbf(mean), cbf(logvar), eps.data_as<float>(), y.data_as<float>(), y.numel(), shift,
                                 scale, stream_);
    }
    return y;
  }

  void flow_match_blend_(Tensor& x, const Tensor& init, const Tensor& noise, const Tensor* mask, float sigma) override {
    auto scope = profile("flow_match_blend_");
    check(x, "flow_match_blend_");
    check(init, "flow_match_blend_");
    check(noise, "flow_match_blend_");
    ZI_ASSERT(x.ndim() == 4 && x.shape() == init.shape() && x.shape() == noise.shape() && x.dtype() == DType::F32 &&
              init.dtype() == DType::F32 && noise.dtype() == DType::F32);
    const int64_t b = x.dim(0), c = x.dim(1), hw = x.dim(2) * x.dim(3);
    if (mask) {
      check(*mask, "flow_match_blend_");
      ZI_ASSERT(mask->dtype() == DType::F32 && mask->numel() == b * hw);
    }
    cuda::flow_match_blend(x.data_as<float>(), init.data_as<float>(), noise.data_as<float>(),
                           mask ? mask->data_as<float>() : nullptr, b, c, hw, sigma, stream_);
  }

  std::unique_ptr<Graph> make_graph(GraphFn fn) override { return std::make_unique<CudaGraph>(*this, std::move(fn)); }

  void count_non_finite(const Tensor& x, Tensor& counts, int64_t slot) override {
    auto scope = profile("count_non_finite");
    check(x, "count_non_finite");
    check(counts, "count_non_finite");
    ZI_ASSERT(counts.dtype() == DType::I32 && slot >= 0 && slot < counts.numel());
    int* count = counts.data_as<int32_t>() + slot;
    if (x.dtype() == DType::F32) {
      cuda::count_non_finite_f32(x.data_as<float>(), x.numel(), count, stream_);
    } else {
      check_bf16(x, "count_non_finite");
      cuda::count_non_finite_bf16(cbf(x), x.numel(), count, stream_);
    }
  }

 private:
  static void check(const Tensor& t, const char* op) {
    ZI_CHECK(t.device() == Device::Cuda && t.is_contiguous(), ErrorKind::Internal,
             std::string(op) + ": cuda backend expects contiguous device tensors, got " + shape_str(t.shape()) +
                 (t.device() == Device::Host ? " on the host" : ""));
  }
  static void check_bf16(const Tensor& t, const char* op) {
    check(t, op);
    ZI_CHECK(t.dtype() == DType::BF16, ErrorKind::Internal,
             std::string(op) + ": cuda backend expects bf16, got " + dtype_name(t.dtype()));
  }

  void copy_to_host(const Tensor& t, Tensor& host) {
    DeviceScope on(device_);
    check(t, "copy to host");
    if (t.nbytes()) ZI_CUDA_CHECK(cudaMemcpyAsync(host.data(), t.data(), t.nbytes(), cudaMemcpyDeviceToHost, stream_));
    synchronize();
  }

  // Host bytes to device memory, queued on the stream; `src` may be freed as soon as this returns.
  void copy_from_host(const void* src, void* dst, size_t bytes) {
    if (bytes >= kStagingChunk) {
      upload_staged(src, dst, bytes);
    } else if (bytes) {
      // From pageable memory a small copy is staged by the driver before cudaMemcpyAsync returns, so
      // `src` may go away right after: no synchronization needed.
      ZI_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    }
  }

  // Large uploads (weights) go through two pinned buffers in turn: the host fills one while the
  // DMA engine drains the other, at the full host-to-device rate. One core copies out of the page
  // cache at ~5-10 GB/s, well below what the DMA engine drains (~50 GB/s over PCIe 5), so the pool's
  // threads fill each buffer together, in 1 MiB pieces (taking the page faults of a mapped checkpoint
  // in parallel too).
  static constexpr size_t kStagingChunk = size_t(16) << 20;
  static constexpr int64_t kFillPiece = int64_t(1) << 20;
  void upload_staged(const void* src, void* dst, size_t bytes) {
    if (!staging_[0]) {
      for (int k = 0; k < 2; ++k) {
        ZI_CUDA_CHECK(cudaHostAlloc(&staging_[k], kStagingChunk, cudaHostAllocDefault));
        ZI_CUDA_CHECK(cudaEventCreateWithFlags(&staging_free_[k], cudaEventDisableTiming));
        ZI_CUDA_CHECK(cudaEventRecord(staging_free_[k], stream_));
      }
    }
    const char* from = static_cast<const char*>(src);
    char* to = static_cast<char*>(dst);
    for (size_t off = 0, k = 0; off < bytes; off += kStagingChunk, k ^= 1) {
      size_t n = std::min(kStagingChunk, bytes - off);
      ZI_CUDA_CHECK(cudaEventSynchronize(staging_free_[k]));
      char* buf = static_cast<char*>(staging_[k]);
      const char* part = from + off;
      parallel_for(int64_t(n), kFillPiece,
                   [&](int64_t lo, int64_t hi) { std::memcpy(buf + lo, part + lo, size_t(hi - lo)); });
      ZI_CUDA_CHECK(cudaMemcpyAsync(to + off, staging_[k], n, cudaMemcpyHostToDevice, stream_));
      ZI_CUDA_CHECK(cudaEventRecord(staging_free_[k], stream_));
    }
    // The source may be freed after return; the pinned buffers hold what is still in flight.
  }

  // Every op opens one: the backend's GPU current for the op, and while profiling an event pair around
  // the op's launches.
  struct OpRecord {
    std::string op;
    Mark begin, end;
  };
  class OpScope {
   public:
    OpScope(CudaBackend& be, std::string op) : on_(be.device_), be_(be.profiling_ ? &be : nullptr) {
      if (be_) rec_ = {std::move(op), be.mark(), nullptr};
    }
    OpScope(const OpScope&) = delete;
    OpScope& operator=(const OpScope&) = delete;
    ~OpScope() {
      if (!be_) return;
      rec_.end = be_->mark();
      be_->op_records_.push_back(std::move(rec_));
    }

   private:
    DeviceScope on_;
    CudaBackend* be_;
    OpRecord rec_;
  };
  OpScope profile(const char* op) { return OpScope(*this, op); }

  friend class CudaGraph;

  void* staging_[2] = {nullptr, nullptr};
  cudaEvent_t staging_free_[2] = {};
  bool profiling_ = false;
  std::vector<OpRecord> op_records_;
  int device_;
  bool poison_ = std::getenv("ZIMAGE_POISON") && std::string(std::getenv("ZIMAGE_POISON")) == "1";
  std::string device_name_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cudnnHandle_t cudnn_ = nullptr;
  std::shared_ptr<DeviceAllocator> alloc_;
  Workspace workspace_;
  std::unique_ptr<Gemm> gemm_;
  std::unique_ptr<Attention> attention_;
  std::unique_ptr<Conv2d> conv_;
};

CudaGraph::~CudaGraph() {
  if (!exec_) return;
  DeviceScope on(be_.device_);
  cudaStreamSynchronize(be_.stream_);  // a replay may still read the inputs about to be freed
  cudaGraphExecDestroy(exec_);
}

Tensor CudaGraph::operator()(const std::vector<Tensor>& inputs) {
  // Eager while profiling (per-op events), and on the first call: ops choose their algorithms and
  // size their workspaces then, which synchronizes and cannot be recorded.
  if (be_.profiling_ || calls_++ == 0) return fn_(inputs);
  DeviceScope on(be_.device_);
  if (!exec_) record(inputs);
  ZI_ASSERT(inputs.size() == inputs_.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    ZI_CHECK(inputs[i].shape() == inputs_[i].shape() && inputs[i].dtype() == inputs_[i].dtype(), ErrorKind::Internal,
             "a recorded graph replayed with input " + std::to_string(i) + " of shape " + shape_str(inputs[i].shape()) +
                 " instead of " + shape_str(inputs_[i].shape()));
    if (inputs[i].nbytes())
      ZI_CUDA_CHECK(cudaMemcpyAsync(inputs_[i].data(), inputs[i].data(), inputs[i].nbytes(), cudaMemcpyDeviceToDevice,
                                    be_.stream_));
  }
  ZI_CUDA_CHECK(cudaGraphLaunch(exec_, be_.stream_));
  return be_.cast(output_, output_.dtype());  // a copy: the next replay overwrites output_
}

void CudaGraph::record(const std::vector<Tensor>& like) {
  pool_ = be_.alloc_->new_pool();
  be_.alloc_->record_into(pool_);
  inputs_.clear();
  for (const Tensor& x : like) inputs_.push_back(be_.empty(x.shape(), x.dtype()));
  // Relaxed: buffers the recording needs beyond the pool's are cudaMalloc'ed, which the stricter modes
  // refuse during a capture (it is not a stream operation: the block is valid at once).
  const cudaError_t began = cudaStreamBeginCapture(be_.stream_, cudaStreamCaptureModeRelaxed);
  if (began != cudaSuccess) be_.alloc_->record_into(nullptr);
  ZI_CUDA_CHECK(began);
  try {
    output_ = fn_(inputs_);
  } catch (...) {
    cudaGraph_t partial = nullptr;
    cudaStreamEndCapture(be_.stream_, &partial);
    if (partial) cudaGraphDestroy(partial);
    cudaGetLastError();
    be_.alloc_->record_into(nullptr);
    throw;
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(be_.stream_, &graph);
  be_.alloc_->record_into(nullptr);
  ZI_CUDA_CHECK(ended);
  const cudaError_t made = cudaGraphInstantiate(&exec_, graph, 0);
  cudaGraphDestroy(graph);
  ZI_CUDA_CHECK(made);
}

}  // namespace
}  // namespace cuda

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  int n = cuda_device_count();
  ZI_CHECK(n > 0, ErrorKind::InvalidArgument, "no CUDA GPU is available (use --backend cpu)");
  ZI_CHECK(device >= 0 && device < n, ErrorKind::InvalidArgument,
           "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " found)");
  return std::make_unique<cuda::CudaBackend>(device);
}

}  // namespace zimage
