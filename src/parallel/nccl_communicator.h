// Collectives between GPUs through NCCL, in one process that drives several GPUs with one thread per
// GPU. Each rank's collectives are queued on its backend's stream (Backend::native_stream), in order
// with its kernels: nothing waits on the host. Builds without CUDA have no NCCL and say so.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "parallel/rank_world.h"

namespace zimage {

// World rank r runs on GPU devices[r] and queues on backends[r] (a CUDA backend of that device, alive
// as long as the world). run() makes devices[r] current on rank r's thread. When a rank fails, every
// communicator of the world is aborted so that no other rank waits forever inside NCCL; the world is
// unusable afterwards.
std::unique_ptr<RankWorld> make_nccl_world(const std::vector<int>& devices, const std::vector<Backend*>& backends);

}  // namespace zimage
