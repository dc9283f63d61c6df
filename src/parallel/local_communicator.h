// Ranks simulated in one process, for tests and for `--backend cpu --num-gpus N`: each rank runs on
// its own thread with its own CPU backend and model, and the collectives copy chunks between the
// ranks' host tensors, through the same Communicator calls as NCCL.
//
// One rank computes at a time: a rank holds the world's baton while it runs and gives it up only while
// it waits in a collective (the last member to arrive does the copies). That keeps the CPU backend's
// process-wide state (OpenBLAS's thread count, the parallel_for pool) out of reach of two ranks at once,
// and lets groups overlap (a rank in a Ulysses group and a CFG pair). Results do not depend on which
// waiting rank takes the baton next: each rank's computation is deterministic.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "parallel/rank_world.h"

namespace zimage {

class LocalWorld final : public RankWorld {
 public:
  explicit LocalWorld(int size);
  ~LocalWorld() override;
  LocalWorld(const LocalWorld&) = delete;
  LocalWorld& operator=(const LocalWorld&) = delete;

  int size() const override { return size_; }
  std::vector<std::unique_ptr<Communicator>> make_group(const std::vector<int>& members) override;
  void run(const std::function<void(int rank)>& fn) override;

 private:
  class Member;
  struct Group;
  enum class Op { AllToAll, AllGather, RingShift };

  void collective(Group& g, int member, Op op, const Tensor& send, Tensor& recv);
  void take_baton(std::unique_lock<std::mutex>& l, int rank);
  void give_baton();  // with the lock held
  void check_stuck(); // with the lock held: every live rank waits in a collective that cannot complete
  void fail(std::exception_ptr e);  // with the lock held

  int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  int baton_ = -1;          // the rank computing, or -1
  int live_ = 0, blocked_ = 0;  // ranks of this run not finished / waiting in a collective
  std::vector<std::shared_ptr<Group>> groups_;
  std::exception_ptr error_;  // the first failure of this run
};

// A world of `size` ranks that are all one group: the simple case of a single communicator per rank.
class LocalGroup {
 public:
  explicit LocalGroup(int size);
  int size() const { return world_.size(); }
  // fn(comm) for every rank (comm.rank() tells which), as LocalWorld::run.
  void run(const std::function<void(Communicator&)>& fn);

 private:
  LocalWorld world_;
  std::vector<std::unique_ptr<Communicator>> comms_;
};

}  // namespace zimage
