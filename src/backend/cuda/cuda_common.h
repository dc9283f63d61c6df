// Shared pieces of the CUDA backend: checked calls that turn CUDA/cuBLAS/cuDNN failures into engine
// errors, and the per-backend context (device, stream, library handles, workspace).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

namespace zimage::cuda {

[[noreturn]] void throw_cuda_error(const char* what, const std::string& detail, const char* file, int line, bool oom);

#define ZI_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                   \
    cudaError_t _e = (expr);                                                                             \
    if (_e != cudaSuccess)                                                                               \
      ::zimage::cuda::throw_cuda_error(#expr, cudaGetErrorString(_e), __FILE__, __LINE__,                \
                                       _e == cudaErrorMemoryAllocation);                                 \
  } while (0)

#define ZI_CUBLAS_CHECK(expr)                                                                            \
  do {                                                                                                   \
    cublasStatus_t _s = (expr);                                                                          \
    if (_s != CUBLAS_STATUS_SUCCESS)                                                                     \
      ::zimage::cuda::throw_cuda_error(#expr, "cublas status " + std::to_string(int(_s)), __FILE__,     \
                                       __LINE__, _s == CUBLAS_STATUS_ALLOC_FAILED);                      \
  } while (0)

#define ZI_CUDNN_CHECK(expr)                                                                             \
  do {                                                                                                   \
    cudnnStatus_t _s = (expr);                                                                           \
    if (_s != CUDNN_STATUS_SUCCESS)                                                                      \
      ::zimage::cuda::throw_cuda_error(#expr, cudnnGetErrorString(_s), __FILE__, __LINE__,               \
                                       _s == CUDNN_STATUS_ALLOC_FAILED);                                 \
  } while (0)

// After a kernel launch: report launch-configuration errors at the launch site.
#define ZI_CUDA_LAUNCH_CHECK() ZI_CUDA_CHECK(cudaGetLastError())

using bf16 = __nv_bfloat16;

inline unsigned grid_for(int64_t n, int block) { return unsigned((n + block - 1) / block); }

// Times the candidate algorithms of one call shape (cuBLASLt GEMMs, cuDNN attention and convolutions) on
// `stream`: run(i) enqueues candidate i on the call's own buffers and says whether it could; one warm-up
// and three timed runs each. Blocks (once per shape, during warm-up). Returns the index to keep: the
// library's first choice unless another takes less than 0.9 of the best time so far -- near-equal
// candidates would otherwise swap with timing noise from one process to the next, and with them the bf16
// roundings, so the same seed would not give the same image twice -- and the first without timing the
// rest when it runs under 0.05 ms (launch-bound: its timings measure noise). -1 when none runs.
// `times` (optional) gets one entry per candidate timed: ms per run, < 0 for one that failed.
int fastest_candidate(int n, cudaStream_t stream, const std::function<bool(int)>& run,
                      std::vector<float>* times = nullptr);

// Runs a finalized cuDNN execution plan on the tensors `uids` at `pointers` through a fresh variant pack
// (the pointers change per call; building one is cheap). Returns the status rather than throwing: a
// caller timing candidate plans treats a failure as "not this one".
cudnnStatus_t cudnn_execute(cudnnHandle_t handle, cudnnBackendDescriptor_t plan, const int64_t* uids,
                            void* const* pointers, int64_t n, void* workspace);

}  // namespace zimage::cuda

namespace zimage::cuda {

// A device scratch buffer for library calls (cuBLASLt, cuDNN) that only grows. Growing keeps the old
// buffer until the backend goes (queued work and recorded graphs still use it), so it never waits for
// the stream. Sized once per shape in practice, so the denoising loop never allocates; the few sizes
// it steps through (GEMM 32 MiB, the VAE's attention scores) stay allocated.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace();
  void* get(size_t bytes);

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  std::vector<void*> retired_;
};

}  // namespace zimage::cuda
