// The ranks of one multi-GPU generation and how they run: one thread per rank, and communicators for
// any group of ranks (Ulysses groups of U ranks, CFG pairs). Two worlds: NCCL over GPUs
// (nccl_communicator.h) and LocalWorld, ranks simulated in one process on CPU backends
// (local_communicator.h); the pipeline sees only this interface.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace zimage {

class RankWorld {
 public:
  virtual ~RankWorld() = default;
  virtual int size() const = 0;
  // One communicator per member, in order: communicator i is rank i of the group and belongs to world
  // rank members[i], whose thread alone may call it. Call from outside run().
  virtual std::vector<std::unique_ptr<Communicator>> make_group(const std::vector<int>& members) = 0;
  // Runs fn(rank) for every rank on a thread of its own (with its GPU current) and waits for all of them.
  // The first exception a rank throws is rethrown here; the other ranks' collectives then fail instead
  // of waiting forever.
  virtual void run(const std::function<void(int rank)>& fn) = 0;
};

}  // namespace zimage
