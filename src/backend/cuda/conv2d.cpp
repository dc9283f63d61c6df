// 2-D convolution in NHWC bf16 through cuDNN 9's graph (backend) API; the float32 reference is
// CpuBackend::conv2d. x [n, h, w, c], w [o, kh, kw, c], bias [o] -> y [n, ho, wo, o],
// ho = (h + pad_top + pad_bottom - kh) / stride + 1 (likewise wo), cross-correlation (no filter flip).
//
// Work: 2 * n * ho * wo * o * kh * kw * c FLOPs, an implicit GEMM of M = n*ho*wo, N = o, K = kh*kw*c. For the
// VAE's 3x3 convolutions with 128-512 channels (K = 1152-4608, M >= 16k) cuDNN's tensor-core kernels should
// run near GEMM rates: a few hundred TFLOP/s on an H200, 400-600 expected (cuBLASLt reaches 712-824 at the
// DiT's GEMMs, CUDA_NOTES.md; an implicit GEMM gathers A from the image). The full-size decoder at 1024^2
// is ~9.9 TFLOP of convolutions (mid block, 4 up blocks of 3 resnets, 3 upsampler convs), so ~20 ms at
// 500 TFLOP/s. conv_in (c = 3) and conv_out (o = 3) are memory-bound and far below that rate.
//
// Why the graph API and not the legacy cudnnConvolutionForward: in cuDNN 9.19 every legacy convolution
// function is marked deprecated (warnings under -Wall), and the graph API fuses the bias add into the
// convolution's epilogue (conv -> float32 virtual tensor -> pointwise add -> bf16 y), where the legacy
// fused call (cudnnConvolutionBiasActivationForward) ties identity activation to one algorithm.
//
// Padding. cuDNN gets symmetric padding (pre = post) only; the asymmetric rest is written explicitly.
// With s = min(pad_top, pad_bottom), e_t = pad_top - s, e_b = pad_bottom - s, the padded copy
// xp [h + e_t + e_b] holds xp[r] = x[r - e_t] (zero outside x). A convolution of xp with symmetric pad s
// reads, for output row oy and tap ky, xp[oy*stride + ky - s] = x[oy*stride + ky - s - e_t]
// = x[oy*stride + ky - pad_top], zero exactly where the reference reads padding; its height is
// (h + e_t + e_b + 2s - kh)/stride + 1 = (h + pad_top + pad_bottom - kh)/stride + 1 = ho. Columns likewise.
// (Padding 1 on all sides and cropping would not do: at stride 2 it shifts the sampling grid by one
// pixel, and no crop of the output undoes that.) Only the encoder's three downsamplers (pad 0,1,0,1) pay
// for the copy.
//
// Plans: one per (cuDNN call shape, pointer alignment, bias). The heuristics (mode A, then the fallback
// list) propose engine configs; up to kMaxCandidates that finalize are kept, within kBuildBudgetMs of
// plan building (runtime-compiled engines take long to finalize), and the fastest on the real buffers is
// chosen. Engines whose notes say they reduce in lower precision or down-convert inputs are skipped: the
// contract is float32 accumulation. If no engine takes the fused conv+bias graph, a conv-only graph runs
// and add_bias_nhwc adds the bias.
#include "backend/cuda/conv2d.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/log.h"

namespace zimage::cuda {

namespace {

using Desc = cudnnBackendDescriptor_t;

// Pointer alignment declared to cuDNN (bytes), capped here; part of the plan key, since a plan may
// assume it.
constexpr int64_t kMaxAlignment = 16;
// Elements per tensor per cuDNN call: larger batches are split (4 images of 2048^2 x 256 would be 2^32).
constexpr int64_t kMaxElements = INT32_MAX;
constexpr int64_t kMaxWorkspaceBytes = int64_t(128) << 20;
constexpr size_t kMaxCandidates = 4;
constexpr double kBuildBudgetMs = 300.0;

enum : int64_t { kUidX = 1, kUidW = 2, kUidY = 3, kUidBias = 4, kUidAcc = 5 };

// cuDNN 9.19 marks the handle attributes of the operation graph and the execution plan deprecated (in
// favour of device-property descriptors, made for ahead-of-time builds); binding a graph to a live handle
// is still what they do, and the SDPA probe (shared/tools) ran with them on 9.19.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
constexpr cudnnBackendAttributeName_t kGraphHandleAttr = CUDNN_ATTR_OPERATIONGRAPH_HANDLE;
constexpr cudnnBackendAttributeName_t kPlanHandleAttr = CUDNN_ATTR_EXECUTION_PLAN_HANDLE;
#pragma GCC diagnostic pop

void set(Desc d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count,
         const void* values) {
  ZI_CUDNN_CHECK(cudnnBackendSetAttribute(d, name, type, count, values));
}

int64_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int64_t align = kMaxAlignment;
  while (align > 1 && a % uintptr_t(align) != 0) align /= 2;
  return align;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The shape of one cuDNN call: the input is already padded explicitly where the padding is asymmetric.
struct ConvShape {
  int64_t n, h, w, c, o, kh, kw, ho, wo;
  int64_t stride, pad_h, pad_w;  // symmetric padding left to cuDNN
  int64_t align;                 // bytes, of every pointer of the call
  bool bias;

  std::string str() const {
    return "x [" + std::to_string(n) + ", " + std::to_string(h) + ", " + std::to_string(w) + ", " + std::to_string(c) +
           "], w [" + std::to_string(o) + ", " + std::to_string(kh) + ", " + std::to_string(kw) + ", " +
           std::to_string(c) + "], stride " + std::to_string(stride) + ", pad " + std::to_string(pad_h) + "x" +
           std::to_string(pad_w) + (bias ? ", bias" : "") + ", alignment " + std::to_string(align);
  }
};

struct Pointers {
  const bf16* x;
  const bf16* w;
  const bf16* bias;
  bf16* y;
};

// Every backend descriptor a plan refers to, kept alive as long as the plan; destroyed in reverse order.
class Descriptors {
 public:
  Descriptors() = default;
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  ~Descriptors() {
    for (auto it = all_.rbegin(); it != all_.rend(); ++it) cudnnBackendDestroyDescriptor(*it);
  }
  Desc make(cudnnBackendDescriptorType_t type) {
    all_.reserve(all_.size() + 1);
    Desc d = nullptr;
    ZI_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d));
    all_.push_back(d);
    return d;
  }
  // Early release of one that is not needed after all (a candidate plan that lost).
  void destroy(Desc d) {
    auto it = std::find(all_.begin(), all_.end(), d);
    if (it == all_.end()) return;
    all_.erase(it);
    cudnnBackendDestroyDescriptor(d);
  }

 private:
  std::vector<Desc> all_;
};

}  // namespace

struct Conv2d::Plan {
  Descriptors descs;
  Desc exec = nullptr;  // the chosen execution plan
  int64_t workspace_bytes = 0;
  bool bias_fused = false;
};

namespace {

// cuDNN describes convolution tensors with dims in N, C, H, W order; the strides say the memory is NHWC.
// Filters: N = o, C = c, H = kh, W = kw, which is exactly the [o, kh, kw, c] weight layout.
Desc nhwc_tensor(Descriptors& ds, int64_t uid, cudnnDataType_t type, int64_t n, int64_t c, int64_t h, int64_t w,
                 int64_t align, bool is_virtual) {
  Desc t = ds.make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  const int64_t dims[4] = {n, c, h, w}, strides[4] = {h * w * c, 1, w * c, c};
  set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
  set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
  set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims);
  set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides);
  set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align);
  if (is_virtual) {
    const bool v = true;
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &v);
  }
  ZI_CUDNN_CHECK(cudnnBackendFinalize(t));
  return t;
}

// The operation graph conv(x, w) [+ bias] -> y; nullptr when cuDNN does not accept it.
Desc build_graph(Descriptors& ds, cudnnHandle_t handle, const ConvShape& s, bool fuse_bias) {
  const cudnnDataType_t bf = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  Desc x = nhwc_tensor(ds, kUidX, bf, s.n, s.c, s.h, s.w, s.align, false);
  Desc w = nhwc_tensor(ds, kUidW, bf, s.o, s.c, s.kh, s.kw, s.align, false);
  Desc y = nhwc_tensor(ds, kUidY, bf, s.n, s.o, s.ho, s.wo, s.align, false);
  // With the bias fused, the convolution writes float32 accumulators that never reach memory.
  Desc conv_out = fuse_bias ? nhwc_tensor(ds, kUidAcc, f32, s.n, s.o, s.ho, s.wo, s.align, true) : y;

  Desc conv = ds.make(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  const int64_t spatial_dims = 2, dilation[2] = {1, 1}, stride[2] = {s.stride, s.stride}, pad[2] = {s.pad_h, s.pad_w};
  set(conv, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
  set(conv, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode);
  set(conv, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, 1, &spatial_dims);
  set(conv, CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, 2, dilation);
  set(conv, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, 2, stride);
  set(conv, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, 2, pad);
  set(conv, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, 2, pad);
  ZI_CUDNN_CHECK(cudnnBackendFinalize(conv));

  Desc fprop = ds.make(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR);
  const float alpha = 1.0f, beta = 0.0f;
  set(fprop, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x);
  set(fprop, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &w);
  set(fprop, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv_out);
  set(fprop, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv);
  set(fprop, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_TYPE_FLOAT, 1, &alpha);
  set(fprop, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, CUDNN_TYPE_FLOAT, 1, &beta);
  if (cudnnBackendFinalize(fprop) != CUDNN_STATUS_SUCCESS) return nullptr;
  std::vector<Desc> ops{fprop};

  if (fuse_bias) {
    // y = acc + bias, bias [1, o, 1, 1] broadcast over n, h, w.
    Desc b = nhwc_tensor(ds, kUidBias, bf, 1, s.o, 1, 1, s.align, false);
    Desc add = ds.make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    const cudnnPointwiseMode_t pw = CUDNN_POINTWISE_ADD;
    set(add, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &pw);
    set(add, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &f32);
    ZI_CUDNN_CHECK(cudnnBackendFinalize(add));
    Desc op = ds.make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &add);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv_out);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b);
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y);
    if (cudnnBackendFinalize(op) != CUDNN_STATUS_SUCCESS) return nullptr;
    ops.push_back(op);
  }

  Desc graph = ds.make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  set(graph, kGraphHandleAttr, CUDNN_TYPE_HANDLE, 1, &handle);
  set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, int64_t(ops.size()), ops.data());
  if (cudnnBackendFinalize(graph) != CUDNN_STATUS_SUCCESS) return nullptr;
  return graph;
}

// What the engine behind a config is: its global index (for logs) and whether its numerical notes
// break the float32-accumulation contract. Unreadable notes count as acceptable.
struct EngineInfo {
  int64_t index = -1;
  bool reduced_precision = false;
};

EngineInfo engine_info(Desc cfg) {
  EngineInfo info;
  Desc engine = nullptr;
  if (cudnnBackendCreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) != CUDNN_STATUS_SUCCESS) return info;
  int64_t count = 0;
  if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &count, &engine) ==
      CUDNN_STATUS_SUCCESS) {
    int64_t index = -1;
    if (cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &count, &index) ==
        CUDNN_STATUS_SUCCESS)
      info.index = index;
    cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
    if (cudnnBackendGetAttribute(engine, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                                 CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &count, notes) == CUDNN_STATUS_SUCCESS)
      for (int64_t i = 0; i < std::min<int64_t>(count, CUDNN_NUMERICAL_NOTE_TYPE_COUNT); ++i)
        if (notes[i] == CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION ||
            notes[i] == CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS)
          info.reduced_precision = true;
  }
  cudnnBackendDestroyDescriptor(engine);
  return info;
}

struct Candidate {
  Desc exec;
  int64_t workspace_bytes;
  int64_t engine;
};

// The execution plan for one engine config, or nullptr when it does not finalize or needs too much
// workspace.
Desc finalize_plan(Descriptors& ds, cudnnHandle_t handle, Desc cfg, int64_t* workspace_bytes) {
  Desc exec = ds.make(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
  set(exec, kPlanHandleAttr, CUDNN_TYPE_HANDLE, 1, &handle);
  set(exec, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg);
  int64_t ws = 0, n = 0;
  if (cudnnBackendFinalize(exec) != CUDNN_STATUS_SUCCESS ||
      cudnnBackendGetAttribute(exec, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n, &ws) !=
          CUDNN_STATUS_SUCCESS ||
      ws < 0 || ws > kMaxWorkspaceBytes) {
    ds.destroy(exec);
    return nullptr;
  }
  *workspace_bytes = ws;
  return exec;
}

// Execution plans that finalize for `graph`: the heuristic's order, mode A first, the fallback list only
// when mode A yields none. Engines flagged for reduced-precision numerics are used only if nothing else
// finalizes.
std::vector<Candidate> candidates(Descriptors& ds, cudnnHandle_t handle, Desc graph,
                                  std::chrono::steady_clock::time_point t0) {
  std::vector<Candidate> out;
  std::vector<std::pair<Desc, int64_t>> flagged;  // config, engine index
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    Desc heur = ds.make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    set(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph);
    set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
    if (cudnnBackendFinalize(heur) != CUDNN_STATUS_SUCCESS) continue;
    int64_t count = 0;
    if (cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                                 nullptr) != CUDNN_STATUS_SUCCESS ||
        count <= 0)
      continue;
    std::vector<Desc> cfgs(static_cast<size_t>(count));
    for (auto& c : cfgs) c = ds.make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    int64_t got = 0;
    if (cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                                 cfgs.data()) != CUDNN_STATUS_SUCCESS)
      continue;
    for (int64_t i = 0; i < std::min(got, count); ++i) {
      const Desc cfg = cfgs[size_t(i)];
      const EngineInfo info = engine_info(cfg);
      if (info.reduced_precision) {
        flagged.emplace_back(cfg, info.index);
        continue;
      }
      int64_t ws = 0;
      if (Desc exec = finalize_plan(ds, handle, cfg, &ws)) {
        out.push_back({exec, ws, info.index});
        if (out.size() >= kMaxCandidates || ms_since(t0) > kBuildBudgetMs) return out;
      }
    }
    if (!out.empty()) return out;
  }
  for (const auto& [cfg, index] : flagged) {
    int64_t ws = 0;
    if (Desc exec = finalize_plan(ds, handle, cfg, &ws)) {
      log_warn("conv2d: only cuDNN engines with reduced-precision numerics take this shape; using engine " +
               std::to_string(index));
      out.push_back({exec, ws, index});
      return out;
    }
  }
  return out;
}

cudnnStatus_t execute(cudnnHandle_t handle, Desc exec, bool with_bias, const Pointers& p, void* workspace) {
  const int64_t uids[4] = {kUidX, kUidW, kUidY, kUidBias};
  void* ptrs[4] = {const_cast<bf16*>(p.x), const_cast<bf16*>(p.w), p.y, const_cast<bf16*>(p.bias)};
  return cudnn_execute(handle, exec, uids, ptrs, with_bias ? 4 : 3, workspace);
}

// Builds the plan for one call shape, timing the candidates on the call's own buffers (y is overwritten
// by the real execution afterwards) by fastest_candidate's rule. While the stream is being captured into a
// CUDA graph nothing can be timed, and the heuristic's first choice is taken.
std::unique_ptr<Conv2d::Plan> build_plan(cudnnHandle_t handle, Workspace& workspace, const ConvShape& s,
                                         const Pointers& p, cudaStream_t stream) {
  const auto t0 = std::chrono::steady_clock::now();
  for (bool fuse_bias : {true, false}) {
    if (fuse_bias && !s.bias) continue;
    auto plan = std::make_unique<Conv2d::Plan>();
    Desc graph = build_graph(plan->descs, handle, s, fuse_bias);
    if (!graph) continue;
    std::vector<Candidate> cands = candidates(plan->descs, handle, graph, t0);
    if (cands.empty()) continue;

    size_t best = 0;
    std::string timings;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    ZI_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (cands.size() > 1 && capture == cudaStreamCaptureStatusNone) {
      int64_t ws_max = 0;
      for (const Candidate& c : cands) ws_max = std::max(ws_max, c.workspace_bytes);
      void* ws = ws_max > 0 ? workspace.get(size_t(ws_max)) : nullptr;
      std::vector<float> times;
      const int fastest = fastest_candidate(
          int(cands.size()), stream,
          [&](int i) { return execute(handle, cands[size_t(i)].exec, fuse_bias, p, ws) == CUDNN_STATUS_SUCCESS; },
          &times);
      for (size_t i = 0; i < times.size(); ++i)
        timings += " #" + std::to_string(cands[i].engine) + "=" +
                   (times[i] < 0 ? std::string("failed") : std::to_string(times[i]));
      if (fastest < 0) continue;  // none ran: try the next graph
      best = size_t(fastest);
    }
    for (size_t i = 0; i < cands.size(); ++i)
      if (i != best) plan->descs.destroy(cands[i].exec);
    plan->exec = cands[best].exec;
    plan->workspace_bytes = cands[best].workspace_bytes;
    plan->bias_fused = fuse_bias;
    const char* bias_note = fuse_bias ? " (bias fused)" : s.bias ? " (bias by kernel)" : "";
    log_debug("conv2d plan for " + s.str() + ": engine " + std::to_string(cands[best].engine) + bias_note +
              ", workspace " + std::to_string(plan->workspace_bytes) + " B, " + std::to_string(cands.size()) +
              " candidates" + (timings.empty() ? std::string() : " (ms:" + timings + ")") + ", built in " +
              std::to_string(ms_since(t0)) + " ms");
    return plan;
  }
  throw Error(ErrorKind::Backend, "cuDNN has no engine for a bf16 NHWC convolution of " + s.str());
}

// A device buffer ordered on a stream (for the padded input), given back on the same stream.
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) ZI_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  ~StreamBuffer() {
    if (ptr_) cudaFreeAsync(ptr_, stream_);
  }
  bf16* get() const { return static_cast<bf16*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

}  // namespace

Conv2d::Conv2d(cudnnHandle_t cudnn, Workspace& workspace) : cudnn_(cudnn), workspace_(workspace) {}

Conv2d::~Conv2d() = default;

void Conv2d::run(const bf16* x, int64_t n, int64_t h, int64_t w, int64_t c, const bf16* weight, int64_t o, int64_t kh,
                 int64_t kw, const bf16* bias, const Conv2dParams& p, bf16* y, cudaStream_t stream) {
  ZI_ASSERT(n >= 0 && h > 0 && w > 0 && c > 0 && o > 0 && kh > 0 && kw > 0 && p.stride > 0);
  ZI_ASSERT(p.pad_top >= 0 && p.pad_bottom >= 0 && p.pad_left >= 0 && p.pad_right >= 0);
  const int64_t hp_full = h + p.pad_top + p.pad_bottom, wp_full = w + p.pad_left + p.pad_right;
  ZI_CHECK(hp_full >= kh && wp_full >= kw, ErrorKind::InvalidArgument,
           "conv2d: a " + std::to_string(kh) + "x" + std::to_string(kw) + " kernel does not fit a padded " +
               std::to_string(hp_full) + "x" + std::to_string(wp_full) + " image");
  const int64_t ho = (hp_full - kh) / p.stride + 1, wo = (wp_full - kw) / p.stride + 1;
  if (n == 0) return;

  // Symmetric padding goes to cuDNN; the rest is written into a padded copy of x.
  const int sym_h = std::min(p.pad_top, p.pad_bottom), sym_w = std::min(p.pad_left, p.pad_right);
  const int e_top = p.pad_top - sym_h, e_bottom = p.pad_bottom - sym_h;
  const int e_left = p.pad_left - sym_w, e_right = p.pad_right - sym_w;
  const bool explicit_pad = e_top || e_bottom || e_left || e_right;
  const int64_t hx = h + e_top + e_bottom, wx = w + e_left + e_right;  // the input cuDNN sees

  // Batch chunks small enough for 32-bit element counts in every tensor of a call.
  const int64_t per_image = std::max(hx * wx * c, ho * wo * o);
  ZI_CHECK(per_image <= kMaxElements, ErrorKind::InvalidArgument,
           "conv2d: one image of " + std::to_string(hx) + "x" + std::to_string(wx) + "x" +
               std::to_string(std::max(c, o)) +
               " exceeds the 2^31 elements this path allows per tensor of one cuDNN call");
  const int64_t chunk = std::max<int64_t>(1, std::min(n, kMaxElements / per_image));

  StreamBuffer padded(explicit_pad ? size_t(chunk * hx * wx * c) * sizeof(bf16) : 0, stream);
  ZI_CUDNN_CHECK(cudnnSetStream(cudnn_, stream));
  for (int64_t b0 = 0; b0 < n; b0 += chunk) {
    const int64_t nb = std::min(chunk, n - b0);
    Pointers ptrs{x + b0 * h * w * c, weight, bias, y + b0 * ho * wo * o};
    if (explicit_pad) {
      pad_nhwc(ptrs.x, padded.get(), nb, h, w, c, e_top, e_bottom, e_left, e_right, stream);
      ptrs.x = padded.get();
    }
    int64_t align = std::min({alignment_of(ptrs.x), alignment_of(ptrs.w), alignment_of(ptrs.y)});
    if (bias) align = std::min(align, alignment_of(bias));
    const ConvShape s{nb, hx, wx, c, o, kh, kw, ho, wo, p.stride, sym_h, sym_w, align, bias != nullptr};

    auto key = std::make_tuple(nb, hx, wx, c, o, kh, kw, p.stride, sym_h, sym_w, int(align), bias != nullptr);
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, build_plan(cudnn_, workspace_, s, ptrs, stream)).first;
    const Plan& plan = *it->second;

    void* ws = plan.workspace_bytes > 0 ? workspace_.get(size_t(plan.workspace_bytes)) : nullptr;
    ZI_CUDNN_CHECK(execute(cudnn_, plan.exec, plan.bias_fused, ptrs, ws));
    if (bias && !plan.bias_fused) add_bias_nhwc(ptrs.y, bias, nb * ho * wo, o, stream);
  }
}

}  // namespace zimage::cuda
