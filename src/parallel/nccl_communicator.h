// Collectives between GPUs through NCCL, for a process that drives several GPUs with one thread per
// GPU (built with the CUDA backend only). Each rank's collectives are queued on its backend's stream
// (Backend::native_stream), in order with its kernels: nothing waits on the host.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "parallel/communicator.h"

namespace zimage {

// One communicator per rank of a new group: rank r runs on GPU devices[r] and queues on backends[r]
// (a CUDA backend of that device). Call from one thread; then hand communicator r to rank r's thread,
// which must have devices[r] as its current CUDA device.
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices,
                                                                   const std::vector<Backend*>& backends);

}  // namespace zimage
