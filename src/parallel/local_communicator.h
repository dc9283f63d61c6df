// U ranks simulated in one process, for tests on the CPU backend: each rank runs on its own thread
// with its own backend and model, and the collectives copy chunks between the ranks' host tensors.
//
// The ranks run in lock-step, one at a time: rank r computes until its next collective, then hands the
// turn to rank r + 1; the last rank to arrive copies every chunk and hands the turn back to rank 0.
// That makes a run deterministic and keeps the CPU backend's process-wide state (OpenBLAS's thread
// count, the parallel_for pool) out of reach of two ranks at once, while the model code goes through
// the same Communicator calls as with NCCL.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel/communicator.h"

namespace zimage {

class LocalGroup {
 public:
  explicit LocalGroup(int size);
  ~LocalGroup();
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;

  int size() const { return size_; }
  // Runs fn(comm) for every rank (comm.rank() tells which) on its own thread and waits for all of them.
  // The first exception a rank throws is rethrown here; the other ranks' collectives then fail too.
  void run(const std::function<void(Communicator&)>& fn);

 private:
  class Rank;
  enum class Op { AllToAll, AllGather };
  struct Slot {
    Op op = Op::AllToAll;
    const Tensor* send = nullptr;
    Tensor* recv = nullptr;
  };

  void collective(int rank, Op op, const Tensor& send, Tensor& recv);
  void exchange();                  // every rank has arrived: copy all chunks (called with the lock held)
  void fail(std::exception_ptr e);  // with the lock held

  int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  int turn_ = 0, arrived_ = 0;
  uint64_t generation_ = 0;
  std::vector<Slot> slots_;
  std::exception_ptr error_;  // the first failure of this run
};

}  // namespace zimage
