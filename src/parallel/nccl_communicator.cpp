#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <exception>
#include <mutex>
#include <string>
#include <thread>

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

#define ZI_CUDA_RUNTIME_CHECK(expr)                                                                     \
  do {                                                                                                  \
    cudaError_t _e = (expr);                                                                            \
    if (_e != cudaSuccess)                                                                              \
      throw Error(ErrorKind::Backend, std::string("CUDA error in ") + #expr + ": " + cudaGetErrorString(_e)); \
  } while (0)

// What every communicator of one world shares: after a failure, all of them are aborted at once.
struct CommRegistry {
  std::mutex mu;
  std::vector<ncclComm_t> comms;
  bool aborted = false;

  void abort_all() {
    std::lock_guard<std::mutex> l(mu);
    if (aborted) return;
    aborted = true;
    for (ncclComm_t c : comms) ncclCommAbort(c);  // peers blocked in NCCL kernels return
  }
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<CommRegistry> reg, ncclComm_t comm, int rank, int size, int device,
                   cudaStream_t stream)
      : reg_(std::move(reg)), comm_(comm), rank_(rank), size_(size), device_(device), stream_(stream) {}
  ~NcclCommunicator() override {
    std::lock_guard<std::mutex> l(reg_->mu);
    if (!reg_->aborted) ncclCommDestroy(comm_);
  }
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

  // To the next rank, from the previous one, as one grouped send/recv pair.
  void ring_shift(const Tensor& send, Tensor& recv) override {
    check(send, recv, send.nbytes());
    const int next = (rank_ + 1) % size_, prev = (rank_ + size_ - 1) % size_;
    ZI_NCCL_CHECK(ncclGroupStart(), comm_);
    ZI_NCCL_CHECK(ncclSend(send.data(), send.nbytes(), ncclUint8, next, comm_, stream_), comm_);
    ZI_NCCL_CHECK(ncclRecv(recv.data(), recv.nbytes(), ncclUint8, prev, comm_, stream_), comm_);
    ZI_NCCL_CHECK(ncclGroupEnd(), comm_);
  }

 private:
  void check(const Tensor& send, const Tensor& recv, size_t recv_bytes) const {
    {
      std::lock_guard<std::mutex> l(reg_->mu);
      ZI_CHECK(!reg_->aborted, ErrorKind::Backend, "NCCL rank " + std::to_string(rank_) + ": another rank failed");
    }
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

  std::shared_ptr<CommRegistry> reg_;
  ncclComm_t comm_;
  int rank_, size_, device_;
  cudaStream_t stream_;
};

class NcclWorld final : public RankWorld {
 public:
  NcclWorld(std::vector<int> devices, std::vector<Backend*> backends)
      : devices_(std::move(devices)), backends_(std::move(backends)), reg_(std::make_shared<CommRegistry>()) {}

  int size() const override { return int(devices_.size()); }

  std::vector<std::unique_ptr<Communicator>> make_group(const std::vector<int>& members) override {
    const int n = int(members.size());
    std::vector<int> devs;
    for (int r : members) {
      ZI_ASSERT(r >= 0 && r < size());
      devs.push_back(devices_[size_t(r)]);
    }
    std::vector<ncclComm_t> comms(size_t(n), nullptr);
    ncclResult_t res = ncclCommInitAll(comms.data(), n, devs.data());
    ZI_CHECK(res == ncclSuccess, ErrorKind::Backend,
             std::string("NCCL could not connect ") + std::to_string(n) + " GPUs: " + ncclGetErrorString(res));
    std::vector<std::unique_ptr<Communicator>> out;
    std::lock_guard<std::mutex> l(reg_->mu);
    for (int i = 0; i < n; ++i) {
      reg_->comms.push_back(comms[size_t(i)]);
      const int r = members[size_t(i)];
      out.push_back(std::make_unique<NcclCommunicator>(
          reg_, comms[size_t(i)], i, n, devs[size_t(i)], static_cast<cudaStream_t>(backends_[size_t(r)]->native_stream())));
    }
    return out;
  }

  void run(const std::function<void(int)>& fn) override {
    std::mutex mu;
    std::exception_ptr first;
    std::vector<std::thread> threads;
    for (int r = 0; r < size(); ++r)
      threads.emplace_back([&, r] {
        try {
          ZI_CUDA_RUNTIME_CHECK(cudaSetDevice(devices_[size_t(r)]));
          fn(r);
        } catch (...) {
          {
            std::lock_guard<std::mutex> l(mu);
            if (!first) first = std::current_exception();
          }
          reg_->abort_all();
        }
      });
    for (auto& t : threads) t.join();
    if (first) std::rethrow_exception(first);
  }

 private:
  std::vector<int> devices_;
  std::vector<Backend*> backends_;
  std::shared_ptr<CommRegistry> reg_;
};

}  // namespace

std::unique_ptr<RankWorld> make_nccl_world(const std::vector<int>& devices, const std::vector<Backend*>& backends) {
  ZI_ASSERT(!devices.empty() && devices.size() == backends.size());
  for (size_t r = 0; r < devices.size(); ++r)
    ZI_CHECK(backends[r]->native_stream() != nullptr, ErrorKind::InvalidArgument,
             "NCCL rank " + std::to_string(r) + " needs a CUDA backend, got " + backends[r]->name());
  return std::make_unique<NcclWorld>(devices, backends);
}

}  // namespace zimage
