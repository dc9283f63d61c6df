#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <string>

#include "core/error.h"

namespace zimage {

namespace {

#define ZI_NCCL_CHECK(expr, comm)                                                                                    \
  do {                                                                                                               \
    ncclResult_t _r = (expr);                                                                                        \
    if (_r != ncclSuccess)                                                                                           \
      throw Error(ErrorKind::Backend, std::string("NCCL error in ") + #expr + ": " + ncclGetErrorString(_r) + " (" + \
                                          ncclGetLastError(comm) + ")");                                             \
  } while (0)

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size, int device, cudaStream_t stream)
      : comm_(comm), rank_(rank), size_(size), device_(device), stream_(stream) {}
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // Byte-wise: the collectives only move data, so every dtype travels as ncclUint8. Chunk j of send
  // to rank j and chunk s of recv from rank s, as grouped point-to-point calls (NCCL's all-to-all).
  void all_to_all(const Tensor& send, Tensor& recv) override {
    check(send, recv, send.nbytes());
    const size_t chunk = send.nbytes() / size_t(size_);
    const auto* s = static_cast<const char*>(send.data());
    auto* r = static_cast<char*>(recv.data());
    ZI_NCCL_CHECK(ncclGroupStart(), comm_);
    for (int peer = 0; peer < size_; ++peer) {
      ZI_NCCL_CHECK(ncclSend(s + size_t(peer) * chunk, chunk, ncclUint8, peer, comm_, stream_), comm_);
      ZI_NCCL_CHECK(ncclRecv(r + size_t(peer) * chunk, chunk, ncclUint8, peer, comm_, stream_), comm_);
    }
    ZI_NCCL_CHECK(ncclGroupEnd(), comm_);
  }

  void all_gather(const Tensor& send, Tensor& recv) override {
    check(send, recv, send.nbytes() * size_t(size_));
    ZI_NCCL_CHECK(ncclAllGather(send.data(), recv.data(), send.nbytes(), ncclUint8, comm_, stream_), comm_);
  }

 private:
  void check(const Tensor& send, const Tensor& recv, size_t recv_bytes) const {
    ZI_CHECK(send.device() == Device::Cuda && recv.device() == Device::Cuda && send.is_contiguous() &&
                 recv.is_contiguous() && send.dtype() == recv.dtype() && recv.nbytes() == recv_bytes &&
                 send.nbytes() % size_t(size_) == 0,
             ErrorKind::Internal,
             "NCCL collective on rank " + std::to_string(rank_) + ": send " + shape_str(send.shape()) + ", recv " +
                 shape_str(recv.shape()) + " are not contiguous device tensors of matching sizes");
    int current = -1;
    ZI_CHECK(cudaGetDevice(&current) == cudaSuccess && current == device_, ErrorKind::Internal,
             "NCCL rank " + std::to_string(rank_) + " called from a thread whose CUDA device is not GPU " +
                 std::to_string(device_));
  }

  ncclComm_t comm_;
  int rank_, size_, device_;
  cudaStream_t stream_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices,
                                                                   const std::vector<Backend*>& backends) {
  ZI_ASSERT(!devices.empty() && devices.size() == backends.size());
  const int n = int(devices.size());
  for (int r = 0; r < n; ++r)
    ZI_CHECK(backends[size_t(r)]->native_stream() != nullptr, ErrorKind::InvalidArgument,
             "NCCL rank " + std::to_string(r) + " needs a CUDA backend, got " + backends[size_t(r)]->name());
  std::vector<ncclComm_t> comms(size_t(n), nullptr);
  ncclResult_t res = ncclCommInitAll(comms.data(), n, devices.data());
  ZI_CHECK(res == ncclSuccess, ErrorKind::Backend,
           std::string("NCCL could not connect ") + std::to_string(n) + " GPUs: " + ncclGetErrorString(res));
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < n; ++r)
    out.push_back(std::make_unique<NcclCommunicator>(comms[size_t(r)], r, n, devices[size_t(r)],
                                                     static_cast<cudaStream_t>(backends[size_t(r)]->native_stream())));
  return out;
}

}  // namespace zimage
